#!/usr/bin/env bash
# Every benchmark suite on this machine's GPU, in order; records go to bench/results/*.jsonl (or to
# $FASTDLLM_BENCH_OUT). Run from the repository root after `pip install -e .[dev]` (or `source
# bench/device_setup.sh` on a machine that cannot install). About 25 minutes on an H100.
#   bash bench/run_all.sh
set -u
step() { echo "== $*"; "$@" 2>&1 | tail -"${TAILN:-14}"; }
TAILN=26 step python3 bench/steps.py --shapes 7B,1.5B --providers hf,triton --iters 30
TAILN=20 step python3 bench/attention_op.py
TAILN=6 step python3 bench/e2e.py --shape 7B --batches 1,8,32 --hf-tokens 64
TAILN=8 step python3 bench/scoring.py --shapes 7B,1.5B --questions 512 --orig-questions 16
TAILN=6 step python3 bench/parity_gpu.py --backends torch,triton
# --no-write: time the committed kernels/linear/tuned.json (drop it to retune the table for this GPU)
TAILN=24 step python3 -m fastdllm_kernels.linear.sweep --no-write --record "${FASTDLLM_BENCH_OUT:-bench/results}/linear_sweep.jsonl"
TAILN=40 step python3 -m pytest bench -q --benchmark-columns=median,iqr,rounds
