"""The dense GEMVs' configs chosen by the decode step's time instead of each call's own (v11).

The autotuner times a config alone, on cold data. In a decode step the GEMVs run as one chain with programmatic
dependent launch, and a kernel can only start streaming early when the one before it leaves room on the SMs:
a config that is fastest alone can hold back the next kernel (notes/models.md, session 9). This probe takes one
role of the layer at a time (out_proj, fc1, fc2, qkv, the LM head), tries every batch-1 config of the rows
kernel for it in a freshly captured decode step, keeps the fastest step, and goes on to the next role
(coordinate descent, ``--passes`` times); the decode attention's form is one more role (``ATTN_FORMS``). Each
trial is a new generator over the same weights; the step time is the median over ``--gen`` tokens. Pinned
tables are off while it runs, so its baseline is the autotuner's. ``--table`` writes the winners as a pinned
table (``shadow_kernels.tuned``), replacing that file's entries of the same keys.

    PYTHONPATH=. python benchmarks/v11_tune.py --models opt-1.3b --out runs/v11-tune.jsonl \
        --table shadow_kernels/tuned/h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from functools import partial

import torch

from bench.latency import LatencyCase, build_mode, build_model
from bench.results import git_commit, probe_log
from bench.timing import copy_bandwidth
from models.generate import Generator
from shadow_kernels import gather_rows, tuned
from shadow_kernels._common import next_pow2
from shadow_kernels.decode_attention import _ATTN

KEYS = gather_rows._KEY
ATTN_FORMS = {
    "tile-w4": {"preload_tile": 16384, "tile_warps": 4}, "tile-w8": {"preload_tile": 16384, "tile_warps": 8},
    "tile-w16": {"preload_tile": 16384, "tile_warps": 16}, "split-32": {"preload_tile": 0, "chunk": 32},
    "split-64": {"preload_tile": 0, "chunk": 64}, "split-128": {"preload_tile": 0, "chunk": 128},
}


def roles(cfg) -> dict:
    """Each dense GEMV of an OPT layer (and the LM head) as (K, ROWS_BUCKET, NORM) of the rows kernel's key."""
    E, F, V = cfg.hidden, cfg.ffn, cfg.vocab
    return {"out_proj": (E, next_pow2(E), 0), "fc1": (E, F, 1), "fc2": (F, next_pow2(E), 0), "qkv": (E, 3 * E, 1),
            "lm_head": (E, V, 1)}


def matching(tuner, role_key) -> list:
    K, bucket, norm = role_key
    out = []
    for key in tuner.cache:
        d = dict(zip(KEYS, key[:len(KEYS)], strict=True))
        if d["K"] == K and d["ROWS_BUCKET"] == bucket and d["NORM"] == norm and d["BLOCK_B"] == 1:
            out.append(key)
    return out


def config_dict(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def describe(c) -> str:
    return (f"N{c.kwargs['BLOCK_N']}xK{c.kwargs['BLOCK_K']}{'p' if c.kwargs.get('PREFETCH') else ''}"
            f"/w{c.num_warps}s{c.num_stages}")


def decode_ms(model, case, prompt, gen_len) -> float:
    """Median ms per token of a freshly captured decode step."""
    gen = Generator(model, build_mode(case, model.cfg), max_len=prompt.shape[1] + gen_len)
    gen.generate(prompt, gen_len)
    ms = statistics.median(gen.generate(prompt, gen_len).token_ms)
    del gen
    return ms


def write_table(path, device, entries, source) -> None:
    """Merge ``entries`` into the pinned table at ``path`` (same kernel, dtype and key: replaced)."""
    table = {"device": device, "source": source, "entries": []}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
        if table.get("device") != device:
            raise ValueError(f"{path} is a table for {table.get('device')!r}, not {device!r}")
    ident = lambda e: (e["kernel"], e.get("dtype"), json.dumps(e["key"], sort_keys=True))
    new = {ident(e) for e in entries}
    table["entries"] = [e for e in table["entries"] if ident(e) not in new] + entries
    table["source"] = source
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="opt-1.3b")
    ap.add_argument("--roles", default="attention,out_proj,fc1,fc2,qkv,lm_head")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--out", default="runs/v11-tune.jsonl")
    ap.add_argument("--table", default=None, help="write the winners into this pinned-config table")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["copy_gbps"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tuned.set_pinned(False)
    with probe_log(args.out, dev, bw, probe="v11_tune") as emit:
        run(args, dev, bw, emit)
    return 0


def run(args, dev, bw, emit) -> None:
    tuner = gather_rows._rows_gemv_single
    device = torch.cuda.get_device_name(dev)
    sha = git_commit()
    attn_default = dict(_ATTN)
    for name in args.models.split(","):
        model = build_model(name, torch.float16, dev)
        model.set_dense_gemv("triton")
        case = LatencyCase(name, "dense", 0.0, None, None, args.gen)
        prompt = torch.randint(0, model.cfg.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        floor = model.step_weight_bytes() / (bw * 1e9) * 1e3
        step_ms = partial(decode_ms, model, case, prompt, args.gen)
        base = step_ms()
        chosen = {}
        for role, rk in roles(model.cfg).items():
            keys = matching(tuner, rk)
            chosen[role] = (keys, tuner.cache[keys[0]] if keys else None)
        emit({"model": name, "metric": "token_ms", "trial": "autotuned", "value": base, "floor_ratio": base / floor,
              "configs": {r: describe(c) for r, (_, c) in chosen.items() if c is not None}, "attn": dict(_ATTN)})
        print(f"{name} autotuned: {base:.4f} ms ({base / floor:.3f}x floor) "
              f"{ {r: describe(c) for r, (_, c) in chosen.items() if c is not None} }", flush=True)
        attn_form = None
        for p in range(args.passes):
            for role in args.roles.split(","):
                results = []
                if role == "attention":
                    for form, setting in ATTN_FORMS.items():
                        _ATTN.update(attn_default)
                        _ATTN.update(setting)
                        ms = step_ms()
                        results.append((ms, form))
                        emit({"model": name, "metric": "token_ms", "trial": role, "pass": p, "config": form,
                              "value": ms, "floor_ratio": ms / floor})
                    ms, attn_form = min(results)
                    _ATTN.update(attn_default)
                    _ATTN.update(ATTN_FORMS[attn_form])
                    print(f"  pass {p} attention: best {attn_form} {ms:.4f} ms; "
                          f"{', '.join(f'{f} {m:.4f}' for m, f in sorted(results))}", flush=True)
                    continue
                keys, current = chosen[role]
                if not keys:
                    print(f"  {role}: no autotuner entry matches {roles(model.cfg)[role]}")
                    continue
                for cfg in tuner.configs:
                    for k in keys:
                        tuner.cache[k] = cfg
                    try:
                        ms = step_ms()
                    except Exception as exc:  # a config that fails is recorded; the others go on
                        emit({"model": name, "metric": "error", "role": role, "config": describe(cfg),
                              "error": repr(exc)[:400]})
                        continue
                    results.append((ms, cfg))
                    emit({"model": name, "metric": "token_ms", "trial": role, "pass": p, "config": describe(cfg),
                          "value": ms, "floor_ratio": ms / floor, "alone_choice": describe(current)})
                ms, cfg = min(results, key=lambda t: t[0])
                for k in keys:
                    tuner.cache[k] = cfg
                chosen[role] = (keys, cfg)
                spread = ", ".join(f"{describe(c)} {m:.4f}" for m, c in sorted(results, key=lambda t: t[0])[:4])
                print(f"  pass {p} {role}: best {describe(cfg)} {ms:.4f} ms (was {describe(current)}); "
                      f"top: {spread}", flush=True)
        final = [step_ms() for _ in range(3)]
        med = statistics.median(final)
        configs = {r: describe(c) for r, (_, c) in chosen.items() if c is not None}
        emit({"model": name, "metric": "token_ms", "trial": "tuned", "value": med, "runs": final,
              "floor_ratio": med / floor, "configs": configs, "attn_form": attn_form, "autotuned": base})
        print(f"{name} tuned in context: {med:.4f} ms ({med / floor:.3f}x floor; autotuned {base:.4f}); "
              f"attention {attn_form}; {configs}", flush=True)
        if args.table:
            entries = []
            for role, (keys, cfg) in chosen.items():
                for k in keys:
                    entries.append({"kernel": "rows_single", "dtype": str(model.dtype),
                                    "key": dict(zip(KEYS, k[:len(KEYS)], strict=True)), "config": config_dict(cfg),
                                    "role": f"{name} {role}", "step_ms": med, "autotuned_step_ms": base})
            write_table(args.table, device, entries, f"benchmarks/v11_tune.py at {sha}: OPT dense decode (own "
                        f"GEMV, fp16, batch 1, prompt {args.prompt}, gen {args.gen}), configs chosen by step time")
        _ATTN.update(attn_default)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
