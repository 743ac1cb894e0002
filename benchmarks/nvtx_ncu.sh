#!/usr/bin/env bash
# Show on a GPU machine that the NVTX ranges are really emitted: Nsight Compute profiles only kernels that run
# inside the named range of domain "shadowbench"; a range that is never pushed gives "No kernels were profiled".
# Usage: benchmarks/nvtx_ncu.sh [OUTDIR] [PREFIX]
# PREFIX: "shadowbench@" for the nvtx package's domain (default); "shadowbench:" for the torch.cuda.nvtx fallback
# (default domain, names prefixed), used where the nvtx package is not installed.
set -u
out=${1:-runs/nvtx}
prefix=${2:-shadowbench@}
mkdir -p "$out"
for range in decode prefill predictor layer1.attn layer2.mlp no-such-range; do
  ncu --nvtx --nvtx-include "${prefix}${range}/" --metrics gpu__time_duration.sum -c 40 \
      python3 -m bench.profile --model tiny-llama --mode shadowllm --steps 4 > "$out/ncu-${range}.txt" 2>&1
  n=$(grep -c "gpu__time_duration.sum" "$out/ncu-${range}.txt")
  none=$(grep -c "No kernels were profiled" "$out/ncu-${range}.txt")
  echo "range ${range}: ${n} kernels profiled inside it$( [ "$none" -gt 0 ] && echo ' (ncu: No kernels were profiled)')"
done
