#!/usr/bin/env bash
# Source it: creates ./.venv once (Python >= 3.10), installs PyTorch (default: the CPU wheel torch==2.13.0;
# set TORCH_SPEC to choose another) and this package with its eval and dev extras, then activates it.
# A second run finds everything installed and only activates.
set -e
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "setup_env.sh: $("$py" --version 2>&1) is too old; fastdllm needs Python >= 3.10 (set PYTHON=...)" >&2; return 2 2>/dev/null || exit 2; }
[ -x "$root/.venv/bin/python" ] || "$py" -m venv "$root/.venv"
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
if ! python -c "import torch, fastdllm_rt, fastdllm_kernels, lm_eval, matplotlib, pytest, xdist" 2>/dev/null; then
  echo "setup_env.sh: installing into $root/.venv (once)"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e "$root[eval,dev]"
fi
set +e
