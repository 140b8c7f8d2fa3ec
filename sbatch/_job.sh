#!/usr/bin/env bash
#SBATCH --job-name=fastdllm
#SBATCH --nodes=1
#SBATCH --ntasks=1
# One task x one configuration of the reuse study. Submitted by sbatch/run.sh (or run directly with --local),
# which passes everything through the environment:
#   EXPERIMENT TASK CONFIG MODEL_ARGS RESULTS_ROOT [LIMIT] [NUM_FEWSHOT] [BATCH_SIZE] [EXTRA_ARGS] [PYTHON]
# Writes log.txt and summary.json (atomically, last) under
#   $RESULTS_ROOT/$EXPERIMENT/$TASK[_limit_$LIMIT]/$CONFIG/
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ -f "$here/_token.sh" ] || here="${FASTDLLM_SBATCH_DIR:?set FASTDLLM_SBATCH_DIR to the sbatch folder of this repository}"
source "$here/_token.sh"

: "${EXPERIMENT:?}" "${TASK:?}" "${CONFIG:?}" "${MODEL_ARGS:?}" "${RESULTS_ROOT:?}"
export HF_ALLOW_CODE_EVAL=1 HF_DATASETS_TRUST_REMOTE_CODE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONHASHSEED=0
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
resolve_hf_token

task_dir="$TASK${LIMIT:+_limit_$LIMIT}"
out="$RESULTS_ROOT/$EXPERIMENT/$task_dir/$CONFIG"
mkdir -p "$out"
rm -f "$out/summary.json"                  # a rerun replaces a half-finished configuration completely
args=(--model_args "$MODEL_ARGS" --tasks "$TASK" --output_dir "$out" --config_tag "$CONFIG")
[ -n "${LIMIT:-}" ] && args+=(--limit "$LIMIT")
[ -n "${NUM_FEWSHOT:-}" ] && args+=(--num_fewshot "$NUM_FEWSHOT")
[ -n "${BATCH_SIZE:-}" ] && args+=(--batch_size "$BATCH_SIZE")
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)
{
  echo "[job] $(date -u +%FT%TZ) host=$(hostname) experiment=$EXPERIMENT task=$TASK config=$CONFIG"
  echo "[job] token: ${HF_TOKEN_SOURCE:-none}"
} >> "$out/log.txt"
"${PYTHON:-python3}" -m evalbridge "${args[@]}" >> "$out/log.txt" 2>&1
