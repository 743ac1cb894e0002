"""Where the time of one decode step goes: GPU time per kernel, from torch.profiler over eager steps.

    python -m bench.profile_step --model opt-13b --mode shadowllm --sparsity 0.5 [--granularity token]

Kernel durations are the same eagerly and in the captured graph; the graph only removes the launch
gaps. The table divides each kernel's total by the number of steps, and the last lines compare the
sum of kernel times with the graph-replayed step, so the gap between them is launch/idle time.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from models.generate import Generator

from .kernels import DTYPES
from .latency import LatencyCase, build_model, mode_of


def profile(model_name, mode_name, sparsity, policy, granularity, *, prompt_len=128, steps=20, dtype="fp16",
            top=25) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name, DTYPES[dtype], device)
    case = LatencyCase(model_name, mode_name, sparsity, policy, granularity, steps)
    prompt = torch.randint(0, model.cfg.vocab, (1, prompt_len))
    lines = []
    graph = Generator(model, mode_of(case, model.cfg), max_len=prompt_len + steps + 8)
    graph.generate(prompt, steps)
    step_ms = statistics.median(graph.generate(prompt, steps).token_ms)
    del graph
    eager = Generator(model, mode_of(case, model.cfg), max_len=prompt_len + steps + 8, cuda_graph=False)
    eager.generate(prompt, 4)
    eager.prefill(prompt)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            eager.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total_us = sum(e.device_time_total for e in events) / steps
    lines.append(f"{model_name} {mode_name} s={sparsity} policy={policy} granularity={granularity}: "
                 f"{device}, {steps} eager steps profiled")
    lines.append(f"{'us/step':>9} {'calls/step':>10} {'share':>6}  kernel")
    for e in events[:top]:
        per = e.device_time_total / steps
        lines.append(f"{per:>9.1f} {e.count / steps:>10.1f} {per / total_us:>6.1%}  {e.key[:110]}")
    n_kernels = sum(e.count for e in events) / steps
    lines.append(f"sum of kernel time {total_us / 1e3:.3f} ms/step over {n_kernels:.0f} kernels; graph-replayed "
                 f"step {step_ms:.3f} ms (gap {step_ms - total_us / 1e3:.3f} ms)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--mode", default="dense")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--policy", default=None)
    p.add_argument("--granularity", default=None)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    print(profile(args.model, args.mode, args.sparsity, args.policy, args.granularity, steps=args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
