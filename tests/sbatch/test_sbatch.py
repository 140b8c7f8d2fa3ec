"""sbatch/: the grid runner with a fake `sbatch`, token resolution, resume after a killed job, the local grid
end to end with the collector, and the profiling job."""
import json
import os
import stat
import subprocess
import sys

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
    log = tmp_path / "sbatch.log"
    bin_dir = _fake(tmp_path, "sbatch", f'echo "ARGS $* MODEL_ARGS=$MODEL_ARGS" >> {log}\necho "Submitted batch job 42"\n')
    e = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    e.update(PATH=f"{bin_dir}:{e['PATH']}", PYTHON=sys.executable, HOME=str(tmp_path / "home"),
             HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return e, log


def run_sh(env, *args, cwd=None):
    return subprocess.run(["bash", os.path.join(SBATCH, "run.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def submitted(log):
    return log.read_text().splitlines() if log.exists() else []


def test_grid_submits_nine_jobs_with_their_configurations(env, tmp_path):
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith", "--results", str(tmp_path / "res"), "--partition", "gpu",
                 "--gpus", "1", "--time", "01:00:00")
    assert res.returncode == 0, res.stderr
    lines = submitted(log)
    assert len(lines) == 9
    for k in (1, 2, 3):
        for s in ("first", "middle", "last"):
            line = next(x for x in lines if f"CONFIG=k{k}_{s}," in x)
            assert f"reuse_k={k},layer_subset={s},reuse_mode=output" in line
            assert "--partition=gpu" in line and "--gres=gpu:1" in line and "--time=01:00:00" in line
            assert "use_block_cache=True" in line


def test_one_config_limit_and_delta_mode(env, tmp_path):
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith,synth_mc_letter", "--config", "k2_middle_delta", "--limit", "5",
                 "--results", str(tmp_path / "res"))
    assert res.returncode == 0, res.stderr
    lines = submitted(log)
    assert len(lines) == 2
    assert all("reuse_mode=delta" in x and "LIMIT=5" in x for x in lines)
    assert any("/synth_arith_limit_5/k2_middle_delta/" in x for x in lines)
    both = run_sh(e, "--tasks", "synth_arith", "--modes", "output,delta", "--results", str(tmp_path / "r2"))
    assert "15 job(s)" in both.stdout


def test_dry_run_submits_nothing_and_prints_the_commands(env, tmp_path):
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith", "--dry-run", "--results", str(tmp_path / "res"))
    assert res.returncode == 0 and submitted(log) == []
    assert sum(line.startswith("sbatch ") for line in res.stdout.splitlines()) == 9
    assert "would be submitted" in res.stdout


def _complete(path, complete=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps({"complete": complete}))


def test_completed_configurations_are_skipped_unless_forced(env, tmp_path):
    e, log = env
    res_dir = tmp_path / "res"
    _complete(res_dir / "reuse_study" / "synth_arith" / "k2_first")
    _complete(res_dir / "reuse_study" / "synth_arith" / "k3_last")
    res = run_sh(e, "--tasks", "synth_arith", "--results", str(res_dir))
    assert len(submitted(log)) == 7 and "skip synth_arith k2_first" in res.stdout
    log.unlink()
    run_sh(e, "--tasks", "synth_arith", "--results", str(res_dir), "--force")
    assert len(submitted(log)) == 9


def test_rerun_after_a_killed_job_redoes_only_the_unfinished_configuration(env, tmp_path):
    e, log = env
    root = tmp_path / "res" / "reuse_study" / "synth_arith"
    _complete(root / "k1_first")
    half = root / "k2_first"
    half.mkdir(parents=True)
    (half / "log.txt").write_text("killed here\n")             # killed before summary.json was written
    broken = root / "k3_first"
    broken.mkdir(parents=True)
    (broken / "summary.json").write_text('{"complete": tr')    # a torn file (not ours: ours are atomic)
    run_sh(e, "--tasks", "synth_arith", "--config", "k1_first", "--config", "k2_first", "--config", "k3_first",
           "--results", str(tmp_path / "res"))
    lines = submitted(log)
    assert len(lines) == 2 and not any("CONFIG=k1_first," in x for x in lines)
    assert json.loads((root / "k1_first" / "summary.json").read_text()) == {"complete": True}


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


TOKEN_PROBE = f'source "{SBATCH}/_token.sh"; resolve_hf_token; printf "%s|%s" "${{HF_TOKEN:-}}" "$HF_TOKEN_SOURCE"'


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
    token, where = out.split("|")
    assert where == expected_source
    assert token == ("" if source == "none" else SECRET)


def test_gated_task_without_a_token_stops_the_grid_before_any_submission(env, tmp_path):
    e, log = env
    res = run_sh(e, "--tasks", "synth_arith,gpqa_main_n_shot", "--results", str(tmp_path / "res"))
    assert res.returncode == 2 and submitted(log) == []
    assert "gated dataset Idavidrein/gpqa" in res.stderr and "export HF_TOKEN" in res.stderr
    assert "nothing was submitted" in res.stderr


def test_the_token_never_appears_in_commands_or_files(env, tmp_path):
    e, log = env
    e = dict(e, HF_TOKEN=SECRET)
    res = run_sh(e, "--tasks", "gpqa_main_n_shot", "--results", str(tmp_path / "res"))
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr and SECRET not in log.read_text()
    for root, _, files in os.walk(tmp_path / "res"):
        for f in files:
            assert SECRET not in open(os.path.join(root, f)).read()


def test_local_three_configuration_grid_and_the_collector(env, tmp_path):
    e, _ = env
    res_dir = tmp_path / "res"
    args = ["--tasks", "synth_mc_text", "--local", "--limit", "6", "--model",
            os.path.join(REPO, "fastdllm_rt", "small_model"), "--results", str(res_dir), "--config", "k1_first",
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
    assert md.count("synth_mc_text") == 3 and "k2_first" in md
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
