"""v8 probe: the GEMV changes of v8 against v7 in one run, and what a GEMV reaches on the same bytes.

For each case of the kernel sweep (bench.kernels.build_case, batch 1, fp16, the sweep's stream timer):
- ``v7``: gather-cols / gather-rows with v7's configs and v7's sum of the split partials (one load at a time);
- ``v8_cols``: gather-cols with v8's sum (eight partials loaded at once); the kernel of fc2;
- ``v8_segments`` (out_proj): gather_segments_gemv over the natural out_proj weight, whole heads of each output
  row (the decoder's out_proj from v8 on); with ``alone``, every config of it alone too;
- ``cublas_dense``: torch on the whole weight;
- ``cublas_gathered`` / ``own_gathered``: cuBLAS and our dense GEMV on the selected weights copied to one
  contiguous matrix in the layout a GEMV reads best (rows = outputs): what a GEMV reaches on exactly the
  bytes the gather must read, without any gather (a bound for the gather at that size, not a variant of it).
Every variant's first copy is checked against the fp32 reference (``rel_err``). All autotuning is on cold
data (v7's default). Rows committed in results/kernels/h100-v8-probe.jsonl (notes/kernels.md, v8). The first
run (commit ac69855) also timed configs that read two tiles ahead and gather-cols with 512-1024-wide row
pieces, each alone: slower everywhere, removed after it.

    PYTHONPATH=. python benchmarks/v8_probe.py --out runs/v8-probe.jsonl [--quick]
"""

from __future__ import annotations

import argparse

import torch.nn.functional as F

from bench.kernels import rel_err
from bench.results import probe_log
from bench.timing import time_stream
from benchmarks.v7_probe import build_copies, cold_device, run_gemv_cases, use
from models.ops import _gemv_triton
from shadow_kernels import gather_cols, gather_rows, gather_segments

TUNERS = {"rows": gather_rows._rows_gemv_single, "cols": gather_cols._cols_single,
          "segments": gather_segments._segments_single}
V7 = {"rows": gather_rows._SINGLE_V7 + gather_rows._SINGLE_V6, "cols": gather_cols._SINGLE_V7 + gather_cols._SINGLE_V6}

CASES = [  # (model, op, sparsity, every segments config alone)
    ("opt-13b", "out_proj", 0.5, True), ("opt-30b", "out_proj", 0.5, True), ("opt-1.3b", "out_proj", 0.0, True),
    ("opt-13b", "out_proj", 0.7, False), ("opt-30b", "out_proj", 0.7, False), ("opt-6.7b", "out_proj", 0.0, False),
    ("opt-13b", "out_proj", 0.0, False), ("opt-6.7b", "out_proj", 0.5, False), ("opt-1.3b", "out_proj", 0.5, False),
    ("opt-13b", "fc2", 0.5, False), ("opt-13b", "fc2", 0.7, False), ("opt-30b", "fc2", 0.5, False),
    ("opt-30b", "fc2", 0.7, False), ("opt-1.3b", "fc2", 0.0, False), ("opt-6.7b", "fc2", 0.0, False),
    ("opt-13b", "fc2", 0.0, False), ("opt-13b", "fc1", 0.5, False), ("opt-13b", "fc1", 0.7, False),
    ("opt-13b", "qkv", 0.5, False), ("opt-13b", "qkv", 0.7, False), ("opt-30b", "fc1", 0.5, False),
    ("opt-30b", "fc1", 0.7, False), ("opt-30b", "qkv", 0.5, False), ("opt-30b", "qkv", 0.7, False),
]


def gathered(built, op):
    """The selected weights as one contiguous [outputs, inputs] matrix, and the input vector."""
    a = built.tensors
    if op in ("fc2", "out_proj"):  # y = h @ wt[idx]: rows of W = columns of wt[idx]
        return a["weight_t"].index_select(0, a["idx"].long()).T.contiguous(), a["h"]
    return a["weight"].index_select(0, a["idx"].long()).contiguous(), a["x"]


def gemv_case(model, op, sparsity, alone, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    kind = "cols" if op in ("fc2", "out_proj") else "rows"
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved,
            "floor_us": built.bytes_moved / (bw * 1e9) * 1e6}
    ref = built.reference()

    def timed(label, variant, tuner, configs, grouped=True):
        use(tuner, configs)
        gather_cols._SUM_MODE["mode"] = 1 if grouped else 0
        try:
            err = rel_err(built.variants[variant](), ref)
            t = time_stream([c.variants[variant] for c in copies], dev)
        finally:
            gather_cols._SUM_MODE["mode"] = 2
        us = t["median_us"]
        emit({**base, "variant": label, "us": us, "pct_copy_bw": 100 * base["floor_us"] / us, "rel_err": err,
              "config": str(tuner.best_config)})

    own = "triton_cols" if op == "out_proj" else "triton"
    timed("v7", own, TUNERS[kind], V7[kind], grouped=False)
    if kind == "cols":
        timed("v8_cols", own, TUNERS[kind], V7[kind])
    if op == "out_proj":
        seg = TUNERS["segments"]
        every = list(gather_segments._SINGLE_CONFIGS)
        timed("v8_segments", "triton", seg, every)
        if alone:
            for i, cfg in enumerate(every):
                timed(f"alone_segments_{i}", "triton", seg, [cfg])
        use(seg, every)
    use(TUNERS[kind], V7[kind])
    t = time_stream([c.variants["torch_dense"] for c in copies], dev)
    emit({**base, "variant": "cublas_dense", "us": t["median_us"]})
    mats = [gathered(c, op) for c in copies]
    # the gathered matrix is the same work: with the case's bias (and fc1's ReLU) it gives the reference
    w0, x0 = mats[0]
    b = built.tensors["bias"].float()
    y0 = F.linear(x0.float(), w0.float()) + (b.index_select(0, built.tensors["idx"].long()) if kind == "rows" else b)
    err = rel_err(y0.relu() if op == "fc1" else y0, ref)
    for label, fn in (("cublas_gathered", lambda w, x: (lambda: F.linear(x, w))),
                      ("own_gathered", lambda w, x: (lambda: _gemv_triton(w, x)))):
        t = time_stream([fn(w, x) for w, x in mats], dev)
        emit({**base, "variant": label, "us": t["median_us"], "pct_copy_bw": 100 * base["floor_us"] / t["median_us"],
              "gathered_rel_err": err})
    del mats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/v8-probe.jsonl")
    ap.add_argument("--quick", action="store_true", help="the out_proj cases only")
    ap.add_argument("--no-alone", action="store_true", help="skip timing every segments config alone")
    args = ap.parse_args()
    dev, bw = cold_device()
    with probe_log(args.out, dev, bw, probe="v8") as emit:
        run_gemv_cases(CASES[: 9 if args.quick else None],
                       lambda m, op, s, alone: gemv_case(m, op, s, alone and not args.no_alone, dev, bw, emit), emit)


if __name__ == "__main__":
    main()
