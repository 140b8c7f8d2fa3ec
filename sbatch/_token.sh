# Where the Hugging Face token comes from, found the way huggingface_hub looks for it, without ever putting the
# value on a command line, in a job's stored environment or in any output: jobs get the path of a 0600 file
# (HF_TOKEN_PATH, which huggingface_hub reads), never the token.
#
# resolve_hf_token: sets HF_TOKEN_SOURCE ('$HF_TOKEN', '$HUGGING_FACE_HUB_TOKEN', a file, or "" when none) and
# HF_TOKEN_FILE (the file, when the token is in one). Order: $HF_TOKEN, $HUGGING_FACE_HUB_TOKEN, $HF_TOKEN_PATH,
# $HF_HOME/token (default ~/.cache/huggingface/token), ~/.huggingface/token.
resolve_hf_token() {
  HF_TOKEN_SOURCE="" HF_TOKEN_FILE=""
  if [ -n "${HF_TOKEN:-}" ]; then HF_TOKEN_SOURCE='$HF_TOKEN'
  elif [ -n "${HUGGING_FACE_HUB_TOKEN:-}" ]; then HF_TOKEN_SOURCE='$HUGGING_FACE_HUB_TOKEN'
  else
    local f
    for f in "${HF_TOKEN_PATH:-}" "${HF_HOME:-$HOME/.cache/huggingface}/token" "$HOME/.huggingface/token"; do
      if [ -n "$f" ] && [ -s "$f" ]; then HF_TOKEN_SOURCE="$f" HF_TOKEN_FILE="$f"; break; fi
    done
  fi
  export HF_TOKEN_SOURCE
}

# token_store_path: the per-user 0600 file a token given by value (environment or token=) is kept in for jobs.
token_store_path() { echo "${XDG_CACHE_HOME:-$HOME/.cache}/fastdllm/hf_token"; }

# store_token: the token on stdin (never as an argument) -> the 0600 file; prints nothing.
store_token() {
  local path dir
  path="$(token_store_path)"; dir="$(dirname "$path")"
  (umask 077 && mkdir -p "$dir" && cat > "$path.tmp.$$" && mv -f "$path.tmp.$$" "$path")
}
