"""The grid against a real single-node Slurm (tests/sbatch/slurm_cluster.py) with the shipped small model:
one job per configuration whoever submits, a cancelled job resumed without losing anything, fingerprints,
--force, the collector on a damaged folder, data parallelism under srun, profile.sh under sbatch, and no token
in any job record, process list, output or file."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from evalbridge.grid import job_name
from tests.conftest import REPO

SBATCH = os.path.join(REPO, "sbatch")
MODEL = os.path.join(REPO, "fastdllm_rt", "small_model")
SECRET = "hf_SlurmGridSecret5551234"
# The by-file / by-model_args cases use a token of their own: their run.sh carries token= in its own argument list
# (the user typed it), which a grid test watching `ps` on another worker would otherwise take for a leak.
OTHER_SECRET = "hf_SlurmOtherSecret7770001"
pytestmark = pytest.mark.xdist_group("slurm")


def _job_details(slurm, job_id) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], env=slurm.env, capture_output=True,
                          text=True).stdout


def env_for(slurm, tmp_path, **extra):
    e = {k: v for k, v in slurm.env.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    e.update(PYTHON=sys.executable, HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return e


def run_sh(e, *args, cwd=None):
    return subprocess.run(["bash", os.path.join(SBATCH, "run.sh"), *args], env=e, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def grid_args(results, *more):
    return ["--tasks", "synth_arith", "--model", MODEL, "--limit", "2", "--batch-size", "8", "--results",
            str(results), "--config", "k1", "--config", "k2_first", *more]


def done(slurm, ids):
    states = {j: s for j, (_, s) in slurm.jobs().items() if j in ids}
    return all(s not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") for s in states.values())


def no_secret_anywhere(slurm, texts, folders, secret=SECRET):
    for path, text in slurm.stored_job_files().items():
        assert secret not in text, f"the token is in the stored job file {path}"
    for text in texts:
        assert secret not in text
    for folder in folders:
        for d, _, files in os.walk(folder):
            for f in files:
                with open(os.path.join(d, f), "rb") as fh:
                    assert secret.encode() not in fh.read(), f"the token is in {os.path.join(d, f)}"


def watch_ps(stop, seen):
    """Every process's argument list, sampled until STOP is set (the token must be in none)."""
    while not stop.is_set():
        out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
        seen.append(out)
        time.sleep(0.3)


@pytest.fixture(scope="module")
def grid(slurm, tmp_path_factory):
    """Two submitters at once, a third while the jobs are queued, one job cancelled mid-run, then a rerun:
    the grid every other test here reads. The token is given by environment throughout."""
    tmp = tmp_path_factory.mktemp("grid")
    e = env_for(slurm, tmp, HF_TOKEN=SECRET)
    res = tmp / "res"
    outputs, seen, stop = [], [], threading.Event()
    watcher = threading.Thread(target=watch_ps, args=(stop, seen), daemon=True)
    watcher.start()
    try:
        both = [None, None]
        threads = [threading.Thread(target=lambda i=i: both.__setitem__(i, run_sh(e, *grid_args(res))))
                   for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.returncode == 0 for r in both), [r.stderr for r in both]
        third = run_sh(e, *grid_args(res))
        outputs += [r.stdout + r.stderr for r in both + [third]]
        exp = res / "reuse_study_small_model" / "synth_arith_limit_2"
        names = {job_name(str(exp / c)) for c in ("k1", "k2_first")}     # other tests may submit beside these
        jobs = {j: v for j, v in slurm.jobs("fdl_").items() if v[0] in names}
        assert len(jobs) == 2, f"two submitters and a third gave {jobs}: one job per configuration expected"
        assert "0 job(s) submitted" in third.stdout
        k2_id = next(j for j, (n, _) in jobs.items() if n.startswith("fdl_k2_first_"))
        slurm.wait(lambda: (exp / "k2_first" / ".partial").is_dir(), 120, "the k2_first job to start")
        subprocess.run(["scancel", k2_id], env=slurm.env, check=True)
        slurm.wait(lambda: done(slurm, set(jobs)), 300, "the first jobs to end")
        k1_summary = (exp / "k1" / "summary.json").read_bytes()
        assert not (exp / "k2_first" / "summary.json").exists()
        rerun = run_sh(e, *grid_args(res))
        outputs.append(rerun.stdout + rerun.stderr)
        assert "1 job(s) submitted" in rerun.stdout and "skip synth_arith k1 (complete" in rerun.stdout
        ids = {j for j, v in slurm.jobs("fdl_").items() if v[0] in names} - set(jobs)
        slurm.wait(lambda: done(slurm, ids), 300, "the resumed job to end")
    finally:
        stop.set()
        watcher.join()
    return dict(slurm=slurm, env=e, res=res, exp=exp, k1_summary=k1_summary, outputs=outputs, ps=seen, tmp=tmp)


def test_one_job_per_configuration_and_a_cancelled_job_resumes_without_loss(grid):
    """Duplicate and concurrent submissions each submitted every configuration again, and a duplicate's start
    deleted the finished summary; a cancelled job's rerun must redo only what is missing."""
    exp = grid["exp"]
    assert (exp / "k1" / "summary.json").read_bytes() == grid["k1_summary"]      # untouched by the rerun
    for cfg in ("k1", "k2_first"):
        s = json.loads((exp / cfg / "summary.json").read_text())
        assert s["complete"] is True and s["fingerprint"]["task"] == "synth_arith"
        assert oct((exp / cfg / "summary.json").stat().st_mode & 0o777) == oct(0o644)
    assert "cancelled" in (exp / "k2_first" / "log.txt").read_text()


def test_no_token_in_job_records_processes_outputs_or_files(grid):
    """The token was exported into sbatch's stored job environment, printed and passed in argv."""
    assert len(grid["ps"]) > 3
    no_secret_anywhere(grid["slurm"], grid["outputs"] + grid["ps"], [grid["res"]])
    assert any("HF_TOKEN_PATH=" in t for t in grid["slurm"].stored_job_files().values())


@pytest.mark.parametrize("given", ["token_file", "model_args"])
def test_token_by_file_or_model_args_never_reaches_the_job_record(slurm, tmp_path, given):
    """A token from $HF_HOME/token was read and exported into the job; token= was printed and stored."""
    e = env_for(slurm, tmp_path)
    args = grid_args(tmp_path / "res", "--sbatch-args", "--hold")
    if given == "token_file":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "token").write_text(OTHER_SECRET)
    else:
        args += ["--model-args", f"max_new_tokens=16,token={OTHER_SECRET}"]
    before = set(slurm.jobs())
    res = run_sh(e, *args)
    held = set(slurm.jobs()) - before
    held = {j for j in held if str(tmp_path) in _job_details(slurm, j)}       # this test's, not a neighbour's
    assert res.returncode == 0 and len(held) == 2, res.stderr
    try:
        no_secret_anywhere(slurm, [res.stdout, res.stderr], [tmp_path / "res"], OTHER_SECRET)
        envs = [t for p, t in slurm.stored_job_files().items() if p.endswith("environment") and str(tmp_path) in t]
        assert envs and all("HF_TOKEN_PATH=" in t for t in envs)
    finally:
        subprocess.run(["scancel", *held], env=slurm.env, capture_output=True)


def test_a_different_fingerprint_is_refused_naming_what_differs(grid):
    """A different few-shot count (or model, or model_args) silently reused the old results."""
    res = run_sh(grid["env"], *grid_args(grid["res"], "--num-fewshot", "1"))
    assert res.returncode == 3 and "num_fewshot:  -> 1" in res.stderr and "nothing was submitted" in res.stderr
    names = {job_name(str(grid["exp"] / c)) for c in ("k1", "k2_first")}
    assert not [n for n, s in grid["slurm"].jobs("fdl_").values() if s == "PENDING" and n in names]


def test_a_failing_force_run_keeps_the_old_result(grid, tmp_path):
    """--force deleted the good result before the new run had succeeded."""
    exp = grid["exp"]
    before = (exp / "k1" / "summary.json").read_bytes()
    res = run_sh(grid["env"], "--tasks", "synth_arith", "--config", "k1", "--limit", "2", "--force", "--local",
                 "--results", str(grid["res"]), "--experiment", "reuse_study_small_model", "--model",
                 "/nonexistent/typo")
    assert res.returncode == 1 and "failed" in res.stderr
    assert (exp / "k1" / "summary.json").read_bytes() == before


def test_collector_names_a_corrupt_summary_and_shows_every_configuration(grid, tmp_path):
    """One bad summary.json crashed the collector; stubs, failed and missing configurations had no row."""
    copy = tmp_path / "exp"
    shutil.copytree(grid["exp"].parent, copy / "reuse_study_small_model",
                    ignore=shutil.ignore_patterns(".*.lock"))
    cfg = copy / "reuse_study_small_model" / "synth_arith_limit_2"
    (cfg / "k2_first" / "summary.json").write_text('{"complete": true, "metrics": {')
    (cfg / "k3_last").mkdir()
    (cfg / "k3_last" / "summary.json").write_text('{"complete": true}')
    grid_file = copy / "reuse_study_small_model" / "grid.json"
    g = json.loads(grid_file.read_text())
    g["synth_arith_limit_2"]["k2_middle"] = "synth_arith_limit_2/k2_middle"
    grid_file.write_text(json.dumps(g))
    out = subprocess.run([sys.executable, "-m", "evalbridge.collect", str(copy)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "k2_first/summary.json: not valid JSON" in out.stderr and "Traceback" not in out.stderr
    assert "k3_last/summary.json: has no metrics" in out.stderr
    md = (copy / "results.md").read_text()
    for cfg_name, status in (("k1", "complete"), ("k2_first", "unreadable"), ("k3_last", "unreadable"),
                             ("k2_middle", "missing")):
        assert any(f"| {cfg_name} | {status} |" in line for line in md.splitlines()), (cfg_name, md)


def test_several_processes_under_srun_give_one_process_metrics(grid):
    """--gpus N asked for N GPUs but one process ran; the job now starts one process per Slurm task."""
    e = grid["env"]
    res = run_sh(e, "--tasks", "synth_arith", "--model", MODEL, "--limit", "2", "--batch-size", "8", "--results",
                 str(grid["res"]), "--config", "k1", "--experiment", "dp", "--ntasks", "2")
    assert res.returncode == 0, res.stderr
    slurm = grid["slurm"]
    name = job_name(str(grid["res"] / "dp" / "synth_arith_limit_2" / "k1"))
    ids = {j for j, (n, _) in slurm.jobs("fdl_k1_").items() if n == name}
    assert len(ids) == 1
    slurm.wait(lambda: done(slurm, ids), 300, "the two-process job to end")
    dp = json.loads((grid["res"] / "dp" / "synth_arith_limit_2" / "k1" / "summary.json").read_text())
    one = json.loads((grid["exp"] / "k1" / "summary.json").read_text())
    assert dp["world_size"] == 2 and one["world_size"] == 1
    assert dp["metrics"] == one["metrics"]


def test_profile_runs_under_sbatch(slurm, tmp_path):
    """profile.sh failed under sbatch (copied to the spool) unless FASTDLLM_SBATCH_DIR was exported."""
    e = env_for(slurm, tmp_path)
    out = tmp_path / "slurm.out"
    sub = subprocess.run(["sbatch", "--parsable", f"--output={out}", os.path.join(SBATCH, "profile.sh"),
                          "--dry-run", "--out", str(tmp_path / "p"), "--model", MODEL], env=e, capture_output=True,
                         text=True, timeout=60, cwd=str(tmp_path))
    assert sub.returncode == 0, sub.stderr
    jid = sub.stdout.strip()
    slurm.wait(lambda: done(slurm, {jid}), 120, "the profile job to end")
    assert slurm.jobs()[jid][1] == "COMPLETED", out.read_text()
    assert "-m evalbridge" in out.read_text()
