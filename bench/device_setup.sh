#!/usr/bin/env bash
# Source on a GPU machine: installs this checkout (no downloads), carried wheels if any, and points the
# benchmark records at $OUT/results when the device tool provides $OUT.
set -e
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
export FASTDLLM_BENCH_OUT=${OUT:-$PWD/bench/results}/results
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
set +e
