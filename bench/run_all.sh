#!/usr/bin/env bash
# The benchmark suites on this machine's GPU. Records go to $FASTDLLM_BENCH_OUT, else $OUT/results when $OUT is
# set (with each step's full log in $OUT/logs), else bench/results/*.jsonl. Run from the repository root after
# `pip install -e .[dev]` (or `source bench/device_setup.sh` on a machine that cannot install).
#   bash bench/run_all.sh          # every suite: about 25 minutes on an H100
#   bash bench/run_all.sh quick    # the GPU tests, steps (7B, 1.5B; hf, triton), parity, e2e at batch 1: under 8
#                                  # minutes on an H100 (each step is cut off at its time limit, saying so)
set -u
if [ -n "${OUT:-}" ]; then
  export FASTDLLM_BENCH_OUT="${FASTDLLM_BENCH_OUT:-$OUT/results}"
  mkdir -p "$OUT/logs"
fi
export PYTHONUNBUFFERED=1
failed=()
# step NAME SECONDS CMD...: run CMD under a time limit, show its last TAILN lines, keep the full log under $OUT
step() {
  local name=$1 limit=$2 log
  shift 2
  log="${OUT:+$OUT/logs/$name.log}"
  echo "== $name: $*"
  timeout "$limit" "$@" > "${log:-/tmp/fastdllm_bench_$name.log}" 2>&1
  local rc=$?
  tail -"${TAILN:-14}" "${log:-/tmp/fastdllm_bench_$name.log}"
  [ $rc -eq 124 ] && echo "== $name: cut off after ${limit}s"
  [ $rc -ne 0 ] && failed+=("$name (exit $rc)")
  return 0
}
workers=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 4")

if [ "${1:-all}" = quick ]; then
  # shellcheck disable=SC2086
  TAILN=20 step gpu_tests 200 python3 -m pytest -q $workers -p no:cacheprovider \
    ${OUT:+--junitxml=$OUT/logs/gpu_tests.xml} tests/kernels tests/rt/test_triton_backend.py tests/rt/test_graphs.py \
    tests/rt/test_batch.py tests/bench
  TAILN=26 step steps 150 python3 bench/steps.py --shapes 7B,1.5B --providers hf,triton --iters 30
  TAILN=6 step parity 60 python3 bench/parity_gpu.py --backends torch,triton
  TAILN=6 step e2e 60 python3 bench/e2e.py --shape 7B --batches 1 --hf-tokens 64
else
  TAILN=26 step steps 900 python3 bench/steps.py --shapes 7B,1.5B --providers hf,triton --iters 30
  TAILN=20 step attention_op 900 python3 bench/attention_op.py
  TAILN=6 step e2e 900 python3 bench/e2e.py --shape 7B --batches 1,8,32 --hf-tokens 64
  TAILN=8 step scoring 900 python3 bench/scoring.py --shapes 7B,1.5B --questions 512 --orig-questions 16
  TAILN=6 step parity 900 python3 bench/parity_gpu.py --backends torch,triton
  # --no-write: time the committed kernels/linear/tuned.json (drop it to retune the table for this GPU)
  TAILN=24 step linear_sweep 900 python3 -m fastdllm_kernels.linear.sweep --no-write \
    --record "${FASTDLLM_BENCH_OUT:-bench/results}/linear_sweep.jsonl"
  TAILN=40 step pytest_bench 1800 python3 -m pytest bench -q --benchmark-columns=median,iqr,rounds
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "== failed: ${failed[*]}"
  exit 1
fi
echo "== all passed"
