#!/usr/bin/env bash
# The main job on the embedded default: the shipped small model (fastdllm_rt/small_model) evaluated on two
# local held-out tasks (GSM8K-style generation, MMLU-style one-letter multiple choice) through lm-eval, with
# the bridge's default configuration. No network. Prints accuracy and tokens/s; writes results/demo/summary.json.
# Extra arguments go to the launcher (e.g. --limit 50, or --model_args model=...,use_block_cache=True).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m evalbridge --model_args model=fastdllm_rt/small_model --tasks synth_arith,synth_mc_letter \
  --batch_size 32 --output_dir "${DEMO_OUT:-results/demo}" "$@"
