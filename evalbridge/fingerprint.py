"""The fingerprint of a configuration's result: everything that determines its numbers.

A grid runs for days and is resumed many times; a result is reused only when it was made by the same model
(folder and weights, or hub id and revision), the same model_args, task, few-shot count, limit, extra lm-eval
arguments and the same lm-eval and fastdllm versions. The weights are identified by their files' names, sizes
and modification times plus the content of config.json: hashing 15 GB of safetensors on every resume would take
minutes, while any rewrite of a weight file changes its size or mtime. A hub model is identified by id and
revision (pin ``revision=`` in model_args to make it exact).

    python -m evalbridge.fingerprint job-start OUT   # a job: check OUT, stage OUT/.partial (exit 10: complete)
    python -m evalbridge.fingerprint seal OUT        # a job: publish OUT/.partial as OUT's complete result
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys

from .summary import SECRET_KEYS, write_atomic

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PARTIAL = ".partial"


def parse_model_args(text: str) -> dict:
    """lm-eval's ``k=v,k=v`` form; credential-looking keys are dropped (they never determine a result)."""
    out = {}
    for item in (text or "").split(","):
        if item.strip():
            key, _, value = item.partition("=")
            if not SECRET_KEYS.search(key.strip()):
                out[key.strip()] = value.strip()
    return out


def _version(dist: str):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def model_identity(model: str, revision: str | None) -> dict:
    folder = os.path.expanduser(model)
    if not os.path.isdir(folder):
        return {"hub_id": model, "revision": revision or "main"}
    stats, config = [], None
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(WEIGHT_SUFFIXES):
                st = os.stat(path)
                stats.append([os.path.relpath(path, folder), st.st_size, st.st_mtime_ns])
            elif name == "config.json" and root == folder:
                with open(path, "rb") as f:
                    config = hashlib.sha256(f.read()).hexdigest()[:16]
    weights = hashlib.sha256(json.dumps(sorted(stats)).encode()).hexdigest()[:16]
    return {"folder": os.path.realpath(folder), "weights": weights, "config_json": config}


def fingerprint(model_args: str, task: str, num_fewshot=None, limit=None, extra=None) -> dict:
    args = parse_model_args(model_args)
    model = args.get("model") or args.get("model_path") or ""
    fp = {"model": model_identity(model, args.get("revision")), "model_args": dict(sorted(args.items())),
          "task": task, "num_fewshot": str(num_fewshot or ""), "limit": str(limit or ""),
          "extra_args": " ".join((extra or "").split()),
          "versions": {"lm_eval": _version("lm_eval"), "fastdllm": _version("fastdllm")}}
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The fields that differ, as ``name: old -> new`` (the id, a hash of the rest, is left out)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "id" and not prefix:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def read_complete(out: str) -> dict | None:
    """OUT/summary.json when it is a complete result (None when absent, torn or incomplete)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("complete") is True else None


def compare(out: str, fp: dict) -> tuple[str, str]:
    """("complete" | "differs" | "new", detail) for the result in OUT against the fingerprint FP."""
    s = read_complete(out)
    if s is None:
        return "new", ""
    old = s.get("fingerprint")
    if not isinstance(old, dict):
        return "differs", "the result has no fingerprint (made before fingerprints were recorded)"
    if old.get("id") == fp["id"]:
        return "complete", ""
    return "differs", "; ".join(differences(old, fp)) or "fingerprint id"


def _from_env() -> dict:
    e = os.environ
    return fingerprint(e.get("MODEL_ARGS", ""), e.get("TASK", ""), e.get("NUM_FEWSHOT"), e.get("LIMIT"),
                       e.get("EXTRA_ARGS"))


def job_start(out: str) -> int:
    """0: OUT/.partial staged for a run; 10: a complete result of this fingerprint exists (FORCE unset);
    2: OUT holds a different result and FORCE is unset."""
    fp = _from_env()
    state, detail = compare(out, fp)
    force = os.environ.get("FORCE", "") == "1"
    if state == "complete" and not force:
        print(f"[job] {out} is complete with this fingerprint; nothing to do")
        return 10
    if state == "differs" and not force:
        print(f"[job] {out} holds a different result ({detail}); rerun with FORCE=1 to replace it "
              f"(it is kept as summary.previous.json)", file=sys.stderr)
        return 2
    partial = os.path.join(out, PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    write_atomic(os.path.join(partial, "fingerprint.json"), fp)
    return 0


def seal(out: str) -> int:
    """Publish OUT/.partial: its summary gets the fingerprint; a result it replaces becomes *.previous."""
    partial = os.path.join(out, PARTIAL)
    s = read_complete(partial)
    if s is None:
        print(f"[job] {partial}/summary.json is missing or incomplete; the previous result is kept", file=sys.stderr)
        return 1
    with open(os.path.join(partial, "fingerprint.json")) as f:
        s["fingerprint"] = json.load(f)
    if os.path.exists(os.path.join(out, "summary.json")):     # copied, so OUT always holds a summary
        shutil.copy2(os.path.join(out, "summary.json"), os.path.join(out, "summary.previous.json"))
        if os.path.isdir(os.path.join(out, "lm_eval")):
            shutil.rmtree(os.path.join(out, "lm_eval.previous"), ignore_errors=True)
            os.replace(os.path.join(out, "lm_eval"), os.path.join(out, "lm_eval.previous"))
    if os.path.isdir(os.path.join(partial, "lm_eval")):
        shutil.rmtree(os.path.join(out, "lm_eval"), ignore_errors=True)
        os.replace(os.path.join(partial, "lm_eval"), os.path.join(out, "lm_eval"))
    write_atomic(os.path.join(out, "summary.json"), s)
    shutil.rmtree(partial, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("job-start", "seal"):
        print("usage: python -m evalbridge.fingerprint job-start|seal OUT_DIR", file=sys.stderr)
        return 2
    return job_start(argv[1]) if argv[0] == "job-start" else seal(argv[1])


if __name__ == "__main__":
    raise SystemExit(main())
