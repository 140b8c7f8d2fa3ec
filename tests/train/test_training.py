"""The small-model trainer: synthetic tasks, the Fast-dLLM v2 objective, and a few real CPU steps."""
import json
import os

import pytest
import torch

from fastdllm_rt.train import synthetic
from fastdllm_rt.train.objective import IGNORE, complementary_noise, training_mask
from fastdllm_rt.train.trainer import TrainConfig, train


def test_splits_are_deterministic_and_disjoint():
    held = synthetic.split("arith", 0, 50, held_out=True)
    assert held == synthetic.split("arith", 0, 50, held_out=True)
    train_prompts = {e["prompt"] for e in synthetic.split("arith", 0, 2000, held_out=False)}
    assert not train_prompts & {e["prompt"] for e in held}
    stream = synthetic.training_stream(0)
    for _ in range(500):
        ex = next(stream)
        assert not synthetic.is_held_out(ex["prompt"] or ex["response"])


def test_answers_check():
    for ex in synthetic.split("arith", 0, 100, held_out=True):
        lhs = ex["answer"].split(" = ")[0].split()[-3:]
        a, op, b = int(lhs[0]), lhs[1], int(lhs[2])
        assert str(a + b if op == "+" else a - b) == ex["target"] == ex["answer"].split("#### ")[-1]
    for ex in synthetic.split("mc_letter", 0, 100, held_out=True):
        assert ex["response"] == " " + "ABCD"[ex["gold"]] and len(set(ex["choices"])) == 4
        q = ex["question"]
        if "largest" in q or "smallest" in q:
            nums = [int(c) for c in ex["choices"]]
            assert nums[ex["gold"]] == (max(nums) if "largest" in q else min(nums))
        else:
            cat = q.rstrip("?").split()[-1]
            assert [c in synthetic.CATEGORIES[cat] for c in ex["choices"]].count(True) == 1
            assert ex["choices"][ex["gold"]] in synthetic.CATEGORIES[cat]
    with pytest.raises(ValueError, match="unknown task"):
        synthetic.make_example("nope", 0, 0)


def test_training_mask_matches_spec():
    L, bs = 8, 4
    m = training_mask(L, bs)
    for i in range(2 * L):
        for j in range(2 * L):
            qn, kn, qb, kb = i < L, j < L, (i % L) // bs, (j % L) // bs
            expect = (qb == kb and qn == kn) or (qn and not kn and kb < qb) or (not qn and not kn and kb <= qb)
            assert bool(m[i, j]) == expect, (i, j)


def test_complementary_copies_mask_every_response_token_once():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(5, 50, (6, 64), generator=g)
    resp = torch.arange(64)[None] >= torch.tensor([3, 10, 20, 33, 40, 63])[:, None]
    xt, labels = complementary_noise(x0, resp, mask_id=1, block_size=32, generator=g)
    masked = xt == 1
    assert torch.equal(masked[:6] ^ masked[6:], resp) and not (masked[:6] & masked[6:]).any()
    assert torch.equal(labels != IGNORE, masked)
    assert torch.equal(labels[masked], torch.cat([x0, x0])[masked])


def _cfg(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), device="cpu", layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64,
                steps=60, batch_size=16, pool=3000, eval_examples=0, log_every=5, lr=3e-3, warmup=5, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_checkpoint_loads(tmp_path):
    from fastdllm_rt import load

    report = train(_cfg(tmp_path, "run"))
    losses = [v for _, v in report["loss_curve"]]
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    rt = load(str(tmp_path / "run"), device="cpu")
    assert rt.model.config.num_hidden_layers == 2
    saved = json.loads((tmp_path / "run" / "training.json").read_text())
    assert saved["steps_done"] == 60 and not os.path.exists(tmp_path / "run" / "train_state.pt")


def test_pause_and_resume_equal_an_uninterrupted_run(tmp_path):
    whole = train(_cfg(tmp_path, "whole", steps=12))
    paused = train(_cfg(tmp_path, "split", steps=12, pause_at_step=5))
    assert paused == {"paused_at": 5, "total": 12}
    assert os.path.exists(tmp_path / "split" / "train_state.pt")
    resumed = train(_cfg(tmp_path, "split", steps=12, resume=True))
    assert resumed["loss_curve"] == whole["loss_curve"]
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "split" / "model.safetensors").read_bytes()


def test_resume_without_a_paused_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no paused run"):
        train(_cfg(tmp_path, "fresh", resume=True))


def test_cli_flags_parse_booleans(monkeypatch):
    from fastdllm_rt.train import trainer

    monkeypatch.setattr(trainer, "train", lambda cfg, argv: cfg)
    cfg = trainer.main(["--out", "x", "--resume", "--no-cuda-graph", "--minutes", "3", "--mix", "arith=1"])
    assert (cfg.resume, cfg.cuda_graph, cfg.minutes, cfg.mix) == (True, False, 3.0, "arith=1")
    assert trainer.main(["--out", "x"]).resume is False
