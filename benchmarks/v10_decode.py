"""Decode latency with v10's gather-cols against v8's, one process each (benchmarks/v10_probe.py has the
per-call figures). ``--cols v8`` puts back v8's reduction for the run: one launch whose last program per
block sums the partials eight loads at a time (the configs are v8's either way; the split is v10's rounding,
which never launches past OCC programs per SM). The rest of the arguments go to ``python -m bench.cli latency``; each
row's ``extra.cols`` says which ran. ``--attn`` sets OPT's decode attention form for the run (the rows do not
record it: give each form its own ``--out``).

    PYTHONPATH=. python benchmarks/v10_decode.py --cols v8 -- --models opt-13b --modes dense,static,shadowllm \\
        --granularity token --policy global --dense-gemv triton --out runs/v10-decode.jsonl
"""

from __future__ import annotations

import argparse

from bench import cli
from benchmarks.v10_attn import VARIANTS
from shadow_kernels import gather_cols
from shadow_kernels.decode_attention import _ATTN


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cols", choices=("v10", "v8"), default="v10")
    ap.add_argument("--attn", choices=sorted(VARIANTS), default=None,
                    help="OPT's decode attention form (benchmarks/v10_attn.py); default: the library's")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.cols == "v8":
        gather_cols.set_onepass(True)
        gather_cols._SUM_MODE["mode"] = 1
    if args.attn:
        _ATTN.update(VARIANTS[args.attn])
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return cli.main(["latency", *rest])


if __name__ == "__main__":
    raise SystemExit(main())
