#!/usr/bin/env bash
# Tensor-parallel runs (models/tp.py), one stage per call:
#   perf/tensor_parallel.sh cpu-quality   # SmolLM2 on 3 gloo ranks (one key-value group each): the oracle at s=0.5,
#                                         # local and global, under both plan rules; the one-process rows compare
#   perf/tensor_parallel.sh gpu-latency N # OPT-66B (random weights, fp16) and OPT-13B on N GPUs (NCCL): every decode
#                                         # mode at s=0.5, per-token prediction, both plan rules
#   perf/tensor_parallel.sh gpu-one       # OPT-66B on one GPU (132 GB of weights: a 141 GB H200), the baseline
# ROWS (default results) holds the result tables; rows carry the world size (extra.tp) and the plan rule.
set -eu
stage=${1:?cpu-quality, gpu-latency N or gpu-one}
rows=${ROWS:-results}
py=${PYTHON:-python3}
run() { OMP_NUM_THREADS=1 $py -m torch.distributed.run --standalone --nproc-per-node "$1" -m bench.cli "${@:2}"; }
case $stage in
cpu-quality)
  for plan in exact shard; do
    run 3 quality --model smollm2 --modes dense,oracle --criteria l2norm --policy local,global --sparsity 0.5 \
        --tasks "" --ppl-tokens 2048 --context 512 --stride 256 --tp 3 --tp-plan $plan \
        --out "$rows/quality.jsonl" --no-progress
  done ;;
gpu-latency)
  n=${2:?number of GPUs}
  for plan in exact shard; do
    run "$n" latency --models opt-13b,opt-66b --modes dense,static,dejavu,shadowllm,threshold --sparsity 0.5 \
        --granularity token --policy global,local --tp "$n" --tp-plan $plan --out "$rows/latency.jsonl" \
        --no-progress
  done ;;
gpu-one)
  $py -m bench.cli latency --models opt-66b --modes dense,static,dejavu,shadowllm,threshold --sparsity 0.5 \
      --granularity token --policy global,local --out "$rows/latency.jsonl" --no-progress ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
