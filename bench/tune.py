"""``shadowbench tune``: write a pinned-config table (``shadow_kernels.tuned``) for this GPU.

The autotuner times each config of a kernel alone, as one cold call, and its pick moves from process to process
when configs are within its noise (OPT-6.7B fc2 at sparsity 0: 47.7 vs 55.7 us a call in two runs). A pinned table
makes every run use the same config. Two ways to choose, each writing entries of its own kernel:

- ``--method alone`` (gather-cols for fc2, gather-segments for out_proj, batch 1): at every model and sparsity
  given, the decoder's call (``preload=True``) with the autotuner's pick (``tuned``) and with every config alone
  (``alone_<i>``), each under the steady timer (``bench.timing.time_steady``: back to back over copies of the data
  in CUDA graphs, once over and twice over); one row per measurement. Per autotune key, the config with the
  smallest mean of ``us / best us of the case`` over the cases that share the key is pinned (``build_table``).
- ``--method step`` (the dense gather-rows GEMVs of OPT decode with ``--dense-gemv triton``, batch 1): each
  GEMV role of a layer (out_proj, fc1, fc2, qkv) and the LM head in turn, every config of the rows kernel is put
  in a freshly captured decode step and the fastest step kept (coordinate descent, ``--passes`` times). In a
  decode step the kernels run as one chain with programmatic dependent launch, where the config fastest alone is
  not always the one that makes the step fastest.

Pinned tables are off while it runs (its baseline is the autotuner's). Rows go to ``--rows`` (JSON Lines, one per
measurement, commit-stamped), the table to ``--table`` (entries of the same kernel, dtype and key replaced).

    shadowbench tune --method alone --models opt-1.3b,opt-13b --table shadow_kernels/tuned/h100-steady.json
    shadowbench tune --method step --models opt-1.3b --table shadow_kernels/tuned/h100.json
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import zlib
from pathlib import Path

import torch
import triton

import shadow_kernels as sk
from models.generate import Generator
from models.registry import get_spec
from shadow_kernels import tuned

from .kernels import Case, build_case, n_copies, rel_err
from .latency import LatencyCase, build_model, mode_of
from .results import RowWriter, environment, git_commit
from .timing import copy_bandwidth, time_steady

METHODS = ("alone", "step")
ALONE_OPS = {"fc2": "cols_single", "out_proj": "segments_single"}
ROLES = ("out_proj", "fc1", "fc2", "qkv", "lm_head")


def pct_bw(nbytes: int, gbps: float, us: float) -> float:
    """``nbytes`` moved in ``us`` microseconds as % of the copy bandwidth ``gbps``."""
    return 100 * nbytes / (gbps * 1e9) / (us * 1e-6)


def _copies(model: str, op: str, sparsity: float, device) -> list:
    """A sweep case (batch 1, fp16) and enough copies of its data that one replay reads from DRAM."""
    spec = get_spec(model)
    case = Case(model, op, sparsity, 1)
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{model}/{op}/{sparsity}".encode()))
    built = build_case(spec, case, torch.float16, device, gen)
    n = n_copies(built.bytes_moved, "steady") if device.type == "cuda" else 2  # DRAM reads only matter on a GPU
    return [built] + [build_case(spec, case, torch.float16, device, gen) for _ in range(n - 1)]


def _decoder_call(built, model: str, op: str):
    """The op as the decoder calls it (``preload=True``, indices checked once by their producer)."""
    a = built.tensors
    idx32 = a["idx"].to(torch.int32)
    if op == "fc2":
        return lambda: sk.gather_cols_gemv(a["weight_t"], a["h"], idx32, a["bias"], validate=False, preload=True)
    d = get_spec(model).head_dim
    return lambda: sk.gather_segments_gemv(a["weight"], a["h"], idx32, a["bias"], segment=d, validate=False,
                                           preload=True)


def alone_case(model: str, op: str, sparsity: float, device, gbps: float, emit) -> None:
    """Rows of one case: the autotuner's pick (``tuned``, with the case's autotune key) and every config alone."""
    copies = _copies(model, op, sparsity, device)
    built = copies[0]
    ref = built.reference()
    kernel = ALONE_OPS[op]
    every = list(tuned.autotuners()[kernel].configs)
    names = tuned.key_names(kernel)
    fns = [_decoder_call(c, model, op) for c in copies]
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved, "copies": len(copies),
            "timer": "steady", "call": "preload", "kernel": kernel, "dtype": "torch.float16"}
    key = None
    for label, configs in [("tuned", every)] + [(f"alone_{i}", [c]) for i, c in enumerate(every)]:
        with tuned.restricted(kernel, configs) as tuner:
            err = rel_err(fns[0](), ref)
            if key is None and tuner.cache:  # the case's autotune key, from the first (tuned) call
                key = dict(zip(names, next(iter(tuner.cache))[: len(names)], strict=True))
            us = time_steady(fns, device)["median_us"]
            config = tuner.best_config if len(configs) > 1 else configs[0]
            emit({**base, "variant": label, "us": us, "pct_copy_bw": pct_bw(built.bytes_moved, gbps, us),
                  "rel_err": err, "config": tuned.config_dict(config), "key": key})


def build_table(rows: list[dict], source: str) -> dict:
    """A pinned table from ``alone`` rows of one device: per autotune key, the config with the smallest mean of
    ``us / best us of the case`` over the cases that share the key (the key buckets the number of selected rows, so
    OPT-1.3B fc2 at s=0.5 and 0.7 share one). Every key is pinned, not only those where the autotuner's pick was
    slower: the point is that every run uses the same config. Each entry is written without and with a device-side
    count (``HAS_COUNT``; the decoder's global top-k passes one, the sweep does not): the count is one load and does
    not change how a config streams."""
    cases = collections.defaultdict(dict)  # (model, op, sparsity) -> variant -> row
    for r in rows:
        if "variant" in r and r.get("key"):
            cases[(r["model"], r["op"], r["sparsity"])][r["variant"]] = r
    if not cases:
        raise ValueError("no rows with a 'variant' and a 'key' (rows of `shadowbench tune --method alone`)")
    devices = {r["device"] for r in rows if "device" in r}
    if len(devices) != 1:
        raise ValueError(f"rows from one device expected, got {sorted(devices)}")
    groups = collections.defaultdict(list)
    for case, variants in cases.items():
        if "tuned" not in variants:
            raise ValueError(f"case {case} has no 'tuned' row (the autotuner's pick and the kernel name)")
        t = variants["tuned"]
        groups[(t["kernel"], t["dtype"], json.dumps(t["key"], sort_keys=True))].append(case)
    entries = []
    for (kernel, dtype, key), members in sorted(groups.items()):
        alone = [{v: r for v, r in cases[c].items() if v.startswith("alone_")} for c in members]
        best = [min(r["us"] for r in a.values()) for a in alone]
        names = set.intersection(*(set(a) for a in alone))
        if not names:
            raise ValueError(f"cases {members} share key {key} but no config was timed alone in all of them")
        score = {v: sum(a[v]["us"] / b for a, b in zip(alone, best, strict=True)) / len(alone) for v in names}
        pick = min(sorted(names), key=score.get)
        for has_count in (False, True):
            entries.append({
                "kernel": kernel, "dtype": dtype, "key": {**json.loads(key), "HAS_COUNT": has_count},
                "config": alone[0][pick]["config"],
                "role": ", ".join(f"{m} {op} s={s:g}" for m, op, s in members),
                "steady_us": [round(a[pick]["us"], 2) for a in alone],
                "autotuned_steady_us": [round(cases[c]["tuned"]["us"], 2) for c in members],
                "best_alone_us": [round(b, 2) for b in best],
            })
    return {"device": devices.pop(), "source": source, "entries": entries}


def merge_table(path, table: dict) -> dict:
    """Write ``table``'s entries into the pinned table at ``path``: entries of the same kernel, dtype and key are
    replaced, the others kept. A file for another device is refused."""
    path = Path(path)
    old = {"device": table["device"], "source": table["source"], "entries": []}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("device") != table["device"]:
            raise ValueError(f"{path} is a table for {old.get('device')!r}, not {table['device']!r}")
    ident = lambda e: (e["kernel"], e.get("dtype"), json.dumps(e["key"], sort_keys=True))
    new = {ident(e) for e in table["entries"]}
    merged = {"device": table["device"], "source": table["source"],
              "entries": [e for e in old["entries"] if ident(e) not in new] + table["entries"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def _role_keys(cfg) -> dict:
    """Each dense GEMV of an OPT layer (and the LM head) as (K, ROWS_BUCKET, NORM) of the rows kernel's key."""
    next_pow2 = triton.next_power_of_2  # the bucket of the kernel's ROWS_BUCKET key
    E, F, V = cfg.hidden, cfg.ffn, cfg.vocab
    return {"out_proj": (E, next_pow2(E), 0), "fc1": (E, F, 1), "fc2": (F, next_pow2(E), 0), "qkv": (E, 3 * E, 1),
            "lm_head": (E, V, 1)}


def _describe(c) -> str:
    return (f"N{c.kwargs['BLOCK_N']}xK{c.kwargs['BLOCK_K']}{'p' if c.kwargs.get('PREFETCH') else ''}"
            f"/w{c.num_warps}s{c.num_stages}")


def step_model(name: str, device, gbps: float, emit, *, roles=ROLES, passes=1, prompt_len=128, gen_len=128) -> list:
    """Coordinate descent over the rows kernel's configs, role by role, by decode-step time; returns table entries."""
    tuner = tuned.autotuners()["rows_single"]
    names = tuned.key_names("rows_single")
    model = build_model(name, torch.float16, device)
    if not hasattr(model, "set_dense_gemv"):
        raise ValueError(f"--method step tunes OPT's own dense GEMVs; {name} is {model.cfg.family}")
    model.set_dense_gemv("triton")
    case = LatencyCase(name, "dense", 0.0, None, None, gen_len)
    prompt = torch.randint(0, model.cfg.vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    floor = model.step_weight_bytes() / (gbps * 1e9) * 1e3

    def step_ms() -> float:
        gen = Generator(model, mode_of(case, model.cfg), max_len=prompt_len + gen_len)
        gen.generate(prompt, gen_len)
        return statistics.median(gen.generate(prompt, gen_len).token_ms)

    base = step_ms()
    keys_of = {}
    for role, (K, bucket, norm) in _role_keys(model.cfg).items():
        keys_of[role] = [k for k in tuner.cache if (lambda d: d["K"] == K and d["ROWS_BUCKET"] == bucket
                                                     and d["NORM"] == norm and d["BLOCK_B"] == 1)(
            dict(zip(names, k[: len(names)], strict=True)))]
    chosen = {r: tuner.cache[ks[0]] for r, ks in keys_of.items() if ks}
    emit({"model": name, "trial": "autotuned", "metric": "token_ms", "value": base, "floor_ratio": base / floor,
          "configs": {r: _describe(c) for r, c in chosen.items()}})
    for p in range(passes):
        for role in roles:
            keys = keys_of.get(role)
            if not keys:
                emit({"model": name, "trial": role, "metric": "error", "error": "no autotuned launch of this role"})
                continue
            results = []
            for cfg in tuner.configs:
                for k in keys:
                    tuner.cache[k] = cfg
                try:
                    ms = step_ms()
                except Exception as exc:  # noqa: BLE001 - a config that fails is recorded; the others go on
                    emit({"model": name, "trial": role, "pass": p, "metric": "error", "config": _describe(cfg),
                          "error": f"{type(exc).__name__}: {exc}"[:400]})
                    continue
                results.append((ms, cfg))
                emit({"model": name, "trial": role, "pass": p, "metric": "token_ms", "config": _describe(cfg),
                      "value": ms, "floor_ratio": ms / floor})
            ms, cfg = min(results, key=lambda t: t[0])
            for k in keys:
                tuner.cache[k] = cfg
            chosen[role] = cfg
    final = [step_ms() for _ in range(3)]
    med = statistics.median(final)
    emit({"model": name, "trial": "tuned", "metric": "token_ms", "value": med, "runs": final,
          "floor_ratio": med / floor, "autotuned": base, "configs": {r: _describe(c) for r, c in chosen.items()}})
    entries = [{"kernel": "rows_single", "dtype": str(model.dtype), "key": dict(zip(names, k[: len(names)],
                                                                                    strict=True)),
                "config": tuned.config_dict(chosen[role]), "role": f"{name} {role}", "step_ms": med,
                "autotuned_step_ms": base}
               for role, keys in keys_of.items() if role in chosen for k in keys]
    return entries


def run_tune(method: str, models, *, sparsities=(0.0, 0.5, 0.7, 0.9), ops=tuple(ALONE_OPS), roles=ROLES,
             passes=1, prompt_len=128, gen_len=128, rows_path="runs/tune.jsonl", table_path=None,
             progress=True) -> dict | None:
    """Run one method over ``models``; write its rows, and the table when ``table_path`` is given."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for m in models:
        get_spec(m)
    bad = [o for o in ops if o not in ALONE_OPS]
    if bad:
        raise ValueError(f"--method alone tunes {', '.join(ALONE_OPS)}; got {bad}")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"roles must be among {', '.join(ROLES)}; got {bad}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    one = [k for k, t in tuned.autotuners().items() if len(t.configs) < 2]
    if one:
        raise ValueError(f"tune chooses among a kernel's configs, and here {', '.join(one)} have one (no CUDA device: "
                         f"the Triton interpreter runs one config per kernel); run it on the GPU to be tuned")
    env = environment(device, interpreted=True)
    gbps = copy_bandwidth(device)["copy_gbps"] or float("nan")
    writer = RowWriter(rows_path)
    head = {"kind": "tune", "method": method, "git_commit": git_commit(), "device": env["device"],
            "torch": env["torch"], "triton": env["triton"], "copy_gbps": gbps}
    rows: list[dict] = []

    def emit(row: dict) -> None:
        full = {**head, **row}
        rows.append(full)
        writer.write([full])
        if progress:
            print(json.dumps(full), flush=True)

    was = tuned.set_pinned(False)
    entries = []
    try:
        if method == "alone":
            for m in models:
                for op in ops:
                    for s in sparsities:
                        try:
                            alone_case(m, op, s, device, gbps, emit)
                        except Exception as exc:  # noqa: BLE001 - one failing case is recorded; the rest go on
                            emit({"model": m, "op": op, "sparsity": s, "metric": "error",
                                  "error": f"{type(exc).__name__}: {exc}"[:500]})
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
        else:
            for m in models:
                entries += step_model(m, device, gbps, emit, roles=roles, passes=passes, prompt_len=prompt_len,
                                      gen_len=gen_len)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        tuned.set_pinned(was)
    if table_path is None:
        return None
    if method == "alone":
        table = build_table(rows, f"shadowbench tune --method alone at {head['git_commit']}: batch 1, fp16, the "
                                  f"decoder's call, every config alone under the steady timer")
    else:
        table = {"device": env["device"], "entries": entries,
                 "source": f"shadowbench tune --method step at {head['git_commit']}: OPT dense decode (own GEMV, "
                           f"fp16, batch 1, prompt {prompt_len}, gen {gen_len}), configs chosen by step time"}
    merged = merge_table(table_path, table)
    tuned.reload()
    return merged


def table_from_rows(paths, out, source: str) -> dict:
    """``shadowbench tune --from-rows``: a table from earlier ``--method alone`` rows, without timing again."""
    rows = []
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"rows file {p} does not exist")
        with open(p) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ValueError(f"{p}:{n} is not valid JSON") from None
    return merge_table(out, build_table(rows, source))

