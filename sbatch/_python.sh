# Sourced by run.sh and profile.sh: the Python that runs the evaluation, so that the README's commands work
# right after scripts/setup_env.sh, activated or not. $PYTHON if set; else python3 on PATH when it has fastdllm
# and lm-eval installed; else the repository's .venv. Stops with one line when none of them has them.
fastdllm_python() {
  local repo="$1" who="$2" p
  if [ -n "${PYTHON:-}" ]; then p="$PYTHON"
  elif command -v python3 >/dev/null && python3 -c "import fastdllm_kernels, lm_eval" 2>/dev/null; then
    p="$(command -v python3)"
  else p="$repo/.venv/bin/python"
  fi
  if ! "$p" -c "import fastdllm_kernels, fastdllm_rt, lm_eval" 2>/dev/null; then
    echo "$who: no Python with fastdllm and lm-eval installed (tried ${PYTHON:-python3 and $repo/.venv}); run 'source scripts/setup_env.sh' in $repo first, or set PYTHON=/path/to/python" >&2
    return 2
  fi
  echo "$p"
}
