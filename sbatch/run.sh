#!/usr/bin/env bash
# The reuse-study grid on SLURM: tasks x configurations (default the nine k in {1,2,3} x first/middle/last),
# one job each (sbatch/_job.sh). Skips configurations whose summary.json is complete; refuses, before
# submitting anything, gated tasks when no Hugging Face token resolves.
#
#   sbatch/run.sh --tasks gsm8k,mmlu [--config k2_first]... [--modes output,delta] [--limit N] [--force]
#                 [--dry-run] [--local] [--model ID_OR_PATH] [--model-args "k=v,..."] [--experiment NAME]
#                 [--results DIR] [--num-fewshot N] [--batch-size N] [--extra "lm-eval args"]
#                 [--partition P] [--gpus N] [--time HH:MM:SS] [--mem M] [--cpus N] [--account A] [--qos Q]
#
# Configuration tags: k<K>_<subset>[_delta] (k1 = no reuse). Results: RESULTS/EXPERIMENT/TASK[_limit_N]/TAG/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_token.sh"

tasks="" configs=() modes="output" limit="" force=0 dry=0 local_run=0
model="Efficient-Large-Model/Fast_dLLM_v2_7B" model_args="" experiment="reuse_study"
results="${FASTDLLM_RESULTS:-$PWD/results}" num_fewshot="" batch_size="" extra=""
sb=(--nodes=1 --ntasks=1)
while [ $# -gt 0 ]; do
  case "$1" in
    --tasks) tasks="$2"; shift 2 ;;
    --config) configs+=("$2"); shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --force) force=1; shift ;;
    --dry-run) dry=1; shift ;;
    --local) local_run=1; shift ;;
    --model) model="$2"; shift 2 ;;
    --model-args) model_args="$2"; shift 2 ;;
    --experiment) experiment="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    --num-fewshot) num_fewshot="$2"; shift 2 ;;
    --batch-size) batch_size="$2"; shift 2 ;;
    --extra) extra="$2"; shift 2 ;;
    --partition) sb+=(--partition="$2"); shift 2 ;;
    --gpus) sb+=(--gres="gpu:$2"); shift 2 ;;
    --time) sb+=(--time="$2"); shift 2 ;;
    --mem) sb+=(--mem="$2"); shift 2 ;;
    --cpus) sb+=(--cpus-per-task="$2"); shift 2 ;;
    --account) sb+=(--account="$2"); shift 2 ;;
    --qos) sb+=(--qos="$2"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$tasks" ] || { echo "run.sh: --tasks is required (comma-separated lm-eval task names)" >&2; exit 2; }
py="${PYTHON:-python3}"

if [ ${#configs[@]} -eq 0 ]; then
  for k in 1 2 3; do for s in first middle last; do
    configs+=("k${k}_${s}")
    if [ "$k" -gt 1 ] && [[ ",$modes," == *",delta,"* ]]; then configs+=("k${k}_${s}_delta"); fi
  done; done
fi

config_args() {   # tag -> model_args
  local tag="$1" k s mode
  if [[ ! "$tag" =~ ^k([0-9]+)_(first|middle|last|[0-9,-]+)(_delta|_output)?$ ]]; then
    echo "run.sh: configuration '$tag' is not of the form k<K>_<first|middle|last|layers>[_delta]" >&2; return 2
  fi
  k="${BASH_REMATCH[1]}"; s="${BASH_REMATCH[2]}"; mode="${BASH_REMATCH[3]#_}"; mode="${mode:-output}"
  echo "model=$model,use_block_cache=True,threshold=0.9,reuse_k=$k,layer_subset=$s,reuse_mode=$mode${model_args:+,$model_args}"
}
for c in "${configs[@]}"; do config_args "$c" >/dev/null || exit 2; done

# Gated datasets: stop before any submission when no token resolves.
resolve_hf_token
if ! "$py" -m evalbridge.gated --tasks "$tasks"; then
  echo "run.sh: nothing was submitted." >&2; exit 2
fi

complete() {
  "$py" - "$1" <<'PY' 2>/dev/null
import json, sys
try:
    sys.exit(0 if json.load(open(sys.argv[1])).get("complete") is True else 1)
except Exception:
    sys.exit(1)
PY
}

submitted=0 skipped=0
IFS=',' read -r -a task_list <<< "$tasks"
for task in "${task_list[@]}"; do
  for cfg in "${configs[@]}"; do
    dir="$results/$experiment/$task${limit:+_limit_$limit}/$cfg"
    if [ "$force" -eq 0 ] && [ -f "$dir/summary.json" ] && complete "$dir/summary.json"; then
      echo "skip $task $cfg (complete: $dir/summary.json)"; skipped=$((skipped + 1)); continue
    fi
    env_vars="EXPERIMENT=$experiment,TASK=$task,CONFIG=$cfg,RESULTS_ROOT=$results,LIMIT=$limit,NUM_FEWSHOT=$num_fewshot,BATCH_SIZE=$batch_size,FASTDLLM_SBATCH_DIR=$here"
    margs="$(config_args "$cfg")"
    if [ "$local_run" -eq 1 ]; then
      echo "run $task $cfg"
      if [ "$dry" -eq 0 ]; then
        EXPERIMENT="$experiment" TASK="$task" CONFIG="$cfg" RESULTS_ROOT="$results" LIMIT="$limit" \
          NUM_FEWSHOT="$num_fewshot" BATCH_SIZE="$batch_size" EXTRA_ARGS="$extra" MODEL_ARGS="$margs" \
          bash "$here/_job.sh" || { echo "run.sh: $task $cfg failed; see $dir/log.txt" >&2; exit 1; }
      fi
    else
      mkdir -p "$dir"
      cmd=(sbatch "${sb[@]}" --job-name="fdl_${task}_${cfg}" --output="$dir/slurm-%j.out"
           --export="ALL,$env_vars" "$here/_job.sh")
      printf '%q ' "${cmd[@]}"; echo "# MODEL_ARGS=$margs"
      if [ "$dry" -eq 0 ]; then MODEL_ARGS="$margs" EXTRA_ARGS="$extra" "${cmd[@]}"; fi
    fi
    submitted=$((submitted + 1))
  done
done
echo "run.sh: $submitted job(s) $([ "$dry" -eq 1 ] && echo 'would be ')$([ "$local_run" -eq 1 ] && echo run || echo submitted), $skipped complete configuration(s) skipped"
