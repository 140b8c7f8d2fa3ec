#!/usr/bin/env bash
# Source on a GPU machine that cannot install packages (no network): puts this checkout on PYTHONPATH, makes
# the import name fastdllm_kernels point at kernels/ (as setup.py's package_dir does), installs any wheels
# found in .whl/, and sends the benchmark records to $OUT/results when $OUT is set.
set -e
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/fastdllm_path && ln -sfn "$PWD/kernels" /tmp/fastdllm_path/fastdllm_kernels
export PYTHONPATH=$PWD:/tmp/fastdllm_path${PYTHONPATH:+:$PYTHONPATH}
[ -n "${OUT:-}" ] && export FASTDLLM_BENCH_OUT=$OUT/results
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
set +e
