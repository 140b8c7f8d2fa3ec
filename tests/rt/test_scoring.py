"""Trajectory scoring and first_token scoring (docs/design.md, Trajectory scoring)."""
import itertools

import pytest
import torch

import fastdllm_rt
from fastdllm_rt import ReusePolicy
from fastdllm_rt.scorer import Scorer, rolling_windows
from tests.helpers.checkpoints import TINY_IDS
from tests.helpers.forwards import counting_forwards
from tests.helpers.naive import NaiveQwen, brute_force_chain_rule, original_first_token


@pytest.fixture(scope="module")
def pair(tiny28):
    return fastdllm_rt.load(tiny28, **TINY_IDS), NaiveQwen(tiny28)


def _r(n, seed):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# contexts ending mid-block and on a boundary; continuations inside one block and across blocks
REQUESTS = [(_r(c, c), _r(x, 100 + c + x)) for c, x in [(5, 1), (20, 3), (31, 4), (32, 1), (32, 5), (40, 30),
                                                       (64, 2), (9, 60), (70, 9)]]


def test_trajectory_with_k1_and_no_block_cache_is_the_chain_rule(pair):
    rt, naive = pair
    res = rt.score(REQUESTS, use_block_cache=False)
    for (ctx, cont), got, greedy in zip(REQUESTS, res.loglikelihoods, res.is_greedy):
        ref, ref_greedy = brute_force_chain_rule(naive, ctx, cont, mask=511)
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
        assert greedy == ref_greedy
    assert res.stats.continuation_tokens_scored == sum(len(x) for _, x in REQUESTS)


def test_first_token_equals_the_original_evaluation(pair):
    rt, naive = pair
    res = rt.score(REQUESTS, scoring="first_token")
    for (ctx, cont), got in zip(REQUESTS, res.loglikelihoods):
        assert got == pytest.approx(original_first_token(naive, ctx, cont, mask=511, eos=510), rel=1e-5, abs=1e-5)


def test_first_token_leaks_the_continuation_tail_as_the_original_does(pair):
    """The original evaluation's weakness, reproduced on purpose: with the prefix at length 20 the tail is visible."""
    rt, _ = pair
    ctx = _r(20, 1)
    a, b = rt.score([(ctx, [5, 6, 7]), (ctx, [5, 9, 9])], scoring="first_token").loglikelihoods
    assert a != b


def test_scores_are_in_request_order_and_independent_of_batching(pair):
    rt, _ = pair
    whole = rt.score(REQUESTS, use_block_cache=True)
    small = rt.score(REQUESTS, use_block_cache=True, batch_size=2)
    rev = rt.score(REQUESTS[::-1], use_block_cache=True)
    assert small.loglikelihoods == pytest.approx(whole.loglikelihoods, rel=1e-5)
    assert rev.loglikelihoods[::-1] == pytest.approx(whole.loglikelihoods, rel=1e-5)


def test_one_token_continuations_ignore_every_reuse_policy(pair):
    rt, _ = pair
    ctx = _r(45, 3)
    reqs = [(ctx, [t]) for t in (11, 22, 33, 44)]
    base = rt.score(reqs, use_block_cache=True)
    for k, subset in itertools.product((1, 2, 3), ("first", "middle", "last")):
        res = rt.score(reqs, use_block_cache=True, reuse=ReusePolicy(subset, k=k))
        assert res.loglikelihoods == base.loglikelihoods
        assert res.stats.skipped_layer_evaluations == 0
        if k > 1:
            assert any("no layer evaluation was skipped" in n for n in res.stats.notes)


def test_multi_token_continuations_move_with_k_and_report_skips(pair):
    rt, _ = pair
    reqs = [(_r(37, 1), _r(20, 2)), (_r(10, 3), _r(25, 4))]
    base = rt.score(reqs, use_block_cache=True).loglikelihoods
    for k in (2, 3):
        res = rt.score(reqs, use_block_cache=True, reuse=ReusePolicy("middle", k=k))
        assert res.loglikelihoods != base
        assert res.stats.skipped_layer_evaluations > 0


def test_four_one_token_choices_cost_one_scoring_forward(pair):
    rt, _ = pair
    ctx = _r(150, 7)                                     # a five-shot-like context, mid-block end
    res = rt.score([(ctx, [c]) for c in (1, 2, 3, 4)])
    rf = res.stats.row_forwards
    assert rf["prefill"] == 1 and rf["full_block"] == 1 and rf["sub_block"] == 0 and rf["commit"] == 0
    assert res.stats.prefix_tokens_computed == 128          # the context's four whole blocks
    ft = rt.score([(ctx, [c]) for c in (1, 2, 3, 4)], scoring="first_token")
    # the whole blocks come from the prefix cache the first call filled: no prefill forward, one plain
    assert ft.stats.prefix_tokens_served == 128 and ft.stats.prefix_tokens_computed == 0
    assert ft.stats.row_forwards["prefill"] == 0 and ft.stats.row_forwards["plain"] == 1
    on_boundary = rt.score([(_r(64, 8), [c]) for c in (1, 2, 3, 4)])
    assert on_boundary.stats.total_row_forwards == 1       # the prefill's last logit predicts them all


def test_choices_sharing_a_prefix_share_steps_until_they_differ(pair):
    rt, _ = pair
    ctx = _r(33, 9)
    shared = [(ctx, [7, 8, 9, t]) for t in (1, 2, 3)]
    res = rt.score(shared, use_block_cache=False)
    # 3 shared steps + 1 step for the three-way split = 4 FULL row-forwards, not 12
    assert res.stats.row_forwards["full_block"] == 4
    alone = [rt.score([r], use_block_cache=False).loglikelihoods[0] for r in shared]
    assert res.loglikelihoods == pytest.approx(alone, rel=1e-6)


def test_threshold_reveal_scores_parallel_unmasking_and_one_reveal_is_the_default(pair):
    rt, _ = pair
    reqs = REQUESTS[:5]
    one = rt.score(reqs, use_block_cache=False)
    thr = rt.score(reqs, use_block_cache=False, reveal="threshold", threshold=0.5)
    strict = rt.score(reqs, use_block_cache=False, reveal="threshold", threshold=1.0)
    assert strict.loglikelihoods == pytest.approx(one.loglikelihoods, rel=1e-6)
    assert thr.stats.total_row_forwards <= one.stats.total_row_forwards


def test_rolling_windows_predict_every_token_once():
    toks = list(range(10))
    wins = rolling_windows(toks, prefix_token=99, max_len=4)
    assert wins[0] == ([99], [0, 1, 2, 3])
    assert [t for _, c in wins for t in c] == toks
    assert all(len(c) + len(x) <= 5 for c, x in wins)


def test_score_rolling_sums_its_windows(pair):
    rt, _ = pair
    doc = _r(70, 4)
    total, stats = rt.score_rolling([doc], max_length=40, use_block_cache=False)
    parts = rt.score(rolling_windows(doc, 510, 40), use_block_cache=False).loglikelihoods
    assert total[0] == pytest.approx(sum(parts), rel=1e-6)
    assert stats.requests == 1


@pytest.mark.parametrize("req, words", [
    (([], [1]), "context 0 is empty"),
    (([1], []), "continuation 0 is empty"),
    (([1, 2], [700]), "outside the vocabulary"),
    ((list(range(100)) * 41, [1]), "positions"),
])
def test_bad_scoring_requests_are_rejected_before_model_work(pair, req, words):
    rt, _ = pair
    with counting_forwards(rt.model) as forwards, pytest.raises(fastdllm_rt.InputError, match=words):
        rt.score([req])
    assert not forwards


def test_first_token_refuses_a_reuse_policy(pair):
    rt, _ = pair
    with pytest.raises(fastdllm_rt.PolicyError, match="first_token"):
        rt.score(REQUESTS[:1], scoring="first_token", reuse=ReusePolicy("first", k=2))


@pytest.mark.parametrize("scoring", ["trajectory", "first_token"])
def test_a_chunk_that_runs_out_of_memory_is_retried_smaller_and_logged_once(pair, scoring, monkeypatch, caplog):
    """The OOM is simulated (CPU has none): any chunk of more than 4 requests fails."""
    rt, _ = pair
    want = rt.score(REQUESTS, scoring=scoring, batch_size=64)
    real, sizes, released = Scorer._score_chunk, [], []

    def flaky(self, requests, ids, *a, **kw):
        sizes.append(len(ids))
        if len(ids) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, requests, ids, *a, **kw)

    monkeypatch.setattr(Scorer, "_score_chunk", flaky)
    monkeypatch.setattr(rt, "release_caches", lambda: released.append(True))
    with caplog.at_level("WARNING", logger="fastdllm_rt"):
        got = rt.score(REQUESTS, scoring=scoring, batch_size=64)
    assert got.loglikelihoods == pytest.approx(want.loglikelihoods, rel=1e-6, abs=1e-6)
    assert got.is_greedy == want.is_greedy
    assert sizes[0] == len(REQUESTS) and max(s for s in sizes if s <= 4) <= 4 and released
    assert len([r for r in caplog.records if "did not fit in GPU memory" in r.getMessage()]) == 1
    assert any("backed off" in n for n in got.stats.notes)
