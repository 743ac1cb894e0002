"""Build the pinned table of gather-cols (fc2) and gather-segments (out_proj) configs for one device from the rows of
``benchmarks/v14_probe.py --part table`` (every config alone under the steady timer, the decoder's call).

Cases that share an autotune key (the key buckets the number of selected rows, so OPT-1.3B fc2 at s=0.5 and 0.7
share one) get the config with the smallest mean of ``us / best us of the case`` over them. Every key is pinned, not
only those where the autotuner's pick was slower: the point is that every run uses the same config (v13: the cold
autotuner's choice moved OPT-6.7B fc2 s=0 by 17% between two runs). Each entry is written twice, without and with a
device-side count (``HAS_COUNT``; the decoder's global top-k passes one, the sweep does not): the count is one load
and does not change how a config streams.

    python -m bench.pinned runs/v14-table.jsonl runs/v14-table-30b-66b.jsonl \\
        --out shadow_kernels/tuned/h100-steady.json
"""

from __future__ import annotations

import argparse
import collections
import json


def build(rows: list[dict], source: str) -> dict:
    cases = collections.defaultdict(dict)  # (model, op, sparsity) -> variant -> row
    for r in rows:
        if "variant" in r and r.get("key"):
            cases[(r["model"], r["op"], r["sparsity"])][r["variant"]] = r
    devices = {r["device"] for r in rows if "device" in r}
    if len(devices) != 1:
        raise ValueError(f"rows from one device expected, got {sorted(devices)}")
    groups = collections.defaultdict(list)
    for case, variants in cases.items():
        if "tuned" not in variants:
            raise ValueError(f"case {case} has no 'tuned' row (the autotuner's pick and the kernel name)")
        t = variants["tuned"]
        groups[(t["kernel"], t["dtype"], json.dumps(t["key"], sort_keys=True))].append(case)
    entries = []
    for (kernel, dtype, key), members in sorted(groups.items()):
        alone = [{v: r for v, r in cases[c].items() if v.startswith("alone_")} for c in members]
        best = [min(r["us"] for r in a.values()) for a in alone]
        names = set.intersection(*(set(a) for a in alone))
        score = {v: sum(a[v]["us"] / b for a, b in zip(alone, best, strict=True)) / len(alone) for v in names}
        pick = min(sorted(names), key=score.get)
        for has_count in (False, True):
            entries.append({
                "kernel": kernel, "dtype": dtype, "key": {**json.loads(key), "HAS_COUNT": has_count},
                "config": alone[0][pick]["config"],
                "role": ", ".join(f"{m} {op} s={s:g}" for m, op, s in members),
                "steady_us": [round(a[pick]["us"], 2) for a in alone],
                "autotuned_steady_us": [round(cases[c]["tuned"]["us"], 2) for c in members],
                "best_alone_us": [round(b, 2) for b in best],
            })
    return {"device": devices.pop(), "source": source, "entries": entries}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="benchmarks/v14_probe.py --part table")
    args = ap.parse_args()
    rows = []
    for path in args.rows:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    table = build(rows, args.source)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"{len(table['entries'])} entries -> {args.out}")


if __name__ == "__main__":
    main()
