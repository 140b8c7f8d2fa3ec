# Resolve a Hugging Face token the way huggingface_hub does and export it as HF_TOKEN, never printing it.
# Order: $HF_TOKEN, $HUGGING_FACE_HUB_TOKEN, $HF_TOKEN_PATH, $HF_HOME/token, ~/.cache/huggingface/token,
# ~/.huggingface/token. Sets HF_TOKEN_SOURCE to where it came from ("" when none).
resolve_hf_token() {
  HF_TOKEN_SOURCE=""
  if [ -n "${HF_TOKEN:-}" ]; then HF_TOKEN_SOURCE='$HF_TOKEN'
  elif [ -n "${HUGGING_FACE_HUB_TOKEN:-}" ]; then HF_TOKEN="$HUGGING_FACE_HUB_TOKEN"; HF_TOKEN_SOURCE='$HUGGING_FACE_HUB_TOKEN'
  else
    local f
    for f in "${HF_TOKEN_PATH:-}" "${HF_HOME:-$HOME/.cache/huggingface}/token" "$HOME/.cache/huggingface/token" \
             "$HOME/.huggingface/token"; do
      if [ -n "$f" ] && [ -s "$f" ]; then
        HF_TOKEN="$(tr -d '[:space:]' < "$f")"; HF_TOKEN_SOURCE="$f"; break
      fi
    done
  fi
  if [ -n "$HF_TOKEN_SOURCE" ]; then export HF_TOKEN; else unset HF_TOKEN 2>/dev/null || true; fi
  export HF_TOKEN_SOURCE
}
