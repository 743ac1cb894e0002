#!/usr/bin/env bash
# The SmolLM2 quality rows of results/quality/ (CPU, fp32): perplexity vs sparsity per mode, criterion and
# policy; static pruning with every criterion; zero-shot accuracy at s=0.5. Needs runs/criteria/smollm2
# (shadowbench collect) and runs/predictors/smollm2 (shadowbench train), see notes/quality.md.
set -eu
sb="${PYTHON:-python3} -m bench.cli"
out=${1:-results/quality}
common="--model smollm2 --criteria-dir runs/criteria/smollm2 --predictors-dir runs/predictors/smollm2 --no-progress"
$sb quality $common --modes dense,static,dejavu,shadowllm --criteria plainact,l2norm \
    --sparsity 0.1,0.3,0.5,0.7,0.9 --policy global,local --tasks "" --ppl-tokens 2048 --context 512 --stride 256 \
    --out "$out/smollm2-ppl.jsonl" || true
$sb quality $common --modes dense,static,dejavu,shadowllm --criteria plainact,l2norm --sparsity 0.5 \
    --policy global --no-ppl --limit 100 --out "$out/smollm2-acc.jsonl" || true
$sb quality $common --modes static --criteria l2norm,gradnorm,plainact,fisher,snip,nwot,grasp,jacov,epenas \
    --sparsity 0.3,0.5,0.7 --policy global --tasks "" --ppl-tokens 2048 --context 512 --stride 256 \
    --out "$out/smollm2-static-criteria.jsonl" || true
