"""v12 probe: the streaming row kernel against v7-v11's one-block-a-program kernel, per call, in one run.

For the gather-rows cases of issue #2's table and the dense shapes of OPT-1.3B (batch 1, fp16, the sweep's stream
timer, every config set tuned on cold data in this run):
- ``v11`` / ``v11_preload``: the one-block-a-program kernel (``set_rows_stream(False)``), called as the sweep calls
  it (``preload=False``) and as the decoder does (``preload=True``: index list, count, bias and first weights read
  before the programmatic-launch wait);
- ``v12`` / ``v12_preload``: the streaming kernel (``_rows_stream_kernel``), the same two ways;
- ``own_gathered_v11`` / ``own_gathered_v12``: each kernel on the selected rows copied to one contiguous matrix
  (no index list), called as the decoder's dense GEMV (``preload=True``). Until v11, the v8 probe's
  ``own_gathered`` was this with v11's kernel, and the gather rows beside it ran with ``preload=False``: part of the
  1-2 us "cost of the gather" it showed was the preload;
- ``cublas_gathered``: cuBLAS on that matrix;
- ``alone_<i>``: where marked, every streaming config alone (``preload=True``);
- ``registers``: each streaming config's registers and spills as compiled here, and the programs an SM holds
  against the OCC it launches.
Each row's ``rel_err`` is its first call against the fp32 reference.

    PYTHONPATH=. python benchmarks/v12_probe.py --out runs/v12-probe.jsonl
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.kernels import rel_err
from bench.results import probe_log
from bench.timing import time_stream
from benchmarks.v7_probe import build_copies, cold_device, run_gemv_cases, use
from benchmarks.v8_probe import gathered
from shadow_kernels import gather_rows, gather_rows_gemv
from shadow_kernels.gather_rows import launch_rows_gemv, set_rows_stream

CASES = [(m, op, s, alone) for m, op, s, alone in (
    ("opt-13b", "fc1", 0.7, True), ("opt-13b", "qkv", 0.7, True), ("opt-13b", "fc1", 0.5, False),
    ("opt-13b", "qkv", 0.5, False), ("opt-30b", "fc1", 0.5, False), ("opt-30b", "fc1", 0.7, False),
    ("opt-30b", "qkv", 0.5, False), ("opt-30b", "qkv", 0.7, False), ("opt-13b", "fc1", 0.9, False),
    ("opt-1.3b", "fc1", 0.0, False), ("opt-1.3b", "qkv", 0.0, False), ("opt-1.3b", "fc1", 0.5, False))]
TUNERS = {False: gather_rows._rows_gemv_single, True: gather_rows._rows_stream}
CONFIGS = {False: list(gather_rows._SINGLE_CONFIGS), True: list(gather_rows._STREAM_CONFIGS)}


def config_registers(dev, emit) -> None:
    """Registers and spills of every streaming config (the plain gather, batch 1), and the programs an SM holds."""
    w = torch.zeros((512, 4096), dtype=torch.float16, device=dev)
    x = torch.zeros((1, 4096), dtype=torch.float16, device=dev)
    idx = torch.arange(256, dtype=torch.int32, device=dev)
    y = torch.zeros((1, 256), dtype=torch.float16, device=dev)
    for i, c in enumerate(gather_rows._STREAM_CONFIGS):
        for preload in (False, True):
            k = gather_rows._rows_stream_kernel.warmup(
                w, x, idx, w, w, y, x, x, y, x, 4096, 256, 0.0, 4096, 256, grid=(1,),
                HAS_IDX=True, HAS_BIAS=True, HAS_COUNT=False, RELU=True, USE_PDL=True, PRELOAD=preload, NORM=0,
                HAS_RES=False, num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=True, **c.kwargs)
            k._init_handles()
            th = 32 * c.num_warps
            emit({"kind": "probe", "variant": "registers", "config_index": i, "config": str(c), "preload": preload,
                  "n_regs": k.n_regs, "n_spills": k.n_spills,
                  "resident_per_sm": min(32, 2048 // th, 65536 // max(1, (k.n_regs + 7) // 8 * 8 * th)),
                  "occ": c.kwargs["OCC"]})


def rows_case(model, op, sparsity, alone, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved,
            "floor_us": built.bytes_moved / (bw * 1e9) * 1e6, "selected": int(built.tensors["idx"].numel())}
    ref = built.reference()
    relu = op == "fc1"

    def call(c, preload):
        a = c.tensors
        idx32 = a["idx"].to(torch.int32)
        return lambda: gather_rows_gemv(a["weight"], a["x"], idx32, a["bias"], "relu" if relu else None,
                                        validate=False, preload=preload)

    def timed(label, stream, fns, want, configs=None, **extra):
        set_rows_stream(stream)
        tuner = TUNERS[stream]
        use(tuner, configs or CONFIGS[stream])
        try:
            err = rel_err(fns[0](), want)
            t = time_stream(fns, dev)
        finally:
            set_rows_stream(True)
        us = t["median_us"]
        emit({**base, "variant": label, "us": us, "pct_copy_bw": 100 * base["floor_us"] / us, "rel_err": err,
              "config": str(tuner.best_config), **extra})

    for stream, name in ((False, "v11"), (True, "v12")):
        timed(name, stream, [call(c, False) for c in copies], ref)
        timed(f"{name}_preload", stream, [call(c, True) for c in copies], ref)
    if alone:
        for i, cfg in enumerate(CONFIGS[True]):
            timed(f"alone_{i}", True, [call(c, True) for c in copies], ref, [cfg])
    mats = [gathered(c, op) for c in copies]
    w0, x0 = mats[0]
    b = built.tensors["bias"].float().index_select(0, built.tensors["idx"].long())
    y0 = F.linear(x0.float(), w0.float()) + b
    want = y0.relu() if relu else y0  # the gathered matrix with the case's bias is the same work

    def own(w, x, bias):
        return lambda: launch_rows_gemv(w, x[None], None, bias, None, relu, w.dtype, preload=True)[0]

    biases = [c.tensors["bias"].index_select(0, c.tensors["idx"].long()) for c in copies]
    for stream, name in ((False, "own_gathered_v11"), (True, "own_gathered_v12")):
        timed(name, stream, [own(w, x, bb) for (w, x), bb in zip(mats, biases, strict=True)], want)
    t = time_stream([(lambda w=w, x=x: F.linear(x, w)) for w, x in mats], dev)
    emit({**base, "variant": "cublas_gathered", "us": t["median_us"],
          "pct_copy_bw": 100 * base["floor_us"] / t["median_us"]})
    del mats, biases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/v12-probe.jsonl")
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N cases only")
    ap.add_argument("--no-alone", action="store_true")
    args = ap.parse_args()
    dev, bw = cold_device()
    with probe_log(args.out, dev, bw, probe="v12") as emit:
        config_registers(dev, emit)
        run_gemv_cases(CASES[: args.cases],
                       lambda m, op, s, alone: rows_case(m, op, s, alone and not args.no_alone, dev, bw, emit), emit)


if __name__ == "__main__":
    main()
