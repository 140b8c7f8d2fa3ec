"""sbatch/: the grid runner with a fake `sbatch`, token resolution, resume after a killed job, the local grid
end to end with the collector, and the profiling job."""
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

SBATCH = os.path.join(REPO, "sbatch")
SECRET = "hf_GridSecretToken0987654321"


def _fake(tmp_path, name, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.fixture
def env(tmp_path):
    """A fake `sbatch` that records its arguments and its whole environment, and an empty fake `squeue`."""
    log = tmp_path / "sbatch.log"
    bin_dir = _fake(tmp_path, "sbatch", f'{{ echo "ARGS $* MODEL_ARGS=$MODEL_ARGS"; env | sed "s/^/ENV /"; }} >> {log}\n'
                                        'echo 42\n')
    _fake(tmp_path, "squeue", "exit 0\n")
    e = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    e.update(PATH=f"{bin_dir}:{e['PATH']}", PYTHON=sys.executable, HOME=str(tmp_path / "home"),
             HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return e, log


def run_sh(env, *args, cwd=None):
    return subprocess.run(["bash", os.path.join(SBATCH, "run.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def submitted(log):
    return [x for x in log.read_text().splitlines() if x.startswith("ARGS ")] if log.exists() else []


def test_default_grid_runs_k1_once_and_six_reuse_configurations(env, tmp_path):
    """The default grid ran three identical no-reuse jobs (k1_first, k1_middle, k1_last) per task."""
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith", "--results", str(tmp_path / "res"), "--partition", "gpu",
                 "--gpus", "2", "--time", "01:00:00")
    assert res.returncode == 0, res.stderr
    lines = submitted(log)
    assert len(lines) == 7 and sum("MODEL_ARGS=" in x and "reuse_k=1" in x for x in lines) == 1
    for k in (2, 3):
        for s in ("first", "middle", "last"):
            line = next(x for x in lines if f"reuse_k={k},layer_subset={s}," in x)
            assert "reuse_mode=output" in line and "use_block_cache=True" in line
            assert "--partition=gpu" in line and "--gres=gpu:2" in line and "--ntasks-per-node=2" in line
    assert "/reuse_study_Fast_dLLM_v2_7B/" in lines[0]               # the folder is derived from the model


def test_one_config_limit_and_delta_mode(env, tmp_path):
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith,synth_mc_letter", "--config", "k2_middle_delta", "--limit", "5",
                 "--results", str(tmp_path / "res"))
    assert res.returncode == 0, res.stderr
    lines = submitted(log)
    assert len(lines) == 2 and all("reuse_mode=delta" in x for x in lines)
    assert any("/synth_arith_limit_5/k2_middle_delta/" in x for x in lines)
    both = run_sh(e, "--tasks", "synth_arith", "--modes", "output,delta", "--results", str(tmp_path / "r2"))
    assert "13 job(s)" in both.stdout


def test_dry_run_writes_nothing_and_its_commands_run_as_printed(env, tmp_path):
    """--dry-run created the result folders, and its lines failed when replayed (MODEL_ARGS was a comment)."""
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith", "--dry-run", "--results", str(tmp_path / "res"))
    assert res.returncode == 0 and submitted(log) == [] and not (tmp_path / "res").exists()
    lines = [x for x in res.stdout.splitlines() if x.startswith("env ")]
    assert len(lines) == 7 and "would be submitted" in res.stdout
    replay = subprocess.run(["bash", "-c", lines[0]], env=e, capture_output=True, text=True)
    assert replay.returncode == 0, replay.stderr
    assert "MODEL_ARGS=model=Efficient-Large-Model/Fast_dLLM_v2_7B,use_block_cache=True" in log.read_text()


@pytest.mark.parametrize("args, message", [
    (["--tasks", "synth_arith", "--bogus"], "unknown option --bogus"),
    (["--tasks", "synth_arith", "--config", "k2_sideways"], "configuration 'k2_sideways' is not"),
    (["--limit", "3"], "--tasks is required"),
    (["--tasks", "synth_arith", "--limit"], "--limit needs a value"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(env, tmp_path, args, message):
    e, log = env
    res = run_sh(e, *args, "--results", str(tmp_path / "res")) if "--limit" != args[-1] else run_sh(e, *args)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert submitted(log) == []


def test_help_is_a_usage_text():
    """--help printed the script's first lines (shebang and code) instead of a usage text."""
    res = subprocess.run(["bash", os.path.join(SBATCH, "run.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("Usage: sbatch/run.sh --tasks")
    assert "set -euo" not in res.stdout and "--force" in res.stdout and "--new-folder" in res.stdout


def test_summary_is_only_ever_written_complete(tmp_path, monkeypatch):
    from evalbridge.summary import write_atomic

    path = tmp_path / "summary.json"
    write_atomic(str(path), {"complete": True, "v": 1})

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom()

    monkeypatch.setattr(json, "dump", explode)
    with pytest.raises(Boom):
        write_atomic(str(path), {"complete": True, "v": 2})
    assert json.loads(path.read_text()) == {"complete": True, "v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


TOKEN_PROBE = f'source "{SBATCH}/_token.sh"; resolve_hf_token; printf "%s|%s" "$HF_TOKEN_FILE" "$HF_TOKEN_SOURCE"'


@pytest.mark.parametrize("source", ["none", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HOME",
                                    "cache", "legacy"])
def test_token_resolution_for_each_source(tmp_path, source):
    home, hf_home = tmp_path / "home", tmp_path / "hf"
    e = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    e.update(HOME=str(home), HF_HOME=str(hf_home))
    expected_source = ""
    if source in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        e[source] = SECRET
        expected_source = "$" + source
    elif source != "none":
        path = {"HF_TOKEN_PATH": tmp_path / "tok.txt", "HF_HOME": hf_home / "token",
                "cache": home / ".cache" / "huggingface" / "token", "legacy": home / ".huggingface" / "token"}[source]
        if source == "cache":
            e.pop("HF_HOME")
        if source == "HF_TOKEN_PATH":
            e["HF_TOKEN_PATH"] = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SECRET + "\n")
        expected_source = str(path)
    out = subprocess.run(["bash", "-c", TOKEN_PROBE], env=e, capture_output=True, text=True).stdout
    token_file, where = out.split("|")
    assert where == expected_source
    assert token_file == ("" if source in ("none", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") else expected_source)


def test_gated_task_without_a_token_stops_the_grid_before_any_submission(env, tmp_path):
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith,gpqa_main_n_shot", "--results", str(tmp_path / "res"))
    assert res.returncode == 2 and submitted(log) == []
    assert "gated dataset Idavidrein/gpqa" in res.stderr and "export HF_TOKEN" in res.stderr
    assert "nothing was submitted" in res.stderr


@pytest.mark.parametrize("given", ["HF_TOKEN", "model_args"])
def test_the_token_reaches_the_job_as_a_0600_file_never_as_a_value(env, tmp_path, given):
    """HF_TOKEN was exported into the job's environment and token= was printed and passed on."""
    e, log = env
    args = ["--tasks", "gpqa_main_n_shot", "--results", str(tmp_path / "res")]
    if given == "HF_TOKEN":
        e = dict(e, HF_TOKEN=SECRET)
    else:
        args += ["--model-args", f"max_new_tokens=8,token={SECRET}"]
    res = run_sh(e, *args)
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr and SECRET not in log.read_text()
    assert "ENV HF_TOKEN=" not in log.read_text()
    assert given != "model_args" or "max_new_tokens=8" in log.read_text()      # the other model_args stay
    stored = tmp_path / "home" / ".cache" / "fastdllm" / "hf_token"
    assert f"ENV HF_TOKEN_PATH={stored}" in log.read_text()
    assert stored.read_text() == SECRET and stat.S_IMODE(stored.stat().st_mode) == 0o600
    for root, _, files in os.walk(tmp_path / "res"):
        for f in files:
            assert SECRET not in open(os.path.join(root, f)).read()


def test_summary_is_group_readable(tmp_path):
    """summary.json was written 0600 (mkstemp's mode) while every other result file was 0644."""
    from evalbridge.summary import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(str(tmp_path / "summary.json"), {"complete": True})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644


def test_a_killed_local_run_leaves_no_process_behind(env, tmp_path):
    """kill -9 of a --local run.sh left _job.sh and python running."""
    e, _ = env
    res_dir = tmp_path / "res"
    p = subprocess.Popen(["bash", os.path.join(SBATCH, "run.sh"), "--tasks", "synth_arith", "--local", "--limit",
                          "50", "--config", "k1", "--model", os.path.join(REPO, "fastdllm_rt", "small_model"),
                          "--results", str(res_dir)], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ours():
        out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
        return [ln for ln in out.splitlines() if str(res_dir) in ln and "ps -eo" not in ln]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any("-m evalbridge " in ln for ln in ours()):
        time.sleep(0.2)
    assert any("-m evalbridge " in ln for ln in ours()), "the evaluation never started"
    p.kill()
    p.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ours():
        time.sleep(0.2)
    assert ours() == []


def test_local_three_configuration_grid_and_the_collector(env, tmp_path):
    e, _ = env
    res_dir = tmp_path / "res"
    args = ["--tasks", "synth_mc_text", "--local", "--limit", "6", "--model",
            os.path.join(REPO, "fastdllm_rt", "small_model"), "--results", str(res_dir), "--config", "k1",
            "--config", "k2_first", "--config", "k3_middle", "--batch-size", "16"]
    res = run_sh(e, *args, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summaries = list(res_dir.rglob("summary.json"))
    assert len(summaries) == 3 and all(json.load(open(s))["complete"] for s in summaries)
    again = run_sh(e, *args, cwd=str(tmp_path))
    assert again.stdout.count("skip ") == 3
    out = subprocess.run([sys.executable, "-m", "evalbridge.collect", str(res_dir), "--out", str(tmp_path / "table")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "table" / "results.md").read_text()
    assert md.count("| complete |") == 3 and "k2_first" in md
    assert "| reuse_study_small_model | synth_mc_text |" in md                   # the experiment column is filled
    csv_text = (tmp_path / "table" / "results.csv").read_text()
    assert "skipped_layer_fraction" in csv_text.splitlines()[0]
    import matplotlib.image as mpimg
    img = mpimg.imread(str(tmp_path / "table" / "synth_mc_text.png"))
    assert img.shape[0] >= 300 and img.shape[1] >= 400
    assert img[..., :3].std() > 0.01                               # not blank


def test_profile_dry_run_prints_the_nsys_command(env, tmp_path):
    e, _ = env
    e = dict(e, PATH=f"{_fake(tmp_path, 'nsys', 'exit 0')}:{e['PATH']}")
    res = subprocess.run(["bash", os.path.join(SBATCH, "profile.sh"), "--dry-run", "--out", str(tmp_path / "p")],
                         env=e, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi" in res.stdout
    assert "FASTDLLM_PROFILE=1" in res.stdout


def test_profile_without_nsys_falls_back_to_the_torch_profiler(env, tmp_path):
    e, _ = env
    e = dict(e, PATH=":".join(p for p in e["PATH"].split(":") if not os.path.exists(os.path.join(p, "nsys"))))
    res = subprocess.run(["bash", os.path.join(SBATCH, "profile.sh"), "--dry-run", "--out", str(tmp_path / "p")],
                         env=e, capture_output=True, text=True)
    assert res.returncode == 0 and "FASTDLLM_TORCH_PROFILE=" in res.stdout and "torch-profiler" in res.stderr


def test_torch_profiler_trace_names_the_forward_kinds(tmp_path):
    """The fallback's trace, on whatever device this runs (CPU here; the GPU run is in bench/gpu_session.sh)."""
    trace = tmp_path / "trace.json"
    e = dict(os.environ, FASTDLLM_TORCH_PROFILE=str(trace), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "evalbridge", "--model_args",
                          # a threshold no token reaches: several steps per sub-block, so sub-block forwards occur
                          f"model={os.path.join(REPO, 'fastdllm_rt', 'small_model')},use_block_cache=True,"
                          "threshold=1.0",
                          "--tasks", "synth_arith", "--limit", "2", "--output_dir", str(tmp_path / "o")],
                         env=e, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    text = trace.read_text()
    assert "fastdllm:full_block" in text and "fastdllm:commit" in text and "fastdllm:sub_block" in text
