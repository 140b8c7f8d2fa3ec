"""The collector on hand-made summaries: each task's own request-type rate, and plot notes."""
import json

from evalbridge import collect
from evalbridge.plot import notes_for


def _throughput(rate, per_forward, skipped):
    return {"tokens_per_s_wall": rate, "tokens_per_s_device": None, "tokens_per_forward": per_forward,
            "skipped_layer_fraction": skipped}


def _summary(folder, **extra):
    folder.mkdir(parents=True)
    s = {"complete": True, "config_tag": folder.name, "model_args": {"reuse_k": 2, "device": "cpu"},
         "metrics": {"synth_arith": {"exact_match,strict-match": 0.5},
                     "synth_mc_letter": {"acc,none": 1.0, "acc_stderr,none": 0.0}},
         "throughput": {"generate_until": _throughput(39.2, 3.73, 0.2), "loglikelihood": _throughput(9.3, 2.0, 0.0)}}
    s.update(extra)
    (folder / "summary.json").write_text(json.dumps(s))


def test_each_task_row_has_its_own_request_types_rate(tmp_path):
    """A scoring task (synth_mc_letter) showed the generation rate (39.2 tokens/s, 3.73 tokens/forward) instead
    of its own loglikelihood figures (9.3, 2.00)."""
    _summary(tmp_path / "exp" / "mixed" / "k2_first")
    rows = {r["task"]: r for r in collect.collect(str(tmp_path))}
    assert rows["synth_mc_letter"]["request_type"] == "loglikelihood"
    assert rows["synth_mc_letter"]["tokens_per_s_wall"] == 9.3
    assert rows["synth_mc_letter"]["tokens_per_forward"] == 2.0
    assert rows["synth_arith"]["tokens_per_s_wall"] == 39.2
    assert rows["synth_arith"]["experiment"] == "exp"


def test_lm_evals_output_type_decides_the_request_type(tmp_path):
    """A metric name alone can mislead; the task's output_type in lm-eval's results beside the summary decides."""
    folder = tmp_path / "exp" / "t" / "k2_first"
    _summary(folder, metrics={"synth_mc_letter": {"exact_match,none": 1.0}})
    (folder / "lm_eval" / "m").mkdir(parents=True)
    (folder / "lm_eval" / "m" / "results_1.json").write_text(
        json.dumps({"configs": {"synth_mc_letter": {"output_type": "multiple_choice"}}}))
    (row,) = collect.collect(str(tmp_path))
    assert row["request_type"] == "loglikelihood" and row["tokens_per_s_wall"] == 9.3


def test_plot_notes_a_constant_accuracy_and_cpu_rates(tmp_path):
    pts = [{"value": 1.0, "device": "cpu"}, {"value": 1.0, "device": "cpu"}]
    notes = " ".join(notes_for(pts, [40.0, 41.0]))
    assert "every configuration scores 1" in notes and "CPU" in notes and "noise" in notes
    assert notes_for([{"value": 0.2, "device": "cuda:0"}, {"value": 0.6, "device": "cuda:0"}], [100.0, 300.0]) == []


def test_a_failed_configuration_shows_the_logs_last_error(tmp_path):
    folder = tmp_path / "exp" / "t_limit_2" / "k3_last"
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("[job] start\nTraceback (most recent call last):\n  x\n"
                                    "OSError: model folder /nonexistent/typo does not exist\n"
                                    "[job] evaluation failed (exit 1); the previous result, if any, is kept\n")
    (folder / "summary.json").write_text("[1, 2]")
    rows = collect.collect(str(tmp_path))
    assert [(r["config"], r["status"]) for r in rows] == [("k3_last", "unreadable")]
    assert "JSON list" in rows[0]["detail"] and "evaluation failed" in rows[0]["detail"]
