"""The results schema (one place) and a JSON Lines writer that appends a case's rows together and syncs them, so a
killed sweep keeps every finished case, repairs its tail on resume, and a rerun skips the cases already done."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

# Every row has these keys (None where a field does not apply); anything else goes into "extra".
SCHEMA = (
    "kind", "model", "mode", "criterion", "policy", "sparsity", "batch", "prompt_len", "gen_len",
    "metric", "value", "unit", "device", "dtype", "git_commit", "time", "status", "extra",
)


def git_commit() -> str | None:
    """The commit the code came from; ``SHADOWBENCH_COMMIT`` overrides it (a copied working tree, e.g. on a
    remote GPU machine, may carry another commit's ``.git``)."""
    if os.environ.get("SHADOWBENCH_COMMIT"):
        return os.environ["SHADOWBENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def device_name(device: torch.device, interpreted: bool = False) -> str:
    """The GPU's name; on a CPU, ``cpu``, or ``cpu (Triton interpreter)`` where the rows timed our Triton kernels in
    the interpreter (the kernel sweep; the decoders on a CPU run the PyTorch references)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)" if interpreted and os.environ.get("TRITON_INTERPRET") == "1" else "cpu"


def environment(device: torch.device, interpreted: bool = False) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "device": device_name(device, interpreted)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                   l2_bytes=getattr(props, "L2_cache_size", None), memory_bytes=props.total_memory)
    return env


def make_row(**fields) -> dict:
    """A row of the schema; unknown keys are moved into ``extra``."""
    extra = dict(fields.pop("extra", None) or {})
    row = {key: None for key in SCHEMA}
    for key, value in fields.items():
        if key in row:
            row[key] = value
        else:
            extra[key] = value
    row["extra"] = extra
    row["time"] = row["time"] or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    row["status"] = row["status"] or "ok"
    return row


def predictor_rows(res, *, model: str, kind: str, criterion: str, device, path, **extra) -> list[dict]:
    """Rows of one trained predictor (a ``models.train.TrainResult``): Spearman rho per scope and unit,
    and the best validation MSE with the loss history."""
    common = dict(kind="predictor", model=model, mode=kind, criterion=criterion,
                  device=device_name(torch.device(device)),  # the GPU's name, as every other table has it
                  dtype="float32", git_commit=git_commit(), n_train=res.n_train, n_val=res.n_val, n_test=res.n_test,
                  rho_split="test" if res.n_test else "validation",
                  best_epoch=res.best_epoch, hidden=res.predictor.hidden, path=str(path),
                  **res.normaliser.describe(), **extra)
    rows = [make_row(**common, metric=f"spearman_{scope}_{unit}", value=v, unit="rho")
            for unit, d in res.quality.items() for scope, v in d.items()]
    # the baselines on the same rows: per-unit mean (static's order) and per-source mean (the prompt's task)
    rows += [make_row(**common, metric=f"spearman_{scope}_{unit}_{name}", value=v, unit="rho", baseline=name)
             for name, q in res.baselines.items() for unit, d in q.items() for scope, v in d.items()]
    rows.append(make_row(**common, metric="val_mse", value=min(h["val_loss"] for h in res.history), unit="",
                         history=res.history))
    return rows


def settings_key(settings: dict) -> str:
    """A case's identity for resuming: every setting that changes a measured value, as sorted JSON. Rows carry it
    (``extra.case_key``) with the settings themselves (``extra.settings``), so a changed setting is a new case."""
    return json.dumps(settings, sort_keys=True, default=str)


_SAMPLED = 256 << 20  # files above this are identified by their size and their first and last 64 MB


_DIGESTS: dict = {}  # (path, size, mtime) -> digest: a sweep keys every case of one file without rereading it


def file_digest(path) -> str | None:
    """sha256 of a file (first 16 hex digits): the identity of a predictor, importance or criteria file in a case
    key. A file over 256 MB (a per-token criteria dataset runs to tens of GB) is hashed by its size and its first and
    last 64 MB, which any rewrite of it changes. Remembered per path, size and modification time."""
    if path is None:
        return None
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = _sha256(path)
    return _DIGESTS[memo]


def _sha256(path) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= _SAMPLED:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(64 << 20))
            f.seek(size - (64 << 20))
            h.update(f.read(64 << 20))
    return h.hexdigest()[:16]


def _case_of(row) -> tuple[str | None, int | None]:
    if not isinstance(row, dict):
        return None, None
    extra = row.get("extra") if isinstance(row.get("extra"), dict) else row
    return extra.get("case_id"), extra.get("case_rows")


def complete_rows(rows: list[dict]) -> list[dict]:
    """``rows`` less those of a case whose rows were not all written (a run killed between them; only a file's last
    case can be one). Rows written without a case stamp count as complete."""
    cases = [_case_of(r) for r in rows]
    counts: dict = {}
    for cid, _ in cases:
        if cid is not None:
            counts[cid] = counts.get(cid, 0) + 1
    return [r for r, (cid, want) in zip(rows, cases, strict=True) if cid is None or counts[cid] >= (want or 1)]


def parse_rows(path, text: str) -> tuple[list[dict], bool]:
    """The rows of a JSON Lines file's text and whether it ends in a torn line (text after the last newline: a row
    whose write was cut off, left out). Any other line that is not JSON is an error naming the file and line."""
    lines = text.split("\n")
    torn = bool(lines[-1].strip())
    rows = []
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg}); remove or repair that line") from None
    return rows, torn


class RowWriter:
    """Appends rows to a JSON Lines file. The rows of one ``write`` (one case) go out in one write, flushed and synced,
    stamped with a case id and their count, so a run killed mid-case leaves rows that resuming recognises as
    unfinished; the first write of a run first repairs the file's tail (a torn last line, an unfinished case),
    saying so on stderr. Refuses at construction, before any work, a path it could not write."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._repaired = False
        if self.path.is_dir():
            raise ValueError(f"results path {str(self.path)!r} is a folder; expected a .jsonl file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            existed = self.path.exists()
            with self.path.open("a"):
                pass
            if not existed:  # another process (a rank of the same sweep) may have removed its own probe already
                self.path.unlink(missing_ok=True)
        except OSError as err:
            raise ValueError(f"cannot write results to {str(self.path)!r}: {err.strerror or err}") from None

    def existing(self) -> list[dict]:
        """Rows already in the file, less a torn last line and the rows of an unfinished case (both are redone)."""
        if not self.path.exists():
            return []
        rows, _ = parse_rows(self.path, self.path.read_text())
        return complete_rows(rows)

    def resume(self) -> list[dict]:
        """Repair the tail (said on stderr), then the rows already there: what a sweep calls before it skips done
        cases."""
        self.repair()
        return self.existing()

    def repair(self) -> str | None:
        """Cut a torn last line and the rows of an unfinished last case off the file, in place; returns what was cut
        (None when the file ends at a whole case)."""
        self._repaired = True
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        cut = len(data)
        said = []
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            said.append(f"a torn last line ({len(data) - cut} bytes)")
        parse_rows(self.path, data[:cut].decode("utf-8", errors="replace"))  # damage before the tail is an error
        lines = data[:cut].splitlines(keepends=True)
        if lines and lines[-1].strip():
            last_id, want = _case_of(json.loads(lines[-1]))
            if last_id is not None:
                tail = 0
                for line in reversed(lines):
                    if not line.strip() or _case_of(json.loads(line))[0] != last_id:
                        break
                    tail += 1
                if tail < (want or 1):
                    cut -= sum(len(line) for line in lines[-tail:])
                    said.append(f"{tail} of the {want} rows of an unfinished case")
        if cut == len(data):
            return None
        os.truncate(self.path, cut)
        msg = f"repaired {self.path}: cut " + " and ".join(said) + "; that case is run again"
        print(msg, file=sys.stderr)
        return msg

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        if not self._repaired:
            self.repair()
        case_id = uuid.uuid4().hex[:12]
        for row in rows:
            target = row["extra"] if isinstance(row.get("extra"), dict) else row
            target["case_id"] = case_id
            target["case_rows"] = len(rows)
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        with self.path.open("a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


class GroupWriter:
    """A :class:`RowWriter` shared by the ranks of a tensor-parallel group (:mod:`models.tp`): rank 0 writes and
    repairs the file; :meth:`resume` and :meth:`existing` hand every rank rank 0's rows (a broadcast), so all ranks
    skip the same done cases and meet at the same collectives; the other ranks' ``write`` does nothing."""

    def __init__(self, path: str | os.PathLike, tp):
        self.tp = tp
        self.path = Path(path)
        self.inner = RowWriter(path) if tp.rank == 0 else None

    def _shared(self, read) -> list[dict]:
        import torch.distributed as dist

        box = [read() if self.inner is not None else None]
        dist.broadcast_object_list(box, src=0, group=self.tp.group)
        return box[0]

    def existing(self) -> list[dict]:
        return self._shared(lambda: self.inner.existing())

    def resume(self) -> list[dict]:
        return self._shared(lambda: self.inner.resume())

    def write(self, rows: Iterable[dict]) -> None:
        if self.inner is not None:
            self.inner.write(rows)


def row_writer(path: str | os.PathLike, tp=None):
    """The writer of a sweep: a :class:`RowWriter`, or a :class:`GroupWriter` for a tensor-parallel rank."""
    return RowWriter(path) if tp is None else GroupWriter(path, tp)
