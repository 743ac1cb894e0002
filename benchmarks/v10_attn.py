"""v10 attention probe: OPT's decode attention as one launch (one program per head, longer K/V tiles) against
the flash-decoding split (two launches) at the cache length of the latency runs (prompt 128 + 128 generated
tokens = 256 positions), per call (the sweep's stream timer: one graph over copies of the caches that
together exceed the L2, batch 1, fp16, all heads computed, the token at position ``--pos``).

Variants (``shadow_kernels.decode_attention._ATTN``):
- ``split``: v9's default: CHUNK = 64 positions a program, then the combine kernel;
- ``one64``: one launch, 64-position tiles (v9's one-launch form);
- ``one128`` / ``one256``: one launch, tiles up to 128 / 256 positions (8 warps past 8192 elements).

    PYTHONPATH=. python benchmarks/v10_attn.py --out runs/v10-attn.jsonl
"""

from __future__ import annotations

import argparse

import torch

from bench.results import probe_log
from bench.timing import copy_bandwidth, time_stream
from shadow_kernels.decode_attention import _ATTN, decode_attention, decode_attention_ref

VARIANTS = {
    "split": {"one_launch_t": 64, "max_block_t": 64, "tile": 8192},
    "one64": {"one_launch_t": 1 << 30, "max_block_t": 64, "tile": 8192},
    "one128": {"one_launch_t": 1 << 30, "max_block_t": 128, "tile": 16384},
    "one256": {"one_launch_t": 1 << 30, "max_block_t": 256, "tile": 32768},
}
SHAPES = {"opt-1.3b": (32, 64), "opt-6.7b": (32, 128), "opt-13b": (40, 128), "opt-30b": (56, 128)}


def case(model, T, pos, dev, emit):
    H, D = SHAPES[model]
    gen = torch.Generator(device=dev).manual_seed(0)
    per = 2 * H * T * D * 2
    n = max(4, -(-(160 << 20) // per))

    def one():
        kc = torch.randn((1, H, T, D), generator=gen, device=dev, dtype=torch.float16)
        vc = torch.randn((1, H, T, D), generator=gen, device=dev, dtype=torch.float16)
        valid = torch.ones((1, H, T), device=dev, dtype=torch.uint8)
        qkv = torch.randn((1, H * 3 * D), generator=gen, device=dev, dtype=torch.float16)
        return qkv, kc, vc, valid

    copies = [one() for _ in range(n)]
    pos_t = torch.tensor([pos], device=dev, dtype=torch.int32)
    slot = torch.arange(H, device=dev, dtype=torch.int32)
    q0, k0, v0, m0 = copies[0]
    ref = decode_attention_ref(q0, k0.clone(), v0.clone(), m0.clone(), pos_t, slot).float()
    for name, setting in VARIANTS.items():
        saved = dict(_ATTN)
        _ATTN.update(setting)
        try:
            out = decode_attention(q0, k0.clone(), v0.clone(), m0.clone(), pos_t, slot).float()
            err = ((out - ref).norm() / ref.norm()).item()
            t = time_stream([lambda c=c: decode_attention(c[0], c[1], c[2], c[3], pos_t, slot) for c in copies], dev)
        finally:
            _ATTN.clear()
            _ATTN.update(saved)
        emit({"model": model, "op": "decode_attention", "T": T, "pos": pos, "heads": H, "head_dim": D,
              "variant": name, "us": t["median_us"], "rel_err": err, "kv_bytes": 2 * H * pos * D * 2})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/v10-attn.jsonl")
    ap.add_argument("--pos", type=int, nargs="+", default=[130, 200, 254])
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["copy_gbps"]
    with probe_log(args.out, dev, bw, probe="v10_attn") as emit:
        for model in SHAPES:
            for pos in args.pos:
                case(model, 256, pos, dev, emit)


if __name__ == "__main__":
    main()
