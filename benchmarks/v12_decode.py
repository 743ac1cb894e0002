"""v12 decode A/B: the v11 decoder with its one-token row GEMVs on v7-v11's one-block-a-program kernel (``v11``)
or on the streaming kernel (``v12``), in one process, alternated ``--repeats`` times; each a fresh generator
(new graph) over the same weights. Rows: ms per token (median of the generated tokens) and its ratio to the
weight-bytes floor at the copy bandwidth measured in the run.

The streaming kernel serves qkv and fc1 (norm folded in) of every mode, the dense GEMVs of ``--dense-gemv
triton`` (out_proj, fc2, the LM head) and the predictors' first layer; SwiGLU and fp8-scaled GEMVs stay on the
old kernel. With ``v11``, the pinned table of the device (shadow_kernels/tuned) applies as shipped.

    PYTHONPATH=. python benchmarks/v12_decode.py --models opt-1.3b,opt-13b --modes dense,shadowllm \\
        --out runs/v12-decode.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench.latency import LatencyCase, build_model
from bench.results import probe_log
from bench.timing import copy_bandwidth
from benchmarks.v11_timeline import generator
from shadow_kernels import tuned
from shadow_kernels.gather_rows import set_rows_stream

VARIANTS = {"v11": False, "v12": True}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="opt-1.3b")
    ap.add_argument("--modes", default="dense,shadowllm")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--policy", default="global")
    ap.add_argument("--granularity", default="token")
    ap.add_argument("--dense-gemv", default="triton")
    ap.add_argument("--predictor-dtype", default="fp8")
    ap.add_argument("--variants", default="v11,v12")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--out", default="runs/v12-decode.jsonl")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["copy_gbps"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with probe_log(args.out, dev, bw, probe="v12_decode") as emit:
        for name in args.models.split(","):
            model = build_model(name, torch.float16, dev)
            model.set_dense_gemv(args.dense_gemv)
            for mode_name in args.modes.split(","):
                sp = 0.0 if mode_name == "dense" else args.sparsity
                pol = None if mode_name == "dense" else args.policy
                gran = args.granularity if mode_name in ("dejavu", "shadowllm") else None
                case = LatencyCase(name, mode_name, sp, pol, gran, args.gen)
                prompt = torch.randint(0, model.cfg.vocab, (1, args.prompt),
                                       generator=torch.Generator().manual_seed(0))
                for rep in range(args.repeats):
                    for variant in args.variants.split(","):
                        key = dict(model=name, mode=mode_name, sparsity=sp, policy=pol, granularity=gran,
                                   dense_gemv=args.dense_gemv, variant=variant, repeat=rep)
                        prev = set_rows_stream(VARIANTS[variant])
                        try:
                            gen = generator(model, case, "all", args.predictor_dtype, args.prompt)
                            gen.generate(prompt, args.gen)
                            out = gen.generate(prompt, args.gen)
                            ms = statistics.median(out.token_ms)
                            counts = gen.mode.live_counts()
                            floor = model.step_weight_bytes(counts["heads"] if counts else None,
                                                            counts["neurons"] if counts else None,
                                                            gen.mode.first_sparse) / (bw * 1e9) * 1e3
                            emit({**key, "metric": "token_ms", "value": ms, "floor_ms": floor,
                                  "floor_ratio": ms / floor, "tokens": out.tokens[0, -8:].tolist(),
                                  "pinned": tuned.used()})
                            del gen
                        except Exception as exc:  # a failing case is recorded; the rest go on
                            emit({**key, "metric": "error", "error": repr(exc)[:500]})
                        finally:
                            set_rows_stream(prev)
                        torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
