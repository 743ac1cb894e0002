#!/usr/bin/env bash
# Show on a GPU machine that the NVTX ranges are really emitted: Nsight Compute profiles only kernels that run
# inside the named range of domain "shadowbench"; a range that is never pushed gives "No kernels were profiled".
# Usage: perf/nvtx_ncu.sh [OUTDIR] [PREFIX] [ROWS]
# PREFIX: "shadowbench@" for the nvtx package's domain (default); "shadowbench:" for the torch.cuda.nvtx fallback
# (default domain, names prefixed), used where the nvtx package is not installed.
# ROWS: a JSON Lines table that gets one row per range (default results/profile.jsonl).
set -u
out=${1:-runs/nvtx}
prefix=${2:-shadowbench@}
rows=${3:-results/profile.jsonl}
mkdir -p "$out"
for range in decode prefill predictor layer1.attn layer2.mlp no-such-range; do
  ncu --nvtx --nvtx-include "${prefix}${range}/" --metrics gpu__time_duration.sum -c 40 \
      python3 -m bench.profile --model tiny-llama --mode shadowllm --steps 4 > "$out/ncu-${range}.txt" 2>&1
  n=$(grep -c "gpu__time_duration.sum" "$out/ncu-${range}.txt")
  none=$(grep -c "No kernels were profiled" "$out/ncu-${range}.txt")
  echo "range ${range}: ${n} kernels profiled inside it$( [ "$none" -gt 0 ] && echo ' (ncu: No kernels were profiled)')"
  python3 - "$rows" "$range" "$n" "$prefix" <<'PY'
import json, sys
import torch
from bench.results import git_commit, make_row
from models.nvtx import backend
path, rng, n, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
row = make_row(kind="profile", model="tiny-llama", mode="shadowllm", sparsity=0.5, policy="global", batch=1,
               device=torch.cuda.get_device_name(0), dtype="fp16", git_commit=git_commit(),
               metric="kernels_in_nvtx_range", value=n, unit="kernels", range=rng, nvtx_backend=backend(),
               prefix=prefix, limit=40, command="perf/nvtx_ncu.sh")
with open(path, "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
PY
done
