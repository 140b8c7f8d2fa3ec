#!/usr/bin/env bash
# The reuse-study grid: tasks x configurations, one Slurm job each (sbatch/_job.sh), or run here in turn.
set -euo pipefail
usage() {
  cat <<'TXT'
Usage: sbatch/run.sh --tasks TASK[,TASK...] [options]

Submits one Slurm job per task x configuration (or runs them here in turn with --local). A configuration
whose complete result has the same fingerprint (model and weights, model_args, task, few-shot count, limit,
extra arguments, lm-eval and fastdllm versions) is skipped; one whose job is queued or running is skipped; a
folder holding a different result is refused before anything is submitted.

Grid:
  --tasks T1,T2          lm-eval tasks (required)
  --config TAG           a configuration, repeatable: k1 (no reuse) or k<K>_<first|middle|last|layers>[_delta]
                         (default: k1 and k2/k3 x first/middle/last)
  --modes output,delta   reuse modes of the default grid (default: output)
  --model ID_OR_PATH     hub id or folder (default: Efficient-Large-Model/Fast_dLLM_v2_7B)
  --model-args "k=v,..." more model_args (a token= here is moved into a 0600 file, never passed on)
  --num-fewshot N  --limit N  --batch-size N  --extra "lm-eval args"
Results:
  --results DIR          root folder (default: $FASTDLLM_RESULTS or ./results)
  --experiment NAME      experiment folder (default: reuse_study_<model folder or hub name>)
  --force                rerun complete configurations (the old result stays until the new one completes,
                         then is kept as summary.previous.json)
  --new-folder           where a folder holds a different result, write beside it (<config>-<fingerprint>)
Running:
  --local                run here, one after another, instead of submitting
  --dry-run              print the commands (runnable as printed); write and submit nothing
  --partition P  --time HH:MM:SS  --mem M  --cpus N  --account A  --qos Q
  --gpus N               GPUs per node; the evaluation runs data-parallel, one process per GPU
  --ntasks N             processes per node (default: --gpus, else 1)
  --nodes N              nodes per job (default 1)
  --sbatch-args "..."    more sbatch options, e.g. "--hold --begin=now+1hour"
  -h, --help             this text

Then: python -m evalbridge.collect RESULTS/EXPERIMENT   (tables and plots; every configuration is a row)
TXT
}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_token.sh"
die() { echo "run.sh: $*" >&2; exit 2; }

tasks="" configs=() modes="output" limit="" force=0 dry=0 local_run=0 new_folder=0 experiment=""
model="Efficient-Large-Model/Fast_dLLM_v2_7B" model_args="" num_fewshot="" batch_size="" extra=""
results="${FASTDLLM_RESULTS:-$PWD/results}" gpus="" ntasks="" nodes=1 sb=()
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1; shift; continue ;;
    --dry-run) dry=1; shift; continue ;;
    --local) local_run=1; shift; continue ;;
    --new-folder) new_folder=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --tasks|--config|--modes|--limit|--model|--model-args|--experiment|--results|--num-fewshot|--batch-size|\
    --extra|--gpus|--ntasks|--nodes|--partition|--time|--mem|--account|--qos|--cpus|--sbatch-args)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)" ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  case "$1" in
    --tasks) tasks="$2" ;;
    --config) configs+=(--config "$2") ;;
    --modes) modes="$2" ;;
    --limit) limit="$2" ;;
    --model) model="$2" ;;
    --model-args) model_args="$2" ;;
    --experiment) experiment="$2" ;;
    --results) results="$2" ;;
    --num-fewshot) num_fewshot="$2" ;;
    --batch-size) batch_size="$2" ;;
    --extra) extra="$2" ;;
    --gpus) gpus="$2"; sb+=(--gres="gpu:$2") ;;
    --ntasks) ntasks="$2" ;;
    --nodes) nodes="$2" ;;
    --partition|--time|--mem|--account|--qos) sb+=("$1=$2") ;;
    --cpus) sb+=(--cpus-per-task="$2") ;;
    --sbatch-args) read -r -a more <<< "$2"; sb+=("${more[@]}") ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
[ -n "$tasks" ] || die "--tasks is required (comma-separated lm-eval task names; see --help)"
for n in "$limit" "$num_fewshot" "$gpus" "$ntasks" "$nodes"; do
  [[ -z "$n" || "$n" =~ ^[0-9]+$ ]] || die "'$n' is not a whole number"
done

# A token in model_args leaves them before anything is printed, submitted or started.
token_arg="" kept="" rest="$model_args"
while [ -n "$rest" ]; do
  item="${rest%%,*}"; if [ "$item" = "$rest" ]; then rest=""; else rest="${rest#*,}"; fi
  case "${item#"${item%%[![:space:]]*}"}" in
    token=*|hf_token=*) token_arg="${item#*=}" ;;
    *) kept="${kept:+$kept,}$item" ;;
  esac
done
model_args="$kept"
source "$here/_python.sh"
py="$(fastdllm_python "$(dirname "$here")" run.sh)" || exit 2
results="$(realpath -m "$results")"
[ -d "$model" ] && model="$(realpath "$model")"     # jobs may start in another folder
[ -n "$experiment" ] || experiment="reuse_study_$(basename "${model%/}" | tr -c 'A-Za-z0-9._\n-' '_')"

# The job reads the token from a 0600 file (HF_TOKEN_PATH); a token given by value is stored in one first.
resolve_hf_token
token_path="$HF_TOKEN_FILE"
if [ -n "$token_arg" ] || { [ -n "$HF_TOKEN_SOURCE" ] && [ -z "$HF_TOKEN_FILE" ]; }; then
  token_path="$(token_store_path)"
  if [ "$dry" -eq 0 ]; then
    if [ -n "$token_arg" ]; then printf '%s' "$token_arg" | store_token
    else printf '%s' "${HF_TOKEN:-${HUGGING_FACE_HUB_TOKEN:-}}" | store_token; fi
  else
    where="$HF_TOKEN_SOURCE"; [ -z "$token_arg" ] || where="token= in --model-args"
    echo "# the token ($where) is written to $token_path (0600) on a real run" >&2
  fi
fi

# Gated datasets: stop before anything is submitted when no token resolves.
if ! HF_TOKEN="${token_arg:-${HF_TOKEN:-}}" "$py" -m evalbridge.gated --tasks "$tasks"; then
  echo "run.sh: nothing was submitted." >&2; exit 2
fi

plan_args=(plan --results "$results" --experiment "$experiment" --tasks "$tasks" --model "$model"
           --model-args "$model_args" --limit "$limit" --num-fewshot "$num_fewshot" --extra "$extra"
           --modes "$modes" "${configs[@]}")
[ "$force" -eq 1 ] && plan_args+=(--force)
[ "$new_folder" -eq 1 ] && plan_args+=(--new-folder)
[ "$local_run" -eq 1 ] && plan_args+=(--local)
[ "$dry" -eq 0 ] && plan_args+=(--record)
exp_dir="$results/$experiment"
if [ "$dry" -eq 0 ] && [ "$local_run" -eq 0 ]; then     # two submitters at once: one plans and submits at a time
  mkdir -p "$exp_dir"
  exec 8>>"$exp_dir/.submit.lock"
  flock -w 120 8 || die "another run.sh has been submitting to $exp_dir for 2 minutes; try again"
fi
plan="$("$py" -m evalbridge.grid "${plan_args[@]}")" || exit $?

per_node="${ntasks:-${gpus:-1}}"
[ "$per_node" -ge 1 ] || per_node=1
sb=(--nodes="$nodes" --ntasks-per-node="$per_node" "${sb[@]}")
pdeath=(setpriv --pdeathsig KILL)          # a local job dies with this script, even under kill -9
ran=0 skipped=0 failed=()
while IFS=$'\t' read -r -u 3 action task cfg out name margs; do
  [ -n "$action" ] || continue
  if [ "$action" != run ]; then echo "skip $task $cfg (${action#skip-}: $out)"; skipped=$((skipped + 1)); continue; fi
  job_env=(env -u HF_TOKEN -u HUGGING_FACE_HUB_TOKEN "OUT=$out" "TASK=$task" "CONFIG=$cfg" "MODEL_ARGS=$margs"
           "LIMIT=$limit" "NUM_FEWSHOT=$num_fewshot" "BATCH_SIZE=$batch_size" "EXTRA_ARGS=$extra" "FORCE=$force"
           "PYTHON=$py" "FASTDLLM_SBATCH_DIR=$here")
  [ -n "$token_path" ] && job_env+=("HF_TOKEN_PATH=$token_path")
  if [ "$local_run" -eq 1 ]; then
    cmd=("${job_env[@]}" "${pdeath[@]}" bash "$here/_job.sh")
  else
    cmd=("${job_env[@]}" sbatch --parsable "${sb[@]}" --job-name="$name" --output="$out/slurm-%j.out"
         --export=ALL "$here/_job.sh")
  fi
  printf '%q ' "${cmd[@]}"; echo
  ran=$((ran + 1))
  [ "$dry" -eq 1 ] && continue
  rc=0; "${cmd[@]}" || rc=$?
  if [ "$local_run" -eq 1 ] && [ "$rc" -eq 75 ]; then echo "skip $task $cfg (running elsewhere: $out)"
  elif [ "$rc" -ne 0 ]; then failed+=("$task $cfg (exit $rc; see $out/log.txt)"); fi
done 3<<< "$plan"

verb="$([ "$local_run" -eq 1 ] && echo run || echo submitted)"
echo "run.sh: $ran job(s) $([ "$dry" -eq 1 ] && echo 'would be ')$verb, $skipped skipped (complete, queued or running)"
[ "$dry" -eq 1 ] || [ "$local_run" -eq 1 ] || echo "run.sh: collect with: $py -m evalbridge.collect $exp_dir"
if [ ${#failed[@]} -gt 0 ]; then printf 'run.sh: failed: %s\n' "${failed[@]}" >&2; exit 1; fi
