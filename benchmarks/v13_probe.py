"""v13 probe: issue #2's GEMV cells under the stream timer of v6-v12 and the steady timer of v13, in one run.

``bench.timing.time_steady`` times the same copies of a case's data once over and twice over in two graphs and
takes the difference, so what a graph replay pays once (the launch behind the start event, the write-back of the
dirty lines the L2 flush leaves) cancels instead of being spread over the replay's 4-13 calls (v12 probe: the rows
of our GEMV on contiguous rows fit ``1.4 us + bytes / 3.14 TB/s + 17.2 us / calls``). For each case (batch 1, fp16,
configs tuned on cold data in this run), every variant under both timers (``timer`` of each row):
- ``triton``: our kernel as the sweep calls it (gather rows for fc1/qkv, gather cols for fc2, gather segments
  for out_proj), ``triton_preload`` as the decoder calls it (``preload=True``);
- ``cublas_dense``: torch on the whole weight; ``cublas_gathered`` / ``own_gathered``: cuBLAS and our dense GEMV on
  the selected weights copied to one contiguous matrix (no gather; sparse cases only);
- ``copy``: ``dst.copy_(src)`` of 256 MB (4 copies), read + written bytes: the copy bandwidth under each timer, next
  to the eager 1 GB copy that every ``pct_copy_bw`` divides by (``copy_gbps`` of the run).
With ``--alone``, only the cells still short of the targets under the steady timer (gather-cols fc2, gather-segments
out_proj): the decoder's call with the autotuner's choice (``tuned``) and with every config alone (``alone_<i>``),
steady timer only; the autotuner times each config as one cold call, which is not how calls follow each other.

    PYTHONPATH=. python benchmarks/v13_probe.py --out runs/v13-probe.jsonl [--alone]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.kernels import _spec, rel_err
from bench.results import probe_log
from bench.timing import time_steady, time_stream
from benchmarks.v7_probe import build_copies, cold_device, run_gemv_cases, use
from benchmarks.v8_probe import gathered
from models.ops import _gemv_triton
from shadow_kernels import gather_cols, gather_cols_gemv, gather_rows_gemv, gather_segments, gather_segments_gemv

TARGETS = [(m, op, s) for m in ("opt-13b", "opt-30b") for op in ("fc1", "qkv", "fc2", "out_proj") for s in (0.5, 0.7)]
DENSE = [(m, op, 0.0) for op in ("fc2", "out_proj") for m in ("opt-1.3b", "opt-6.7b", "opt-13b")]
CASES = [(m, op, s, False) for m, op, s in TARGETS + DENSE]
TIMERS = {"stream": time_stream, "steady": time_steady}
ALONE = [("opt-13b", "fc2", 0.7), ("opt-13b", "fc2", 0.5), ("opt-30b", "fc2", 0.7), ("opt-1.3b", "fc2", 0.0),
         ("opt-13b", "out_proj", 0.5), ("opt-13b", "out_proj", 0.7), ("opt-30b", "out_proj", 0.7)]


def pct_bw(nbytes, bw, us) -> float:
    """``nbytes`` moved in ``us`` microseconds as % of the copy bandwidth ``bw`` (GB/s)."""
    return 100 * nbytes / (bw * 1e9) / (us * 1e-6)


def tuner_of(op):
    """The batch-1 autotuner of the kernel that serves ``op`` (fc2: gather-cols, out_proj: gather-segments), its
    full config list and its autotune key names."""
    if op == "fc2":
        return gather_cols._cols_single, list(gather_cols._SINGLE_CONFIGS), gather_cols._KEY
    return gather_segments._segments_single, list(gather_segments._SINGLE_CONFIGS), gather_segments._KEY


def preload_call(built, model, op):
    a = built.tensors
    idx32 = a["idx"].to(torch.int32)
    if op in ("fc1", "qkv"):
        act = "relu" if op == "fc1" else None
        return lambda: gather_rows_gemv(a["weight"], a["x"], idx32, a["bias"], act, validate=False, preload=True)
    if op == "fc2":
        return lambda: gather_cols_gemv(a["weight_t"], a["h"], idx32, a["bias"], validate=False, preload=True)
    d = _spec(model).head_dim
    return lambda: gather_segments_gemv(a["weight"], a["h"], idx32, a["bias"], segment=d, validate=False,
                                        preload=True)


def gemv_case(model, op, sparsity, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved,
            "floor_us": built.bytes_moved / (bw * 1e9) * 1e6, "copies": len(copies)}
    ref = built.reference()

    def timed(label, fns, nbytes, want=None, **extra):
        err = rel_err(fns[0](), want) if want is not None else None
        for timer, fn in TIMERS.items():
            t = fn(fns, dev)
            us = t["median_us"]
            emit({**base, "variant": label, "timer": timer, "us": us, "p20_us": t["p20_us"], "p80_us": t["p80_us"],
                  "pct_copy_bw": pct_bw(nbytes, bw, us), "rel_err": err, **extra,
                  **{k: t[k] for k in ("replay_once_us", "replay_twice_us") if k in t}})

    timed("triton", [c.variants["triton"] for c in copies], built.bytes_moved, ref)
    timed("triton_preload", [preload_call(c, model, op) for c in copies], built.bytes_moved, ref)
    timed("cublas_dense", [c.variants["torch_dense"] for c in copies], built.dense_bytes)
    if sparsity > 0:
        mats = [gathered(c, op) for c in copies]
        timed("cublas_gathered", [(lambda w=w, x=x: F.linear(x, w)) for w, x in mats], built.bytes_moved)
        timed("own_gathered", [(lambda w=w, x=x: _gemv_triton(w, x)) for w, x in mats], built.bytes_moved)
        del mats


def alone_case(model, op, sparsity, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved, "copies": len(copies),
            "timer": "steady"}
    ref = built.reference()
    tuner, every, _ = tuner_of(op)
    fns = [preload_call(c, model, op) for c in copies]
    try:
        for label, configs in [("tuned", every)] + [(f"alone_{i}", [c]) for i, c in enumerate(every)]:
            use(tuner, configs)
            err = rel_err(fns[0](), ref)
            us = time_steady(fns, dev)["median_us"]
            emit({**base, "variant": label, "us": us, "pct_copy_bw": pct_bw(built.bytes_moved, bw, us),
                  "rel_err": err, "config": str(tuner.best_config)})
    finally:
        use(tuner, every)


def copy_rows(dev, bw, emit) -> None:
    n = 4
    pairs = [(torch.empty(128 << 20, dtype=torch.float16, device=dev).normal_(),
              torch.empty(128 << 20, dtype=torch.float16, device=dev)) for _ in range(n)]
    moved = 2 * pairs[0][0].numel() * 2
    for timer, fn in TIMERS.items():
        t = fn([(lambda s=s, d=d: d.copy_(s)) for s, d in pairs], dev)
        emit({"variant": "copy", "timer": timer, "bytes": moved, "us": t["median_us"],
              "gbps": moved / (t["median_us"] * 1e-6) / 1e9, "pct_copy_bw": pct_bw(moved, bw, t["median_us"])})
    del pairs
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/v13-probe.jsonl")
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N cases only")
    ap.add_argument("--alone", action="store_true", help="every config alone on the cells short of the targets")
    args = ap.parse_args()
    dev, bw = cold_device()
    with probe_log(args.out, dev, bw, probe="v13") as emit:
        if args.alone:
            run_gemv_cases([(m, op, s, False) for m, op, s in ALONE],
                           lambda m, op, s, alone: alone_case(m, op, s, dev, bw, emit), emit)
            return
        copy_rows(dev, bw, emit)
        run_gemv_cases(CASES[: args.cases], lambda m, op, s, alone: gemv_case(m, op, s, dev, bw, emit), emit)


if __name__ == "__main__":
    main()
