"""v10 probe: where gather-cols (fc2) loses its time, and the tree sum of the split partials.

Why: the v8 rows of fc2 fit ``time = fixed + bytes / bandwidth`` with the marginal bytes at about the copy
bandwidth and a fixed part of ~12 us (OPT-13B at s = 0, 0.5, 0.7), where our gather-rows kernel on the same
bytes has ~4 us. So the split-K layout streams well; what it adds is at the ends of the launch. This times,
for fc2 cases over several sparsities so that the fixed part can be read off (batch 1, fp16, the sweep's
stream timer, configs tuned on cold data, each variant tuned afresh):
- ``v8``: v8's kernel: one launch, partials summed eight loads at a time, v8's configs;
- ``v10``: v10's default: the tree sum in a second kernel, which lets the kernel after it be scheduled
  before its own wait;
- ``v10_onepass``: the same, summed by the last program of each block instead;
- ``stream_only``: the split launch alone, with the second kernel not launched (wrong output, never
  checked): what the streaming costs without any reduction;
- ``atomic``: fp32 atomics into a zeroed buffer (not bit-reproducible), then the conversion kernel;
- ``v10_preload``: the decoder's call (``preload=True``: index list and first weights read
  before the programmatic-launch wait);
- ``alone_*``: each config alone;
- ``registers``: each config's registers and spills as compiled here, and the programs an SM then holds (the
  launcher splits for OCC programs per SM).
- ``own_gathered`` / ``cublas_gathered`` / ``cublas_dense`` as in the v8 probe.
Each row's ``rel_err`` is its first call against the fp32 reference (``stream_only`` excepted).
The rows of earlier trees of this probe (results/kernels/h100-v10-probe.jsonl, by ``git_commit``) have other
variants: at 5617193 ``v8``/``v10`` were one launch with v8's / the tree sum, ``v8_2launch``/``v10_2launch`` the
same in a second kernel (which then waited before letting the next kernel start), ``v8_preload``, and ``bm32_*``
configs with 32-output pieces; at bcab921 ``v10`` ran register-capped configs and ``v10_2launch_v8cfg`` v8's.

    PYTHONPATH=. python benchmarks/v10_probe.py --out runs/v10-probe.jsonl
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
from models.ops import _gemv_triton
from shadow_kernels import gather_cols, gather_cols_gemv

CASES = [(m, "fc2", s, m == "opt-13b" and s in (0.5, 0.7)) for m, s in (
    ("opt-13b", 0.5), ("opt-13b", 0.7), ("opt-13b", 0.0), ("opt-13b", 0.9), ("opt-30b", 0.5), ("opt-30b", 0.7),
    ("opt-1.3b", 0.0), ("opt-1.3b", 0.5), ("opt-6.7b", 0.0))]
def config_registers(dev, emit) -> None:
    """Registers and spills of every config as this Triton compiles it (the split launch, batch 1)."""
    wt = torch.zeros((256, 512), dtype=torch.float16, device=dev)
    h = torch.zeros((1, 256), dtype=torch.float16, device=dev)
    idx = torch.arange(256, dtype=torch.int32, device=dev)
    part = torch.zeros((64, 512), dtype=torch.float32, device=dev)
    y = torch.zeros((1, 512), dtype=torch.float16, device=dev)
    for label, configs in (("default", list(gather_cols._SINGLE_CONFIGS)),):
        for i, c in enumerate(configs):
            kw = {"PREFETCH": 0, "OCC": 4, **c.kwargs}
            for preload in (False, True):
                k = gather_cols._cols_partial_kernel.warmup(
                    wt, h, idx, idx, wt, part, y, y, 1, 512, 256, 512, 256, 512, 512, 256, 0, grid=(1,),
                    HAS_COUNT=True, HAS_BIAS=True, MODE=1, UPCAST_DOT=False, DOT_IEEE=False, USE_PDL=True,
                    BLOCK_B=1, PRELOAD=preload, SUM_MODE=2, SUM_LOG=5, num_warps=c.num_warps,
                    num_stages=c.num_stages, maxnreg=c.maxnreg, launch_pdl=True, **kw)
                k._init_handles()
                th = 32 * c.num_warps
                emit({"kind": "probe", "variant": "registers", "set": label, "config_index": i, "config": str(c),
                      "preload": preload, "n_regs": k.n_regs, "n_spills": k.n_spills,
                      "resident_per_sm": min(32, 2048 // th, 65536 // max(1, (k.n_regs + 7) // 8 * 8 * th)),
                      "occ": kw["OCC"]})


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def cols_case(model, op, sparsity, alone, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved,
            "floor_us": built.bytes_moved / (bw * 1e9) * 1e6, "selected": int(built.tensors["idx"].numel())}
    ref = built.reference()
    tuner = gather_cols._cols_single
    every = list(gather_cols._SINGLE_CONFIGS)

    def call(c, **kw):
        a = c.tensors
        idx32 = a["idx"].to(torch.int32)
        return lambda: gather_cols_gemv(a["weight_t"], a["h"], idx32, a["bias"], validate=False, **kw)

    def timed(label, sum_mode, configs=None, check=True, **kw):
        use(tuner, configs or every)
        gather_cols._SUM_MODE["mode"] = sum_mode
        try:
            fns = [call(c, **kw) for c in copies]
            err = rel_err(fns[0](), ref) if check else None
            t = time_stream(fns, dev)
        finally:
            gather_cols._SUM_MODE["mode"] = 2
        us = t["median_us"]
        emit({**base, "variant": label, "us": us, "pct_copy_bw": 100 * base["floor_us"] / us, "rel_err": err,
              "config": str(tuner.best_config)})

    timed("v8", 1, onepass=True)  # v8/v9's kernel: one launch, eight loads a round (v8's configs are the default)
    timed("v10", 2)  # the default: tree, second kernel (which lets the next kernel start early)
    timed("v10_onepass", 2, onepass=True)
    timed("v10_preload", 2, preload=True)
    reduce = gather_cols._cols_reduce_kernel
    gather_cols._cols_reduce_kernel = _NoLaunch()
    try:
        timed("stream_only", 2, check=False)
    finally:
        gather_cols._cols_reduce_kernel = reduce
    timed("atomic", 2, deterministic=False)
    if alone:
        for i, cfg in enumerate(every):
            timed(f"alone_{i}", 2, [cfg])
    use(tuner, every)
    t = time_stream([c.variants["torch_dense"] for c in copies], dev)
    us = t["median_us"]
    emit({**base, "variant": "cublas_dense", "us": us, "pct_copy_bw": 100 * base["floor_us"] / us})
    mats = [gathered(c, op) for c in copies]
    for label, fn in (("cublas_gathered", lambda w, x: (lambda: F.linear(x, w))),
                      ("own_gathered", lambda w, x: (lambda: _gemv_triton(w, x)))):
        t = time_stream([fn(w, x) for w, x in mats], dev)
        emit({**base, "variant": label, "us": t["median_us"], "pct_copy_bw": 100 * base["floor_us"] / t["median_us"]})
    del mats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/v10-probe.jsonl")
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N cases only")
    args = ap.parse_args()
    dev, bw = cold_device()
    with probe_log(args.out, dev, bw, probe="v10") as emit:
        config_registers(dev, emit)
        run_gemv_cases(CASES[: args.cases], lambda m, op, s, alone: cols_case(m, op, s, alone, dev, bw, emit), emit)


if __name__ == "__main__":
    main()
