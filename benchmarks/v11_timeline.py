"""Where a graph-replayed decode step's time goes, kernel by kernel, and an A/B of v11's decoder changes.

The timeline: ``torch.profiler`` (CUPTI) over replays of the captured step records every kernel's start and end
on the device, so with programmatic dependent launch the overlap of a kernel with the ones before it shows. Each
kernel's *advance* is how far it moved the end of the step's work: its end minus the latest end before it
(0 when it finished inside another's span). The advances of a step sum to its span, so they say which links of
the chain the step waits on. Kernels are grouped by their place in a layer (from each layer's attention kernel)
and name; CUPTI's own cost shows as the span against the unprofiled step time.

The A/B (one process, variants alternated ``--repeats`` times, each a fresh generator over the same weights):
- ``v10``: the decoder as at the end of session 8;
- ``attn``: + decode attention reads the cache before its PDL wait (the split form, ``preload=True``);
- ``lm``: + with the own dense GEMV, the final norm folded into the LM head's GEMV (our kernel, not cuBLAS);
- ``s9a``: both;
- ``tile``: + one preloaded launch where the whole cache fits one tile (OPT-1.3B: 256 positions x 64);
- ``greedy``: + argmax, token write and position advance as two short kernels (``shadow_kernels.greedy``);
- ``all``: + the embedding lookups and add as one kernel (``shadow_kernels.embed``): the v11 decoder.

    PYTHONPATH=. python benchmarks/v11_timeline.py --models opt-1.3b --modes dense --dense-gemv triton \\
        --out runs/v11-timeline.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from dataclasses import replace

import torch

from bench.latency import LatencyCase, build_mode, build_model
from bench.results import probe_log
from bench.timing import copy_bandwidth
from models.generate import Generator
from models.ops import TRITON
from shadow_kernels.decode_attention import _ATTN, decode_attention

FEATURES = ("attn_preload", "lm_fold", "one_tile", "greedy", "embed")
VARIANTS = {"v10": (), "attn": ("attn_preload",), "lm": ("lm_fold",), "s9a": ("attn_preload", "lm_fold"),
            "tile": ("attn_preload", "lm_fold", "one_tile"),
            "greedy": ("attn_preload", "lm_fold", "one_tile", "greedy"), "all": FEATURES}


_TILE = _ATTN["preload_tile"]


def generator(model, case, variant, predictor_dtype, prompt_len):
    on = VARIANTS[variant]
    ops = TRITON
    if "attn_preload" not in on:
        ops = replace(ops, attention=decode_attention)
    if "greedy" not in on:
        ops = replace(ops, greedy=None)
    if "embed" not in on:
        ops = replace(ops, embed=None)
    _ATTN["preload_tile"] = _TILE if "one_tile" in on else 0
    model._folds_key = None  # rebuild the folds (an earlier variant may have dropped the LM head's)
    model.norm_folds()
    if "lm_fold" not in on:
        model._final_fold = None  # stays so until a weight changes (the folds' key)
    mode = build_mode(case, model.cfg, predictor_dtype=predictor_dtype)
    return Generator(model, mode, max_len=prompt_len + case.gen_len, backend=ops)


def kernel_events(prof) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as fh:
            trace = json.load(fh)
    ev = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    ev.sort(key=lambda e: e["ts"])
    return ev


def short(name: str) -> str:
    for cut in ("<", "("):
        name = name.split(cut)[0]
    return name[:48]


def timeline(gen, steps: int) -> dict:
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            gen.step()
        torch.cuda.synchronize()
    ev = kernel_events(prof)
    if not ev or len(ev) % steps:
        return {"error": f"{len(ev)} kernel records for {steps} steps"}
    n = len(ev) // steps
    per = [ev[i * n:(i + 1) * n] for i in range(steps)]
    names = [short(e["name"]) for e in per[0]]
    attn = [j for j, nm in enumerate(names) if "attention" in nm and "combine" not in nm]
    roles = []
    for j, nm in enumerate(names):
        starts = [a - 1 for a in attn if a - 1 <= j]
        roles.append(f"L+{j - starts[-1]}:{nm}" if starts else f"pre{j}:{nm}")
    adv, dur, span = [[] for _ in range(n)], [[] for _ in range(n)], []
    for kern in per:
        end = kern[0]["ts"]
        for j, e in enumerate(kern):
            e_end = e["ts"] + e["dur"]
            adv[j].append(max(0.0, e_end - max(end, e["ts"])) if j else e["dur"])
            dur[j].append(e["dur"])
            end = max(end, e_end)
        span.append(end - kern[0]["ts"])
    groups: dict[str, dict] = {}
    for j, r in enumerate(roles):
        g = groups.setdefault(r, {"role": r, "n": 0, "dur_us": 0.0, "advance_us": 0.0})
        g["n"] += 1
        g["dur_us"] += statistics.median(dur[j])
        g["advance_us"] += statistics.median(adv[j])
    layer = []
    if len(attn) > 2:  # one layer in the middle, kernel by kernel
        mid = len(attn) // 2
        for j in range(attn[mid] - 1, attn[mid + 1] - 1):
            gaps = [kern[j]["ts"] - (kern[j - 1]["ts"] + kern[j - 1]["dur"]) for kern in per]
            layer.append({"j": j, "role": roles[j], "dur_us": statistics.median(dur[j]),
                          "advance_us": statistics.median(adv[j]), "gap_us": statistics.median(gaps),
                          "grid": per[0][j].get("args", {}).get("grid")})
    return {"kernels_per_step": n, "span_us": statistics.median(span), "groups": list(groups.values()),
            "layer": layer}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="opt-1.3b")
    ap.add_argument("--modes", default="dense")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--policy", default="global")
    ap.add_argument("--granularity", default="token")
    ap.add_argument("--dense-gemv", default="triton")
    ap.add_argument("--predictor-dtype", default="fp8")
    ap.add_argument("--variants", default="v10,all")
    ap.add_argument("--timeline", default="v10,all", help="variants whose timeline is profiled")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="runs/v11-timeline.jsonl")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["copy_gbps"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with probe_log(args.out, dev, bw, probe="v11_timeline") as emit:
        run(args, dev, bw, emit)
    return 0


def run(args, dev, bw, emit) -> None:
    for name in args.models.split(","):
        model = build_model(name, torch.float16, dev)
        model.set_dense_gemv(args.dense_gemv)
        for mode_name in args.modes.split(","):
            sp = 0.0 if mode_name == "dense" else args.sparsity
            pol = None if mode_name == "dense" else args.policy
            gran = args.granularity if mode_name in ("dejavu", "shadowllm") else None
            case = LatencyCase(name, mode_name, sp, pol, gran, args.gen)
            prompt = torch.randint(0, model.cfg.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
            profiled = set()
            for rep in range(args.repeats):
                for variant in args.variants.split(","):
                    key = dict(model=name, mode=mode_name, sparsity=sp, policy=pol, granularity=gran,
                               dense_gemv=args.dense_gemv, variant=variant, repeat=rep)
                    try:
                        gen = generator(model, case, variant, args.predictor_dtype, args.prompt)
                        gen.generate(prompt, args.gen)
                        ms = statistics.median(gen.generate(prompt, args.gen).token_ms)
                        counts = gen.mode.live_counts()
                        floor = model.step_weight_bytes(counts["heads"] if counts else None,
                                                        counts["neurons"] if counts else None,
                                                        gen.mode.first_sparse) / (bw * 1e9) * 1e3
                        emit({**key, "metric": "token_ms", "value": ms, "floor_ms": floor, "floor_ratio": ms / floor})
                        print(f"{name} {mode_name} {variant} rep{rep}: {ms:.4f} ms/token ({ms / floor:.3f}x floor)",
                              flush=True)
                        if variant in args.timeline.split(",") and variant not in profiled:
                            profiled.add(variant)
                            tl = timeline(gen, args.steps)
                            emit({**key, "metric": "timeline", "token_ms": ms, **tl})
                            if "groups" in tl:
                                print(f"  profiled span {tl['span_us']:.1f} us, {tl['kernels_per_step']} kernels")
                                for g in sorted(tl["groups"], key=lambda g: -g["advance_us"])[:16]:
                                    print(f"  {g['role']:<56} n={g['n']:<3} dur {g['dur_us']:8.1f}  "
                                          f"advance {g['advance_us']:8.1f}")
                                for k in tl["layer"]:
                                    print(f"    {k['role']:<56} dur {k['dur_us']:6.2f} adv {k['advance_us']:6.2f} "
                                          f"gap {k['gap_us']:6.2f} grid {k['grid']}")
                            else:
                                print("  timeline:", tl.get("error"))
                        del gen
                    except Exception as exc:  # a failing case is recorded; the rest go on
                        emit({**key, "metric": "error", "error": repr(exc)[:500]})
                        print(f"{name} {mode_name} {variant}: error {exc!r}"[:300], flush=True)
                    torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
