#!/usr/bin/env bash
# Source on a GPU machine: installs this checkout (no downloads), carried wheels if any, and points the
# benchmark records at $OUT/results when the device tool provides $OUT.
set -e
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# No install (the machine cannot fetch build tools): the checkout goes on PYTHONPATH and the import name
# fastdllm_kernels points at kernels/ through a link, as setup.py's package_dir does.
mkdir -p /tmp/fastdllm_path && ln -sfn "$PWD/kernels" /tmp/fastdllm_path/fastdllm_kernels
export PYTHONPATH=$PWD:/tmp/fastdllm_path${PYTHONPATH:+:$PYTHONPATH}
export FASTDLLM_BENCH_OUT=${OUT:-$PWD/bench/results}/results
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
set +e
