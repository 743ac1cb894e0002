#!/usr/bin/env bash
# Paper figure 13 on SmolLM2 (CPU): the fisher criterion collected from 0-, 3- and 5-shot prompts (20 per
# task and shot count, the same examples' predictor splits), then static pruning with each importance file,
# WikiText-2 perplexity vs sparsity (local top-k). Rows: results/quality.jsonl (each row's source names its criteria folder).
set -eu
sb="${PYTHON:-python3} -m bench.cli"
out=${1:-results}
for k in 0 3 5; do
    dir=runs/criteria/smollm2-fisher-${k}shot
    [ -f "$dir/importance-fisher.safetensors" ] || \
        $sb collect --model smollm2 --shots $k --per-task 20 --criteria fisher --batch 4 --out "$dir" --no-progress
    $sb quality --model smollm2 --criteria-dir "$dir" --modes static --criteria fisher \
        --sparsity 0.1,0.3,0.5,0.7 --policy local --tasks "" --ppl-tokens 2048 --context 512 --stride 256 \
        --no-progress --out "$out/quality.jsonl" || true
done
