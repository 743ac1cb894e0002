#!/usr/bin/env bash
# The SmolLM2 quality rows of results/quality.jsonl (CPU, fp32): perplexity vs sparsity per mode, criterion and
# policy; static pruning with every criterion; zero-shot accuracy at s=0.5; ShadowLLM predictors trained
# on per-layer normalised targets under global top-k. Needs runs/criteria/smollm2 (shadowbench collect)
# and runs/predictors/smollm2 (shadowbench train), see notes/quality.md. Every step resumes its file.
set -eu
sb="${PYTHON:-python3} -m bench.cli"
out=${1:-results}
common="--model smollm2 --criteria-dir runs/criteria/smollm2 --no-progress"
$sb quality $common --predictors-dir runs/predictors/smollm2 --modes dense,static,dejavu,shadowllm \
    --criteria plainact,l2norm --sparsity 0.1,0.3,0.5,0.7,0.9 --policy global,local --tasks "" \
    --ppl-tokens 2048 --context 512 --stride 256 --out "$out/quality.jsonl" || true
$sb quality $common --predictors-dir runs/predictors/smollm2 --modes dense,static,dejavu,shadowllm \
    --criteria plainact,l2norm --sparsity 0.5 --policy global --no-ppl --limit 100 --context-mode dense \
    --out "$out/quality.jsonl" || true
# ShadowLLM with a z-score per layer (the paper's normalisation for global selection)
[ -f runs/predictors/smollm2-layer/shadowllm-l2norm.safetensors ] || \
    $sb train --data runs/criteria/smollm2 --kind shadowllm --criterion plainact,l2norm --hidden 512 --log \
        --normalisation layer --test-fraction 0 --out runs/predictors/smollm2-layer --results "$out/training.jsonl" \
        --no-progress
$sb quality $common --predictors-dir runs/predictors/smollm2-layer --modes shadowllm --criteria plainact,l2norm \
    --sparsity 0.1,0.3,0.5 --policy global,local --tasks "" --ppl-tokens 2048 --context 512 --stride 256 \
    --out "$out/quality.jsonl" || true
$sb quality $common --predictors-dir runs/predictors/smollm2-layer --modes shadowllm --criteria plainact,l2norm \
    --sparsity 0.5 --policy global --no-ppl --limit 100 --context-mode dense --out "$out/quality.jsonl" || true
$sb quality $common --modes static --criteria l2norm,gradnorm,plainact,fisher,snip,nwot,grasp,jacov,epenas \
    --sparsity 0.3,0.5,0.7 --policy global,local --tasks "" --ppl-tokens 2048 --context 512 --stride 256 \
    --out "$out/quality.jsonl" || true
# ShadowLLM with the predictor's second layer in fp8 (models.modes predictor_dtype)
$sb quality $common --predictors-dir runs/predictors/smollm2 --modes shadowllm --criteria plainact,l2norm \
    --sparsity 0.3,0.5 --policy local --tasks "" --ppl-tokens 2048 --context 512 --stride 256 \
    --predictor-dtype fp8 --out "$out/quality.jsonl" || true
