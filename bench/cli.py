"""``shadowbench`` command line."""

from __future__ import annotations

import argparse
import sys

DEFAULT_GPU_MODELS = "opt-1.3b,opt-6.7b,opt-13b,opt-30b,opt-66b"
DEFAULT_LATENCY_MODELS = "opt-1.3b,opt-6.7b,opt-13b,opt-30b"  # opt-66b (132 GB in fp16) does not fit 80 GB


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {bad}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {values}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _kernels(args) -> int:
    import torch

    from models.registry import MODELS

    from . import kernels

    on_gpu = torch.cuda.is_available()
    models = _names(args.models or (DEFAULT_GPU_MODELS if on_gpu else kernels.TINY.name))
    unknown = [m for m in models if m not in MODELS and m not in kernels.TINY_SPECS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join([*MODELS, *kernels.TINY_SPECS])}")
    ops = _names(args.ops) if args.ops else list(kernels.OPS)
    bad_ops = [o for o in ops if o not in kernels.OPS]
    if bad_ops:
        raise SystemExit(f"unknown op(s) {bad_ops}; known: {', '.join(kernels.OPS)}")
    sparsities = args.sparsity or ([0.0, 0.5, 0.7, 0.9] if on_gpu else [0.0, 0.5])
    batches = args.batch or ([1, 8] if on_gpu else [1, 3])
    if not on_gpu:
        print("No CUDA device: running the kernels in the Triton interpreter on a tiny shape. The times below "
              "check that everything runs; they are not GPU speed.", file=sys.stderr)
    rows = kernels.run_sweep(models, ops, sparsities, batches, args.dtype, args.out, progress=not args.no_progress)
    print(kernels.summary_table(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    print(f"\n{len(rows)} rows appended to {args.out}" + (f"; {len(bad)} not ok (see status)" if bad else ""))
    return 1 if bad else 0


def _latency(args) -> int:
    import torch

    from . import latency

    on_gpu = torch.cuda.is_available()
    models = _names(args.models or (DEFAULT_LATENCY_MODELS if on_gpu else "tiny"))
    modes = _names(args.modes)
    bad = [m for m in modes if m not in latency.LATENCY_MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; known: {', '.join(latency.LATENCY_MODES)}")
    granularities = _names(args.granularity)
    bad = [g for g in granularities if g not in ("prompt", "token")]
    if bad:
        raise SystemExit(f"unknown granularity {bad}; known: prompt, token")
    if not on_gpu:
        print("No CUDA device: a tiny random model on the CPU with the PyTorch reference kernels. The times "
              "below check that everything runs; they are not GPU speed.", file=sys.stderr)
    rows = latency.run_latency(models, modes, args.sparsity, args.gen, granularities, prompt_len=args.prompt,
                               batch=args.batch, dtype_name=args.dtype, out_path=args.out,
                               shadowllm_policies=tuple(_names(args.policy)), progress=not args.no_progress)
    print(latency.summary_table(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    for r in bad[:5]:
        print(f"error: {r['model']} {r['mode']} s={r['sparsity']}: {r['extra'].get('error')}", file=sys.stderr)
    print(f"\n{len(rows)} rows appended to {args.out}" + (f"; {len(bad)} not ok (see status)" if bad else ""))
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="check every kernel against its reference and time it on this machine")
    k.add_argument("--models", help=f"comma-separated registry names (GPU default: {DEFAULT_GPU_MODELS}; "
                                    "CPU default: a tiny shape)")
    k.add_argument("--ops", help="comma-separated ops (default: all)")
    k.add_argument("--sparsity", type=_floats, help="comma-separated, each in [0, 1) (GPU default: 0,0.5,0.7,0.9)")
    k.add_argument("--batch", type=_ints, help="comma-separated batch sizes (GPU default: 1,8)")
    k.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    k.add_argument("--out", default="runs/kernels.jsonl", help="JSON Lines file; rows are appended, done cases skipped")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=_kernels)

    lat = sub.add_parser("latency", help="per-token decode latency of every mode, HF generate and the floor")
    lat.add_argument("--models", help=f"comma-separated registry names (GPU default: {DEFAULT_LATENCY_MODELS}; "
                                      "CPU default: tiny)")
    lat.add_argument("--modes", default="dense,static,dejavu,shadowllm,hf",
                     help="comma-separated: dense, static, dejavu, shadowllm, hf (transformers generate)")
    lat.add_argument("--sparsity", type=_floats, default=[0.5], help="comma-separated, each in [0, 1) (default 0.5)")
    lat.add_argument("--gen", type=_ints, default=[128], help="generation lengths (default 128)")
    lat.add_argument("--prompt", type=int, default=128, help="prompt length (default 128)")
    lat.add_argument("--batch", type=int, default=1)
    lat.add_argument("--granularity", default="token,prompt",
                     help="when predictors run: token (every decoded token), prompt (once, after prefill)")
    lat.add_argument("--policy", default="global,local", help="top-k policies for shadowllm (static: global, "
                                                              "dejavu: local)")
    lat.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    lat.add_argument("--out", default="runs/latency.jsonl", help="JSON Lines file; rows appended, done cases skipped")
    lat.add_argument("--no-progress", action="store_true", help="no progress bar")
    lat.set_defaults(func=_latency)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
