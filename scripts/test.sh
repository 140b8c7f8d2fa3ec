#!/usr/bin/env bash
# The test suite on CPU (Triton kernels under TRITON_INTERPRET=1, set by tests/conftest.py), two workers.
# Extra arguments go to pytest (e.g. tests/rt -k oracle).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tiny models: one thread per worker (and per launched subprocess) beats oversubscribed intra-op threads
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
python -m pytest -q -rs -n "${TEST_WORKERS:-2}" --dist loadgroup --durations=15 "${@:-tests}"
