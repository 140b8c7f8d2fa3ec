#!/usr/bin/env bash
# One GPU session of measurements, in priority order; each step appends its records to $OUT/results (tarred
# after every step so a cut-off run still returns what it finished). Needs lm-eval's wheels carried in .whl
# for the evaluation steps (bench/device_setup.sh installs them).
#   bash bench/gpu_session.sh
source bench/device_setup.sh > "$OUT/log.txt" 2>&1
cat "$OUT/log.txt"
save() { (cd "$OUT" && tar cf results.tar results); }
step() { echo "== $*" | tee -a "$OUT/log.txt"; "$@" 2>&1 | tee -a "$OUT/full.log" | tail -"${TAILN:-14}" | tee -a "$OUT/log.txt"; save; }

TAILN=26 step python3 bench/steps.py --shapes 7B,1.5B --providers hf,triton,triton+pdl --iters 30
TAILN=8 step python3 bench/pdl_gap.py
TAILN=10 step python3 bench/step_profile.py --shape 7B
# --no-write: measure against the committed kernels/linear/tuned.json (drop it to retune for this GPU)
TAILN=24 step python3 bench/linear_sweep.py --no-write
TAILN=6 step python3 bench/e2e.py --shape 7B --batches 1,8,32 --hf-tokens 64
TAILN=3 step python3 bench/sampler_host.py --shape 1.5B
TAILN=6 step python3 bench/l2_warm.py
TAILN=8 step python3 bench/scoring.py --shapes 7B,1.5B --questions 512 --orig-questions 16
# one local task end to end through lm-eval on the GPU, CUDA-event timing, summary.json kept
TAILN=10 step python3 -m evalbridge --model_args model=fastdllm_rt/small_model,use_block_cache=True \
  --tasks synth_arith,synth_mc_letter --batch_size 32 --output_dir "$OUT/results/gpu_eval"
# the torch-profiler fallback on the GPU: its ranges must name the forward kinds
FASTDLLM_TORCH_PROFILE="$OUT/trace.json" TAILN=3 step python3 -m evalbridge \
  --model_args model=fastdllm_rt/small_model,use_block_cache=True,reuse_k=2 --tasks synth_arith --limit 4 \
  --output_dir "$OUT/profile_run"
python3 - "$OUT/trace.json" <<'PY' | tee -a "$OUT/log.txt"
import json, sys, collections
ev = json.load(open(sys.argv[1]))["traceEvents"]
names = collections.Counter(e["name"] for e in ev if str(e.get("name", "")).startswith("fastdllm:"))
print("trace ranges:", dict(names))
PY
gzip -f "$OUT/trace.json" 2>/dev/null
TAILN=36 step python3 bench/attention_op.py
rm -rf "$OUT/results" "$OUT/profile_run"
