"""Does programmatic dependent launch (shadow_kernels.pdl) shorten a chain of GEMV kernels in one CUDA graph?

A chain of MLP layers, x -> relu(fc1 x) -> fc2 h -> x, every GEMV the gather-rows kernel over all rows
(dense; fc2 in its natural [E, 4E] layout), timed as one graph replay after an L2 flush, with PDL off and
on; cuBLAS (F.linear) runs the same chain for reference. Prints one JSON line per case.

    python benchmarks/pdl_probe.py [--shapes 2048x24,5120x40]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.timing import copy_bandwidth, time_op
from shadow_kernels.gather_rows import launch_rows_gemv


def probe(E: int, L: int, bw: float, dev: torch.device) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    fc1 = [torch.randn(4 * E, E, device=dev, generator=g).mul_(E**-0.5).half() for _ in range(L)]
    fc2 = [torch.randn(E, 4 * E, device=dev, generator=g).mul_((4 * E) ** -0.5).half() for _ in range(L)]
    x0 = torch.randn(1, E, device=dev, generator=g).half()

    def chain(pdl):
        def run():
            x = x0
            for w1, w2 in zip(fc1, fc2, strict=True):
                h = launch_rows_gemv(w1, x, None, None, None, True, torch.float16, pdl=pdl)
                x = launch_rows_gemv(w2, h, None, None, None, False, torch.float16, pdl=pdl)
            return x
        return run

    def cublas():
        x = x0
        for w1, w2 in zip(fc1, fc2, strict=True):
            x = F.linear(F.linear(x, w1).relu_(), w2)
        return x

    variants = {"triton_pdl_off": chain(False), "triton_pdl_on": chain(True), "cublas": cublas}
    out = {name: fn() for name, fn in variants.items()}
    ref = out["cublas"].float()
    row = {"embed": E, "layers": L, "kernels": 2 * L, "copy_gbps": bw,
           "floor_us": 2 * L * 4 * E * E * 2 / (bw * 1e9) * 1e6,
           "pdl_equal_bits": bool(torch.equal(out["triton_pdl_off"], out["triton_pdl_on"])),
           "rel_err_vs_cublas": float((out["triton_pdl_on"].float() - ref).norm() / ref.norm())}
    for name, fn in variants.items():
        row[name + "_us"] = time_op(fn, dev)["median_us"]
    row["pdl_gain_per_kernel_us"] = (row["triton_pdl_off_us"] - row["triton_pdl_on_us"]) / (2 * L)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2048x24,5120x40", help="EMBEDxLAYERS, comma-separated")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["copy_gbps"]
    for shape in args.shapes.split(","):
        E, L = (int(v) for v in shape.split("x"))
        print(json.dumps(probe(E, L, bw, dev)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
