"""The reuse grid's plan: configurations, their folders, job names and states.

sbatch/run.sh asks ``python -m evalbridge.grid plan ...`` what to do with each task x configuration (one line
each: submit, or skip because complete / queued / running), and the collector asks ``state()`` for the rows
that have no complete result. Both name a configuration's job after its folder, so a queue check finds a job
whoever submitted it.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

from .fingerprint import compare, fingerprint
from .summary import write_atomic

TAG = re.compile(r"^k([1-9][0-9]*)(?:_(first|middle|last|[0-9][0-9,-]*))?(?:_(delta|output))?$")
SUBSETS = ("first", "middle", "last")


def default_configs(modes: str) -> list[str]:
    """k=1 (no reuse) once, then every k in {2, 3} x subset, in each requested mode."""
    out = ["k1"]
    for k in (2, 3):
        for s in SUBSETS:
            out += [f"k{k}_{s}"] + ([f"k{k}_{s}_delta"] if "delta" in modes.split(",") else [])
    return out


def config_model_args(tag: str, model: str, model_args: str) -> str:
    m = TAG.match(tag)
    if not m or (m.group(1) != "1" and not m.group(2)):
        raise ValueError(f"configuration '{tag}' is not k1 or k<K>_<first|middle|last|layers>[_delta] "
                         f"(e.g. k1, k2_first, k3_0-3_delta)")
    k, subset, mode = m.group(1), m.group(2), m.group(3) or "output"
    reuse = f"reuse_k={k}" + (f",layer_subset={subset},reuse_mode={mode}" if k != "1" else "")
    return f"model={model},use_block_cache=True,threshold=0.9,{reuse}" + (f",{model_args}" if model_args else "")


def task_dir(task: str, limit) -> str:
    return task + (f"_limit_{limit}" if limit else "")


def job_name(out: str) -> str:
    """fdl_<config>_<hash of the folder>: unique per folder, readable in squeue."""
    h = hashlib.sha1(os.path.realpath(out).encode()).hexdigest()[:10]
    return f"fdl_{os.path.basename(out.rstrip('/'))}_{h}"


def running(out: str) -> bool:
    """A job or local run holds OUT/.run.lock (flock) for as long as it runs."""
    try:
        fd = os.open(os.path.join(out, ".run.lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def queue(names: list[str]) -> dict[str, str]:
    """{job name: Slurm state} for the named jobs of any user that are pending or running ({} without Slurm)."""
    if not names or shutil.which("squeue") is None:
        return {}
    res = subprocess.run(["squeue", "--noheader", "--format=%j %T", "--states=PENDING,RUNNING,CONFIGURING,"
                          "COMPLETING,SUSPENDED,REQUEUED", "--name=" + ",".join(names)],
                         capture_output=True, text=True, timeout=60)
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"squeue failed ({last}); is the Slurm controller reachable (SLURM_CONF)?")
    return dict(line.split(None, 1) for line in res.stdout.splitlines() if line.strip())


def last_error(log: str) -> str:
    """The log's last line that reads like an error (else its last line)."""
    try:
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    pat = re.compile(r"error|exception|failed|killed|cancelled|denied|not found|no such", re.IGNORECASE)
    errs = [ln for ln in lines if pat.search(ln) and not ln.startswith("Traceback")]
    return (errs or lines or ["empty log"])[-1][:200]


def state(out: str, queued: dict[str, str]) -> tuple[str, str]:
    """(running | queued | failed | missing, detail) for a configuration folder without a complete result."""
    if running(out):
        return "running", ""
    q = queued.get(job_name(out))
    if q:
        return ("running" if q in ("RUNNING", "COMPLETING") else "queued"), q.lower()
    if os.path.exists(os.path.join(out, "log.txt")):
        return "failed", last_error(os.path.join(out, "log.txt"))
    return "missing", ""


def record(exp_dir: str, entries: list[tuple[str, str, str]]) -> None:
    """Add (task folder, configuration, folder) to EXP/grid.json, which tells the collector the whole grid."""
    os.makedirs(exp_dir, exist_ok=True)
    with open(os.path.join(exp_dir, ".grid.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(exp_dir, "grid.json")
        try:
            with open(path) as f:
                grid = json.load(f)
        except (OSError, ValueError):
            grid = {}
        for tdir, cfg, out in entries:
            grid.setdefault(tdir, {})[cfg] = os.path.relpath(out, exp_dir)
            os.makedirs(out, exist_ok=True)
        write_atomic(path, grid)


def plan(a) -> int:
    exp_dir = os.path.join(a.results, a.experiment)
    tasks = [t for t in a.tasks.split(",") if t]
    configs = a.config or default_configs(a.modes)
    try:
        margs = {c: config_model_args(c, a.model, a.model_args) for c in configs}
    except ValueError as e:
        print(f"run.sh: {e}", file=sys.stderr)
        return 2
    rows, refused = [], []
    for task in tasks:
        for cfg in configs:
            out = os.path.join(exp_dir, task_dir(task, a.limit), cfg)
            fp = fingerprint(margs[cfg], task, a.num_fewshot, a.limit, a.extra)
            st, detail = compare(out, fp)
            if st == "differs" and a.new_folder:
                out = f"{out}-{fp['id'][:8]}"
                st, detail = compare(out, fp)
            if st == "differs" and not a.force:
                refused.append(f"run.sh: {out} holds a different result ({detail})")
            rows.append([st, task, cfg, out, job_name(out), margs[cfg]])
    if refused:
        print("\n".join(refused), file=sys.stderr)
        print("run.sh: nothing was submitted; use --new-folder to keep both results, --force to replace the old "
              "one (kept as summary.previous.json), or --experiment/--results for another folder", file=sys.stderr)
        return 3
    try:
        q = {} if a.local else queue([r[4] for r in rows])
    except RuntimeError as e:
        if a.record:
            print(f"run.sh: {e}", file=sys.stderr)
            return 2
        print(f"run.sh: {e}; queued jobs are not checked in this dry run", file=sys.stderr)
        q = {}
    for r in rows:
        if r[0] == "complete" and not a.force:
            r[0] = "skip-complete"
        elif running(r[3]):
            r[0] = "skip-running"
        elif r[4] in q:
            r[0] = f"skip-{q[r[4]].lower()}"
        else:
            r[0] = "run"
    if a.record:
        record(exp_dir, [(task_dir(r[1], a.limit), r[2], r[3]) for r in rows])
    for r in rows:
        print("\t".join(r))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalbridge.grid plan")
    ap.add_argument("command", choices=["plan"])
    for opt in ("--results", "--experiment", "--tasks", "--model"):
        ap.add_argument(opt, required=True)
    for opt in ("--model-args", "--limit", "--num-fewshot", "--extra"):
        ap.add_argument(opt, default="")
    ap.add_argument("--modes", default="output")
    ap.add_argument("--config", action="append")
    for flag in ("--force", "--new-folder", "--local", "--record"):
        ap.add_argument(flag, action="store_true")
    return plan(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
