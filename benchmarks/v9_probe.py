"""v9 probe: the layer norm folded into the GEMV after it (shadow_kernels.norm_gemv) against the two kernels it
replaces, per call, on the decoder's qkv and fc1 shapes.

For each case (batch 1, fp16, the sweep's data and stream timer: back-to-back calls on copies of the data in one
CUDA graph, PDL and preload as in the decoder):
- ``gemv``: the GEMV alone on a normalised input (what a step would pay with a free norm);
- ``unfused``: ``add_layernorm(x, r)`` then the GEMV (the decode step before session 7);
- ``fused``: ``norm_rows_gemv(x, r)``: the residual add, the norm and the GEMV in one kernel.
Dense cases (s=0) run our dense GEMV (the decoder's ``--dense-gemv triton``); sparse ones gather rows. Each
variant's first copy is checked against the fp32 reference. Rows: results/kernels/h100-v9-probe.jsonl.

``--swiglu``: the Llama SwiGLU gather (gate and up rows of the selected neurons) with the batch-1 loop that loads
the next tile ahead (v9, ``all_configs``) against the plain loop it ran before (``plain_loop``: the configs
without PREFETCH), same run.

    PYTHONPATH=. python benchmarks/v9_probe.py --out runs/v9-probe.jsonl
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench.kernels import rel_err
from bench.results import probe_log
from bench.timing import time_stream
from benchmarks.v7_probe import build_copies, cold_device, run_gemv_cases, use
from models.ops import _gemv_triton
from shadow_kernels import fold_norm, gather_rows, gather_rows_gemv, norm_rows_gemv, norm_rows_gemv_ref
from shadow_kernels.add_norm import add_layernorm

CASES = [(m, op, s, False) for m in ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b") for op in ("qkv", "fc1")
         for s in (0.0, 0.5)]


def variants(t, sparsity, relu, gen):
    """The three variants on one copy of a case's tensors (plus its norm parameters and residual)."""
    w, b, x, idx = t["weight"], t["bias"], t["x"], t["idx"].to(torch.int32)
    E = w.shape[1]
    dev = w.device
    g = (1 + 0.2 * torch.randn(E, generator=gen, device=dev)).half()
    beta = (0.1 * torch.randn(E, generator=gen, device=dev)).half()
    r = torch.randn(E, generator=gen, device=dev).half()
    fold = fold_norm(w, g, beta, b)
    rows = None if sparsity == 0 else idx
    act = "relu" if relu else None

    def gemv(a):
        if rows is None:
            return _gemv_triton(w, a, b, relu=relu)
        return gather_rows_gemv(w, a, rows, b, act, validate=False, preload=True)

    a0 = add_layernorm(x[None], r[None], g, beta)[1][0]

    def unfused():
        return gemv(add_layernorm(x[None], r[None], g, beta)[1][0])

    fused = partial(norm_rows_gemv, w, x, rows, fold, r, act, validate=False, preload=True)
    ref = lambda: norm_rows_gemv_ref(w.float(), (x + r).float(), rows, fold_norm(w.float(), g.float(), beta.float(),
                                                                                  b.float()), None, act)[0]
    return {"gemv": lambda: gemv(a0), "unfused": unfused, "fused": lambda: fused()[0]}, ref


def norm_case(model, op, sparsity, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    gen = torch.Generator(device=dev).manual_seed(7)
    built = [variants(c.tensors, sparsity, op == "fc1", gen) for c in copies]
    nbytes = copies[0].bytes_moved
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": nbytes, "floor_us": nbytes / (bw * 1e9) * 1e6}
    ref = built[0][1]()
    for label in ("gemv", "unfused", "fused"):
        err = rel_err(built[0][0][label](), ref) if label != "gemv" else None
        t = time_stream([v[label] for v, _ in built], dev)
        emit({**base, "variant": label, "us": t["median_us"], "pct_copy_bw": 100 * base["floor_us"] / t["median_us"],
              "rel_err": err, "config": str(gather_rows._rows_gemv_single.best_config)})


def swiglu_case(model, sparsity, dev, bw, emit) -> None:
    copies = build_copies(model, "swiglu", sparsity, dev)
    nbytes = copies[0].bytes_moved
    base = {"model": model, "op": "swiglu", "sparsity": sparsity, "bytes": nbytes,
            "floor_us": nbytes / (bw * 1e9) * 1e6}
    tuner = gather_rows._rows_gemv_single
    every = list(gather_rows._SINGLE_CONFIGS)
    ref = copies[0].reference()
    try:
        for label, configs in (("plain_loop", [c for c in every if "PREFETCH" not in c.kwargs]),
                               ("all_configs", every)):
            use(tuner, configs)
            err = rel_err(copies[0].variants["triton"](), ref)
            t = time_stream([c.variants["triton"] for c in copies], dev)
            emit({**base, "variant": label, "us": t["median_us"],
                  "pct_copy_bw": 100 * base["floor_us"] / t["median_us"], "rel_err": err,
                  "config": str(tuner.best_config)})
    finally:
        use(tuner, every)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/v9-probe.jsonl")
    ap.add_argument("--models", default="opt-1.3b,opt-6.7b,opt-13b,opt-30b", help="comma-separated")
    ap.add_argument("--swiglu", default="", help="comma-separated Llama models for the SwiGLU cases (s=0.5, 0.7)")
    args = ap.parse_args()
    models = args.models.split(",")
    dev, bw = cold_device()
    with probe_log(args.out, dev, bw, probe="v9") as emit:
        run_gemv_cases([c for c in CASES if c[0] in models],
                       lambda m, op, s, alone: norm_case(m, op, s, dev, bw, emit), emit)
        run_gemv_cases([(m, "swiglu", s, False) for m in filter(None, args.swiglu.split(",")) for s in (0.5, 0.7)],
                       lambda m, op, s, alone: swiglu_case(m, s, dev, bw, emit), emit)


if __name__ == "__main__":
    main()
