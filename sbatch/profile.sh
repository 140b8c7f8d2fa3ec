#!/usr/bin/env bash
#SBATCH --job-name=fastdllm_profile
#SBATCH --nodes=1
#SBATCH --ntasks=1
# Profile one evaluation: nsys with CUDA, NVTX and OS-runtime traces, the capture range opened by the program
# around the timed region (FASTDLLM_PROFILE=1 -> cudaProfilerStart at the first harness call); the runtime
# names an NVTX range per forward by the kinds it holds (fastdllm:full_block, fastdllm:sub_block_skip, ...).
# Where nsys is absent, a torch-profiler trace (chrome JSON) with the same range names is written instead.
#
#   sbatch/profile.sh [--dry-run] [--model M] [--task T] [--config TAG] [--limit N] [--out DIR]
# Runs the same directly or under sbatch (which runs a copy from its spool: the repository is found through the
# job's recorded command). --dry-run prints the command and writes nothing.
set -euo pipefail
here="${FASTDLLM_SBATCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
if [ ! -f "$here/_token.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  here="$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)")"
fi
[ -f "$here/_token.sh" ] || { echo "profile.sh: cannot find the repository's sbatch folder; set FASTDLLM_SBATCH_DIR" >&2; exit 2; }
source "$here/_token.sh"
model="Efficient-Large-Model/Fast_dLLM_v2_7B" task="gsm8k" config="k2_first" limit="8" out="$PWD/profiles" dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --model) model="$2"; shift 2 ;;
    --task) task="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '5,12p' "$here/profile.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "profile.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ "$config" =~ ^k([0-9]+)_([a-z0-9,-]+)(_delta)?$ ]] || { echo "profile.sh: bad --config $config" >&2; exit 2; }
mode=output; [ -n "${BASH_REMATCH[3]}" ] && mode=delta
margs="model=$model,use_block_cache=True,reuse_k=${BASH_REMATCH[1]},layer_subset=${BASH_REMATCH[2]},reuse_mode=$mode"
source "$here/_python.sh"
py="$(fastdllm_python "$(dirname "$here")" profile.sh)" || exit 2
eval_cmd=("$py" -m evalbridge --model_args "$margs" --tasks "$task" --limit "$limit"
          --output_dir "$out/$task/$config" --config_tag "$config")
[ "$dry" -eq 1 ] || mkdir -p "$out/$task/$config"
resolve_hf_token
export PYTHONHASHSEED=0 CUBLAS_WORKSPACE_CONFIG=:4096:8 TOKENIZERS_PARALLELISM=false
if command -v nsys >/dev/null 2>&1; then
  cmd=(nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop
       --force-overwrite=true -o "$out/$task/$config/profile" "${eval_cmd[@]}")
  printf '%s ' env FASTDLLM_PROFILE=1 "${cmd[@]}"; echo
  [ "$dry" -eq 1 ] || FASTDLLM_PROFILE=1 "${cmd[@]}"
else
  echo "profile.sh: nsys not found; writing a torch-profiler trace instead" >&2
  printf '%s ' env FASTDLLM_TORCH_PROFILE="$out/$task/$config/trace.json" "${eval_cmd[@]}"; echo
  [ "$dry" -eq 1 ] || FASTDLLM_TORCH_PROFILE="$out/$task/$config/trace.json" "${eval_cmd[@]}"
fi
