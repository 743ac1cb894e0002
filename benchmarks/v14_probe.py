"""v14 probe: gather-cols' reduction and split under the steady timer, and every fc2/out_proj config alone over the
sweep's batch-1 grid (the data for a pinned per-device table).

Two parts (``--part``), both batch 1, fp16, the decoder's call (``preload=True``), ``bench.timing.time_steady``:

- ``reduce``: gather-cols (fc2) with the reduction it ships (``default``: split launch + a second kernel), the
  one-launch finisher (``onepass``), fp32 atomics (``atomic``), and a few configs each at 0.5-3x the split that
  ``choose_split`` gives it (``cfg<i>_x<f>``). v10 chose the second kernel under the stream timer, which spread a
  replay's fixed costs over 4-13 calls; the split (at most OCC programs an SM, one wave) was chosen with it too.
- ``table``: every config of gather-cols (fc2) and gather-segments (out_proj) alone (``alone_<i>``) and the
  autotuner's pick (``tuned``; pinned tables off) at every model and sparsity of the sweep, with the autotune key
  of each case (``key``): ``python -m bench.pinned`` turns the rows into ``shadow_kernels/tuned/h100-steady.json``.
  v13: between two runs the cold autotuner's choice moved OPT-6.7B fc2 s=0 from 47.7 to 55.7 us a call.

    PYTHONPATH=. python benchmarks/v14_probe.py --part reduce --out runs/v14-probe.jsonl
    PYTHONPATH=. python benchmarks/v14_probe.py --part table --models opt-1.3b,opt-6.7b --out runs/v14-table.jsonl
"""

from __future__ import annotations

import argparse

import torch

from bench.kernels import rel_err
from bench.results import probe_log
from bench.timing import time_steady
from benchmarks.v7_probe import build_copies, cold_device, run_gemv_cases, use
from benchmarks.v13_probe import pct_bw, preload_call, tuner_of
from shadow_kernels import gather_cols_gemv, tuned
from shadow_kernels.gather_cols import choose_split

REDUCE = [("opt-13b", "fc2", 0.5), ("opt-13b", "fc2", 0.7), ("opt-13b", "fc2", 0.9), ("opt-30b", "fc2", 0.5),
          ("opt-30b", "fc2", 0.7), ("opt-1.3b", "fc2", 0.0), ("opt-6.7b", "fc2", 0.0), ("opt-13b", "fc2", 0.0)]
FACTORS = (0.5, 1.0, 1.5, 2.0, 3.0)
MODELS = ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b")
SPARSITY = (0.0, 0.5, 0.7, 0.9)


def config_dict(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _base(model, op, sparsity, built, copies) -> dict:
    return {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved, "copies": len(copies),
            "timer": "steady", "call": "preload"}


def reduce_case(model, op, sparsity, dev, bw, emit, top) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    base = _base(model, op, sparsity, built, copies)
    ref = built.reference()
    tuner, every, _ = tuner_of(op)
    n_sel = built.tensors["idx"].shape[0]
    M = built.tensors["weight_t"].shape[1]
    idx32 = [c.tensors["idx"].to(torch.int32) for c in copies]

    def call(i, **kw):
        a = copies[i].tensors
        return lambda: gather_cols_gemv(a["weight_t"], a["h"], idx32[i], a["bias"], validate=False, preload=True,
                                        **kw)

    def timed(label, **kw):
        fns = [call(i, **kw) for i in range(len(copies))]
        err = rel_err(fns[0](), ref)
        us = time_steady(fns, dev)["median_us"]
        emit({**base, "variant": label, "us": us, "pct_copy_bw": pct_bw(built.bytes_moved, bw, us),
              "rel_err": err, "config": config_dict(tuner.best_config) if tuner.best_config else None,
              "split": kw.get("split"), **{k: v for k, v in kw.items() if k != "split"}})

    try:
        use(tuner, every)
        timed("default")
        timed("onepass", onepass=True)
        timed("atomic", deterministic=False)
        for i in top:
            c = every[i]
            use(tuner, [c])
            s0 = choose_split(n_sel, M, c.kwargs["BLOCK_M"], dev, c.kwargs.get("OCC", 4))
            for f in FACTORS:
                timed(f"cfg{i}_x{f:g}", split=max(1, round(s0 * f)))
    finally:
        use(tuner, every)


def table_case(model, op, sparsity, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    base = _base(model, op, sparsity, built, copies)
    ref = built.reference()
    tuner, every, keys = tuner_of(op)
    fns = [preload_call(c, model, op) for c in copies]
    key = None

    def timed(label, configs, **extra):
        nonlocal key
        use(tuner, configs)
        err = rel_err(fns[0](), ref)
        if key is None and tuner.cache:  # the autotune key of the case, from the first (tuned) call
            key = dict(zip(keys, next(iter(tuner.cache))[: len(keys)], strict=True))
        us = time_steady(fns, dev)["median_us"]
        emit({**base, "variant": label, "us": us, "pct_copy_bw": pct_bw(built.bytes_moved, bw, us), "rel_err": err,
              "config": config_dict(tuner.best_config if len(configs) > 1 else configs[0]), "key": key, **extra})

    try:
        timed("tuned", every, kernel="cols_single" if op == "fc2" else "segments_single", dtype="torch.float16")
        for i, c in enumerate(every):
            timed(f"alone_{i}", [c])
    finally:
        use(tuner, every)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("reduce", "table"), required=True)
    ap.add_argument("--out", default="runs/v14-probe.jsonl")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ops", default="fc2,out_proj")
    ap.add_argument("--top", default="15,10,1,7", help="reduce: the configs (indices) timed at other splits")
    args = ap.parse_args()
    dev, bw = cold_device()
    tuned.set_pinned(False)
    with probe_log(args.out, dev, bw, probe="v14", part=args.part) as emit:
        if args.part == "reduce":
            top = [int(i) for i in args.top.split(",") if i]
            run_gemv_cases([(m, op, s, False) for m, op, s in REDUCE],
                           lambda m, op, s, _: reduce_case(m, op, s, dev, bw, emit, top), emit)
            return
        models = [m for m in args.models.split(",") if m]
        ops = [o for o in args.ops.split(",") if o]
        run_gemv_cases([(m, op, s, False) for m in models for op in ops for s in SPARSITY],
                       lambda m, op, s, _: table_case(m, op, s, dev, bw, emit), emit)


if __name__ == "__main__":
    main()
