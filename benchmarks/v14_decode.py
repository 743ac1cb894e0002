"""v14 decode A/B in one process: the decoder with v13's gather-cols / gather-segments choices (``v13``: no pinned
table for them, the autotuner's pick; gather-segments without v14's configs: batch 1 without AHEAD 2, batched with
v8's one-segment-a-step loop only) and as shipped at v14 (``v14``: the pinned steady-timer table of
``shadow_kernels/tuned/h100-steady.json`` and every config). Alternated ``--repeats`` times; each a fresh
generator (new graph, autotuner caches of both kernels cleared) over the same weights. Rows: ms per token (median
of the generated tokens) and its ratio to the weight-bytes floor at the copy bandwidth measured in the run.

    PYTHONPATH=. python benchmarks/v14_decode.py --models opt-13b --modes static,shadowllm --batch 1,8 \\
        --out runs/v14-decode.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench.latency import LatencyCase, build_mode, build_model
from bench.results import probe_log
from bench.timing import copy_bandwidth
from benchmarks.v7_probe import use
from models.generate import Generator
from models.ops import get_ops
from shadow_kernels import gather_cols, gather_segments, tuned

V13_SINGLE = [c for c in gather_segments._SINGLE_ALL if not c.kwargs.get("AHEAD")]
V13_BATCHED = [c for c in gather_segments._BATCHED_ALL if not c.kwargs.get("PREFETCH")]


def use_variant(variant: str) -> None:
    v14 = variant == "v14"
    tuned.set_pinned(v14)
    use(gather_segments._segments_single, gather_segments._SINGLE_CONFIGS if v14 else V13_SINGLE)
    use(gather_segments._segments_batched, gather_segments._BATCHED_CONFIGS if v14 else V13_BATCHED)
    for t in (gather_cols._cols_single, gather_cols._cols_batched):
        t.cache.clear()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="opt-13b")
    ap.add_argument("--modes", default="static,shadowllm")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--policy", default="global")
    ap.add_argument("--granularity", default="token")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--out", default="runs/v14-decode.jsonl")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["copy_gbps"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with probe_log(args.out, dev, bw, probe="v14_decode") as emit:
        for name in args.models.split(","):
            model = build_model(name, torch.float16, dev)
            for batch in (int(b) for b in args.batch.split(",")):
                prompt = torch.randint(0, model.cfg.vocab, (batch, args.prompt),
                                       generator=torch.Generator().manual_seed(0))
                for mode_name in args.modes.split(","):
                    sp = 0.0 if mode_name == "dense" else args.sparsity
                    pol = None if mode_name == "dense" else args.policy
                    gran = args.granularity if mode_name in ("dejavu", "shadowllm") else None
                    case = LatencyCase(name, mode_name, sp, pol, gran, args.gen)
                    for rep in range(args.repeats):
                        for variant in ("v13", "v14"):
                            key = dict(model=name, mode=mode_name, batch=batch, sparsity=sp, policy=pol,
                                       granularity=gran, variant=variant, repeat=rep)
                            try:
                                use_variant(variant)
                                gen = Generator(model, build_mode(case, model.cfg), batch=batch,
                                                max_len=args.prompt + args.gen, backend=get_ops(None, dev))
                                gen.generate(prompt, args.gen)
                                out = gen.generate(prompt, args.gen)
                                ms = statistics.median(out.token_ms)
                                counts = gen.mode.live_counts()
                                floor = model.step_weight_bytes(
                                    counts["heads"] if counts else None, counts["neurons"] if counts else None,
                                    gen.mode.first_sparse, counts["kv_groups"] if counts else None) / (bw * 1e9) * 1e3
                                emit({**key, "metric": "token_ms", "value": ms, "floor_ms": floor,
                                      "floor_ratio": ms / floor, "tokens": out.tokens[0, -8:].tolist(),
                                      "pinned": len(tuned.used())})
                                del gen
                            except Exception as exc:  # a failing case is recorded; the rest go on
                                emit({**key, "metric": "error", "error": repr(exc)[:500]})
                            torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
    use_variant("v14")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
