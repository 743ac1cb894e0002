"""The results schema (one place) and a JSON Lines writer that appends and flushes every row, so a
killed sweep keeps its rows and a rerun skips the configurations already done."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"


def environment(device: torch.device) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "device": device_name(device)}
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
    common = dict(kind="predictor", model=model, mode=kind, criterion=criterion, device=str(device),
                  dtype="float32", git_commit=git_commit(), n_train=res.n_train, n_val=res.n_val,
                  best_epoch=res.best_epoch, hidden=res.predictor.hidden, path=str(path),
                  **res.normaliser.describe(), **extra)
    rows = [make_row(**common, metric=f"spearman_{scope}_{unit}", value=v, unit="rho")
            for unit, d in res.quality.items() for scope, v in d.items()]
    rows.append(make_row(**common, metric="val_mse", value=min(h["val_loss"] for h in res.history), unit="",
                         history=res.history))
    return rows


class RowWriter:
    """Appends rows to a JSON Lines file, flushing each one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def existing(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = [(n, line.strip()) for n, line in enumerate(self.path.read_text().splitlines(), 1) if line.strip()]
        rows = []
        for pos, (lineno, line) in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                # A sweep killed mid-write leaves at most one torn last line: that row is redone.
                if pos == len(lines) - 1:
                    continue
                raise ValueError(f"{self.path}:{lineno} is not valid JSON ({err.msg}); "
                                 "remove or repair that line to resume") from None
        return rows

    def write(self, rows: Iterable[dict]) -> None:
        with self.path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
                fh.flush()
