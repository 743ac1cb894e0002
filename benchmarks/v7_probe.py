"""v7 probe: the GEMV config sets (v6 against the prefetching v7 configs), autotuning on cold or L2-hot
data, every config of a few cases timed alone, and the radix-select top-k against torch.topk, in one run.

Rows committed in results/kernels/h100-v7-probe.jsonl (notes/kernels.md, v7). Each GEMV case is a case
of the kernel sweep (bench.kernels.build_case, batch 1, fp16), timed with the sweep's stream timer
(bench.timing.time_stream over copies of the data); the first copy is checked against the reference.
Prints and writes one JSON line per measurement.

    PYTHONPATH=. python benchmarks/v7_probe.py --out runs/v7-probe.jsonl [--quick]
"""

from __future__ import annotations

import argparse
import zlib

import torch

import shadow_kernels as sk
from bench.kernels import Case, _spec, build_case, n_copies, rel_err
from bench.results import probe_log
from bench.timing import copy_bandwidth, time_stream
from shadow_kernels import _common, gather_cols, gather_rows
from shadow_kernels.topk import mask_to_indices, topk_mask

ROWS = gather_rows._rows_gemv_single
COLS = gather_cols._cols_single
SETS = {
    "rows": {"v6": gather_rows._SINGLE_V6, "v7": gather_rows._SINGLE_V7},
    "cols": {"v6": gather_cols._SINGLE_V6, "v7": gather_cols._SINGLE_V7},
}

GEMV_CASES = [  # (model, op, sparsity); every config alone too where marked
    ("opt-13b", "out_proj", 0.5, True), ("opt-13b", "fc2", 0.5, True), ("opt-13b", "qkv", 0.5, True),
    ("opt-13b", "fc1", 0.5, True), ("opt-30b", "out_proj", 0.5, True), ("opt-1.3b", "fc2", 0.0, True),
    ("opt-13b", "out_proj", 0.7, False), ("opt-13b", "fc2", 0.7, False), ("opt-13b", "qkv", 0.7, False),
    ("opt-13b", "fc1", 0.7, False), ("opt-30b", "fc2", 0.5, False), ("opt-30b", "fc2", 0.7, False),
    ("opt-30b", "out_proj", 0.7, False), ("opt-30b", "fc1", 0.5, False), ("opt-30b", "qkv", 0.5, False),
    ("opt-1.3b", "out_proj", 0.0, False), ("opt-1.3b", "fc1", 0.0, False), ("opt-1.3b", "qkv", 0.0, False),
    ("opt-6.7b", "fc2", 0.0, False), ("opt-6.7b", "out_proj", 0.0, False), ("opt-13b", "fc2", 0.0, False),
    ("opt-13b", "out_proj", 0.0, False),
]


def use(tuner, configs) -> None:
    tuner.configs = list(configs)
    tuner.cache.clear()


def build_copies(model, op, sparsity, dev) -> list:
    """A sweep case (batch 1, fp16) and enough copies of its data for the stream timer; the first is checked."""
    spec = _spec(model)
    case = Case(model, op, sparsity, 1)
    gen = torch.Generator(device=dev).manual_seed(zlib.crc32(f"{model}/{op}/{sparsity}".encode()))
    built = build_case(spec, case, torch.float16, dev, gen)
    return [built] + [build_case(spec, case, torch.float16, dev, gen)
                      for _ in range(n_copies(built.bytes_moved, "stream") - 1)]


def cold_device() -> tuple[torch.device, float]:
    """The GPU of the GEMV probes (v8 on) with autotuning on cold data, and its measured copy bandwidth (GB/s)."""
    dev = torch.device("cuda")
    _common.set_autotune_cold(True)
    return dev, copy_bandwidth(dev)["copy_gbps"]


def run_gemv_cases(cases, run, emit) -> None:
    """``run(model, op, sparsity, alone)`` for each case; a case that fails is logged and the probe goes on."""
    for model, op, s, alone in cases:
        try:
            run(model, op, s, alone)
        except Exception as exc:
            emit({"model": model, "op": op, "sparsity": s, "error": repr(exc)[:500]})
        torch.cuda.empty_cache()


def gemv_case(model, op, sparsity, alone, dev, bw, emit) -> None:
    copies = build_copies(model, op, sparsity, dev)
    built = copies[0]
    kind = "cols" if op in ("fc2", "out_proj") else "rows"
    tuner = COLS if kind == "cols" else ROWS
    sets = SETS[kind]
    base = {"model": model, "op": op, "sparsity": sparsity, "bytes": built.bytes_moved,
            "floor_us": built.bytes_moved / (bw * 1e9) * 1e6}
    ref = built.reference()

    def timed(label, configs, cold):
        use(tuner, configs)
        _common.set_autotune_cold(cold)
        err = rel_err(built.variants["triton"](), ref)
        t = time_stream([c.variants["triton"] for c in copies], dev)
        us = t["median_us"]
        emit({**base, "variant": label, "us": us, "pct_copy_bw": 100 * base["floor_us"] / us, "rel_err": err,
              "config": str(tuner.best_config)})
        return us

    timed("v6_hot", sets["v6"], False)  # what v6 ran
    if alone:
        timed("v6_cold", sets["v6"], True)
        timed("v7_cold", sets["v7"], True)
        timed("both_hot", sets["v7"] + sets["v6"], False)
    timed("both_cold", sets["v7"] + sets["v6"], True)  # what v7 runs
    t = time_stream([c.variants["torch_dense"] for c in copies], dev)
    emit({**base, "variant": "cublas_dense", "us": t["median_us"]})
    if alone:
        for name, configs in sets.items():
            for i, cfg in enumerate(configs):
                try:
                    timed(f"alone_{name}_{i}", [cfg], True)
                except Exception as exc:  # a config that does not compile for this shape
                    emit({**base, "variant": f"alone_{name}_{i}", "error": repr(exc)[:300]})
    use(tuner, sets["v7"] + sets["v6"])
    _common.set_autotune_cold(True)


def topk_case(model, policy, sparsity, dev, emit) -> None:
    spec = _spec(model)
    L, n = spec.n_layers - 1, spec.ffn
    gen = torch.Generator(device=dev).manual_seed(1)
    kk = round((1 - sparsity) * n) if policy == "local" else round((1 - sparsity) * n) * L
    copies = [torch.randn((L, n), generator=gen, device=dev) for _ in range(8)]
    k_max = kk if policy == "local" else min(n, kk)

    def old(s):
        return lambda: mask_to_indices(topk_mask(s, kk, dim=-1 if policy == "local" else None, validate=False),
                                       k_max, validate=False)

    def new(s):
        return lambda: sk.topk_indices(s, kk, policy, validate=False)

    a, b = new(copies[0])(), sk.topk_indices_ref(copies[0], kk, policy)
    same = bool(torch.equal(a.idx, b.idx) and torch.equal(a.count, b.count))
    for label, make in (("torch_topk_mask", old), ("radix", new)):
        t = time_stream([make(s) for s in copies], dev)
        emit({"model": model, "op": f"topk_{policy}", "sparsity": sparsity, "scores": [L, n], "k": kk,
              "variant": label, "us": t["median_us"], "radix_equals_reference": same})


def profile_topk(dev) -> None:
    """Per-kernel device time of one radix select (OPT-13B global neuron scores), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    scores = torch.randn((39, 20480), device=dev)
    k = 10240 * 39
    for _ in range(3):
        sk.topk_indices(scores, k, "global", validate=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            sk.topk_indices(scores, k, "global", validate=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/v7-probe.jsonl")
    ap.add_argument("--quick", action="store_true", help="the first four GEMV cases only")
    ap.add_argument("--no-gemv", action="store_true", help="top-k cases only")
    ap.add_argument("--no-alone", action="store_true", help="skip timing every config alone")
    ap.add_argument("--profile-topk", action="store_true", help="only the per-kernel times of one radix select")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.profile_topk:
        profile_topk(dev)
        return
    bw = copy_bandwidth(dev)["copy_gbps"]
    with probe_log(args.out, dev, bw) as emit:
        for model in ("opt-1.3b", "opt-13b", "opt-30b"):
            for policy in ("global", "local"):
                topk_case(model, policy, 0.5, dev, emit)
        run_gemv_cases(GEMV_CASES[: 0 if args.no_gemv else 4 if args.quick else None],
                       lambda m, op, s, alone: gemv_case(m, op, s, alone and not args.no_alone, dev, bw, emit), emit)


if __name__ == "__main__":
    main()
