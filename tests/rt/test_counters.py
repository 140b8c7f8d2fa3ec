"""Every call returns counters, and they add up (docs/design.md, Counters)."""
import pytest
import torch

import fastdllm_rt
from fastdllm_rt import ReusePolicy
from tests.helpers.checkpoints import TINY_IDS


@pytest.fixture(scope="module")
def rt(tiny28):
    return fastdllm_rt.load(tiny28, **TINY_IDS)


def _r(n, seed):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check(stats, L=28):
    d = stats.to_dict()
    for key in ("forwards", "row_forwards", "tokens_forwarded", "layer_evaluations", "wall_time_s",
                "forward_time_s", "forward_timer", "device"):
        assert key in d
    le = d["layer_evaluations"]
    assert le["computed"] + le["skipped"] == L * stats.total_row_forwards
    assert sum(le["computed_per_layer"]) == le["computed"] and sum(le["skipped_per_layer"]) == le["skipped"]
    # forwards are timed with CUDA events on a GPU, with the host clock elsewhere
    assert stats.wall_time_s > 0 and stats.forward_time_s > 0
    assert stats.timer == ("cuda_events" if stats.device.startswith("cuda") else "host_clock")
    assert stats.model_calls <= stats.total_row_forwards


@pytest.mark.parametrize("policy", [None, ReusePolicy("first", k=2), ReusePolicy("last", k=3, mode="delta")])
def test_generation_counters_add_up(rt, policy):
    out = rt.generate([_r(5, 1), _r(40, 2), _r(70, 3)], max_new_tokens=50, reuse=policy)
    _check(out.stats)
    assert out.stats.tokens_generated == sum(len(t) for t in out.tokens)
    assert out.stats.requests == 3
    assert (out.stats.skipped_layer_evaluations > 0) == (policy is not None)
    assert out.stats.tokens_forwarded == sum(
        n * {"plain": 0, "prefill": 0, "commit": 32, "full_block": 32, "sub_block": 8}[k]
        for k, n in out.stats.row_forwards.items()) + out.stats.prefix_tokens_computed
    # the prompts' whole blocks (of the 40 and the 70) are prefilled, or served by the prefix cache when an
    # earlier case of this module computed them
    assert out.stats.prefix_tokens_computed + out.stats.prefix_tokens_served == 32 + 64


@pytest.mark.parametrize("scoring", ["trajectory", "first_token"])
def test_scoring_counters_add_up(rt, scoring):
    reqs = [(_r(30, 1), _r(12, 2)), (_r(30, 1), _r(3, 3)), (_r(66, 4), _r(40, 5))]
    policy = ReusePolicy("middle", k=2) if scoring == "trajectory" else None
    res = rt.score(reqs, scoring=scoring, reuse=policy)
    _check(res.stats)
    assert res.stats.requests == 3
    expected = sum(len(x) for _, x in reqs) if scoring == "trajectory" else 3
    assert res.stats.continuation_tokens_scored == expected


def test_a_mixed_step_is_one_packed_forward(rt):
    """Rows in different phases (commit, full-block, sub-block) share one model call."""
    out = rt.generate([_r(5, 1), _r(40, 2), _r(70, 3), _r(33, 4)], max_new_tokens=60)
    assert out.stats.model_calls < out.stats.total_row_forwards
    assert sum(out.stats.forwards.values()) > out.stats.model_calls
