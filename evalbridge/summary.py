"""summary.json: one file per run, written atomically, with no secrets in it."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import tempfile

# keys whose value is a credential ("token", "hf_token", "api_key", ...), not counters like "tokens_generated"
SECRET_KEYS = re.compile(r"(^|_)(token|secret|password|api_?key|authorization|credentials?)$", re.IGNORECASE)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                       ("lm_eval", "lm_eval"), ("fastdllm", "fastdllm")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = None
    if out["fastdllm"] is None:
        import fastdllm_rt

        out["fastdllm"] = fastdllm_rt.__version__
    return out


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True, timeout=5).stdout.strip()
    return res.stdout.strip() + ("-dirty" if dirty else "")


def scrub(obj, secrets: list[str]):
    """Drop secret-looking keys and blank out any known secret value wherever it appears."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEYS.search(str(k)) else scrub(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            if s:
                obj = obj.replace(s, "<redacted>")
        return obj
    return obj


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: dict) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a summary. The file
    gets the mode any other file would get (0666 less the umask), not mkstemp's 0600, so colleagues can read it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".summary.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build(*, tasks, config_tag, lm_results, reports, eval_params, secrets) -> dict:
    from .throughput import merge_reports

    first = reports[0]
    throughput = merge_reports([r["throughput"] for r in reports])
    skipped = {k: v["layer_evaluations"]["skipped"] for k, v in throughput.items() if not k.startswith("_")}
    notes = sorted({n for k, v in throughput.items() if not k.startswith("_") for n in v.get("notes", [])})
    reuse = first["reuse"]
    summary = {
        "tasks": tasks,
        "config_tag": config_tag,
        "metrics": (lm_results or {}).get("results", {}),
        "groups": (lm_results or {}).get("groups", {}),
        "n_samples": (lm_results or {}).get("n-samples", {}),
        "throughput": throughput,
        "reuse": {"policy": reuse, "skipped_layer_evaluations": skipped,
                  "why_zero_on_scoring_path": [n for n in notes if "no layer evaluation was skipped" in n]},
        "scoring": first["model_args"]["scoring"],
        "model_args": first["model_args"],
        "runtime": first["runtime"],
        "ignored_model_args": first["ignored_model_args"],
        "evaluation": eval_params,
        "world_size": first["world_size"],
        "versions": versions(),
        "git_commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    return scrub(summary, secrets)
