#!/usr/bin/env bash
#SBATCH --job-name=fastdllm
# One task x one configuration of the reuse study, submitted by sbatch/run.sh (or run by it with --local).
# Everything comes through the environment:
#   OUT TASK CONFIG MODEL_ARGS [LIMIT NUM_FEWSHOT BATCH_SIZE EXTRA_ARGS FORCE HF_TOKEN_PATH PYTHON]
# It holds OUT/.run.lock while it runs (a second run of the same folder stops at once, exit 75), runs in
# OUT/.partial and publishes summary.json only once complete (a result it replaces is kept as
# summary.previous.json; a failed run leaves the previous result as it was). With several Slurm tasks
# (--ntasks), srun starts one evaluation process per task, data-parallel (RANK/WORLD_SIZE from Slurm).
set -euo pipefail
here="${FASTDLLM_SBATCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
if [ ! -f "$here/_token.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then  # sbatch ran a copy in its spool folder
  here="$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)")"
fi
source "$here/_token.sh"
: "${TASK:?}" "${CONFIG:?}" "${MODEL_ARGS:?}"
out="${OUT:-${RESULTS_ROOT:?}/${EXPERIMENT:?}/$TASK${LIMIT:+_limit_$LIMIT}/$CONFIG}"
py="${PYTHON:-python3}"
export HF_ALLOW_CODE_EVAL=1 HF_DATASETS_TRUST_REMOTE_CODE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONHASHSEED=0
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
resolve_hf_token

mkdir -p "$out"
exec 9>>"$out/.run.lock"
if ! flock -n 9; then echo "[job] another run holds $out; this one stops and changes nothing" >&2; exit 75; fi
rc=0; "$py" -m evalbridge.fingerprint job-start "$out" || rc=$?
if [ "$rc" -eq 10 ]; then exit 0; elif [ "$rc" -ne 0 ]; then exit "$rc"; fi

log="$out/log.txt"
trap 'echo "[job] $(date -u +%FT%TZ) cancelled (SIGTERM); the previous result, if any, is kept" >> "$log"; exit 143' TERM
args=(--model_args "$MODEL_ARGS" --tasks "$TASK" --output_dir "$out/.partial" --config_tag "$CONFIG")
[ -n "${LIMIT:-}" ] && args+=(--limit "$LIMIT")
[ -n "${NUM_FEWSHOT:-}" ] && args+=(--num_fewshot "$NUM_FEWSHOT")
[ -n "${BATCH_SIZE:-}" ] && args+=(--batch_size "$BATCH_SIZE")
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)
launch=(setpriv --pdeathsig KILL)          # the evaluation dies with this script, even under kill -9
ntasks="${SLURM_NTASKS:-1}"
if [ "$ntasks" -gt 1 ]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
  export MASTER_ADDR MASTER_PORT="$((20000 + ${SLURM_JOB_ID:-0} % 20000))"
  launch=(srun --kill-on-bad-exit=1 --ntasks="$ntasks" bash -c \
          'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID exec "$@"' rank)
fi
{
  echo "[job] $(date -u +%FT%TZ) host=$(hostname) job=${SLURM_JOB_ID:-local} task=$TASK config=$CONFIG processes=$ntasks"
  echo "[job] token: ${HF_TOKEN_SOURCE:-none}"
} >> "$log"
rc=0; "${launch[@]}" "$py" -m evalbridge "${args[@]}" >> "$log" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "[job] $(date -u +%FT%TZ) evaluation failed (exit $rc); the previous result, if any, is kept" >> "$log"
  exit "$rc"
fi
"$py" -m evalbridge.fingerprint seal "$out" >> "$log" 2>&1
echo "[job] $(date -u +%FT%TZ) complete: $out/summary.json" >> "$log"
