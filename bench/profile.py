"""A short, eager run of every NVTX range for profilers (``tox -e profile``).

    python -m bench.profile [--model tiny-llama] [--mode shadowllm] [--steps 8] [--nsys runs/profile]

Decoding runs without a CUDA graph so that every step emits its ranges (inside a graph they are recorded
once, at capture): ``prefill``, ``decode``, ``predictor``, ``layer{i}.attn``, ``layer{i}.mlp``, all in the
domain ``shadowbench``. With ``--nsys OUT`` the run is wrapped in ``nsys profile -t cuda,nvtx`` when Nsight
Systems is on the PATH (report ``OUT.nsys-rep``); where it is not, the run is recorded by the PyTorch profiler
instead and written as a Chrome / Perfetto trace ``OUT.trace.json`` (open it in ui.perfetto.dev or
chrome://tracing), which carries the same ranges as ``shadowbench:<range>`` (``models.nvtx``). Nsight Compute can show
that the ranges are emitted: ``ncu --nvtx --nvtx-include "shadowbench@decode/" python -m bench.profile``
profiles only kernels launched inside ``decode`` (none when the range is missing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import torch

from models.generate import Generator
from models.modes import mode_variants
from models.nvtx import DOMAIN, backend

from .kernels import DTYPES
from .latency import LatencyCase, build_model, mode_of


def run(model_name, mode_name, sparsity, steps, prompt_len=16, trace=None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name, DTYPES["fp16" if device.type == "cuda" else "fp32"], device)
    policy, granularity = mode_variants(mode_name, timing=True)[0]
    case = LatencyCase(model_name, mode_name, sparsity, policy, granularity, steps)
    gen = Generator(model, mode_of(case, model.cfg), max_len=prompt_len + steps, cuda_graph=False)
    prompt = torch.randint(0, model.cfg.vocab, (1, prompt_len))
    if trace is None:
        out = gen.generate(prompt, steps)
        return {"device": str(device), "steps": len(out.token_ms), "layers": model.cfg.n_layers, "nvtx": backend()}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        out = gen.generate(prompt, steps)
    os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
    prof.export_chrome_trace(trace)
    ranges = sorted({e.name for e in prof.events() if e.name.startswith(f"{DOMAIN}:")})
    return {"device": str(device), "steps": len(out.token_ms), "layers": model.cfg.n_layers,
            "nvtx": f"{backend()} + torch.profiler", "trace": trace, "ranges": ranges}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--mode", default="shadowllm", choices=["dense", "static", "dejavu", "shadowllm"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nsys", metavar="OUT", help="wrap the run in Nsight Systems, report written to OUT.nsys-rep")
    args = p.parse_args(argv)
    trace = None
    if args.nsys and not os.environ.get("SHADOWBENCH_UNDER_NSYS"):
        nsys = shutil.which("nsys")
        if nsys is None:
            trace = f"{args.nsys}.trace.json"
            print(f"nsys (Nsight Systems) is not on the PATH here: recording the same workload with the PyTorch "
                  f"profiler instead, as a Chrome / Perfetto trace ({trace}).", file=sys.stderr)
        else:
            rest = argv if argv is not None else sys.argv[1:]
            cmd = [nsys, "profile", "-t", "cuda,nvtx", "-o", args.nsys, "--force-overwrite", "true",
                   sys.executable, "-m", "bench.profile", *rest]
            print(" ".join(cmd), file=sys.stderr)
            return subprocess.call(cmd, env={**os.environ, "SHADOWBENCH_UNDER_NSYS": "1"})
    info = run(args.model, args.mode, args.sparsity, args.steps, trace=trace)
    ranges = "prefill, decode, predictor, layer{0.." + str(info["layers"] - 1) + "}.attn/.mlp"
    print(f"{args.model} {args.mode} s={args.sparsity}: {info['steps']} eager decode steps on {info['device']}; "
          f"NVTX ranges {ranges} in domain {DOMAIN!r} via {info['nvtx']}")
    if trace is not None:
        print(f"trace with {len(info['ranges'])} distinct shadowbench ranges: {trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
