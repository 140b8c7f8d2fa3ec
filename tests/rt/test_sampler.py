"""The sampler against an independent step-by-step implementation of the original algorithm
(tests/helpers/naive.py)."""
import pytest

import fastdllm_rt
from tests.helpers.checkpoints import TINY_IDS
from tests.helpers.forwards import as_original_counts, counting_forwards
from tests.helpers.naive import NaiveQwen, reference_generate


@pytest.fixture(scope="module")
def pair(tiny28):
    return fastdllm_rt.load(tiny28, **TINY_IDS), NaiveQwen(tiny28)


def budget(P, blocks):
    """Tokens produced by ``blocks`` whole blocks plus the last commit's next token."""
    return (P // 32 + blocks) * 32 + 1 - P


def prompt(P, seed):
    import torch
    return torch.randint(0, 500, (P,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("P", [5, 31, 32, 33, 70])
@pytest.mark.parametrize("use_block_cache", [False, True])
@pytest.mark.parametrize("threshold", [0.9, 1.0])
def test_greedy_batch1_equals_the_step_by_step_reference(pair, P, use_block_cache, threshold):
    rt, naive = pair
    p = prompt(P, P)
    ref_tokens, ref_counts = reference_generate(naive, p, 2, threshold, use_block_cache, mask=511, stop=510)
    out = rt.generate([p], max_new_tokens=budget(P, 2), threshold=threshold, use_block_cache=use_block_cache)
    assert out.tokens[0] == ref_tokens
    assert as_original_counts(out.stats) == ref_counts


def test_threshold_one_decodes_one_token_per_forward(pair):
    """With threshold 1 and no block cache, 32 denoising forwards per generated block + 1 commit."""
    rt, _ = pair
    p = prompt(40, 1)
    out = rt.generate([p], max_new_tokens=budget(40, 2), threshold=1.0, use_block_cache=False)
    masked = (32 - 40 % 32) + 31                           # block 1 from position 40, block 2 after its AR token
    if 510 not in out.tokens[0]:
        assert out.stats.forwards["full_block"] == masked
        assert out.stats.forwards["commit"] == 2 and out.stats.forwards["prefill"] == 1


@pytest.mark.parametrize("use_block_cache", [False, True])
def test_a_batch_equals_its_rows_run_alone(pair, use_block_cache):
    rt, _ = pair
    prompts = [prompt(n, 100 + n) for n in (40, 64, 70, 5, 32, 33)]
    together = rt.generate(prompts, max_new_tokens=70, use_block_cache=use_block_cache)
    for p, got in zip(prompts, together.tokens):
        alone = rt.generate([p], max_new_tokens=70, use_block_cache=use_block_cache)
        assert got == alone.tokens[0]


def test_batch_size_limit_streams_prompts_through_free_slots(pair):
    rt, _ = pair
    prompts = [prompt(n, n) for n in (9, 45, 12, 77, 33)]
    all_at_once = rt.generate(prompts, max_new_tokens=40)
    two_slots = rt.generate(prompts, max_new_tokens=40, batch_size=2)
    assert two_slots.tokens == all_at_once.tokens


def test_early_exit_returns_the_same_tokens_with_no_more_forwards(pair):
    rt, _ = pair
    prompts = [prompt(n, 7 * n) for n in (5, 40, 70)]
    base = rt.generate(prompts, max_new_tokens=50)
    fast = rt.generate(prompts, max_new_tokens=50, early_exit=True)
    assert fast.tokens == base.tokens
    assert fast.stats.total_row_forwards <= base.stats.total_row_forwards


def test_max_new_tokens_is_a_per_row_budget(pair):
    rt, _ = pair
    out = rt.generate([prompt(5, 1), prompt(90, 2)], max_new_tokens=17)
    for toks, reason in zip(out.tokens, out.finish_reasons):
        assert len(toks) <= 17
        assert reason in ("length", "stop_token")
        assert (reason == "length") == (len(toks) == 17 and toks[-1] != 510)


@pytest.mark.parametrize("bad, words", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=8, threshold=1.5), "threshold"),
    (dict(max_new_tokens=8, block_size=16), "bd_size"),
    (dict(max_new_tokens=8, small_block_size=5), "small_block_size"),
    (dict(max_new_tokens=5000), "positions"),
])
def test_bad_generation_arguments_fail_before_model_work(pair, bad, words):
    rt, _ = pair
    with counting_forwards(rt.model) as forwards, pytest.raises(ValueError, match=words):
        rt.generate([prompt(10, 0)], **bad)
    assert not forwards


def test_empty_and_out_of_vocabulary_prompts_are_rejected(pair):
    rt, _ = pair
    with pytest.raises(fastdllm_rt.InputError, match="prompt 1 is empty"):
        rt.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(fastdllm_rt.InputError, match="outside the vocabulary"):
        rt.generate([[1, 600]], max_new_tokens=4)


def test_non_finite_logits_stop_generation_and_scoring_with_the_cause(tiny28):
    """A checkpoint holding NaN gives non-finite logits: generate and score raise NumericsError naming the
    cause (not tokens chosen from NaN probabilities)."""
    import torch

    from fastdllm_rt.errors import NumericsError

    rt = fastdllm_rt.load(tiny28, **TINY_IDS)
    with torch.no_grad():
        rt.model.norm.weight[3] = float("nan")
    with pytest.raises(NumericsError, match="non-finite logits during sampling.*dtype='fp32'"):
        rt.generate([prompt(40, 2)], max_new_tokens=8)
    with pytest.raises(NumericsError, match="non-finite logits during scoring"):
        rt.score([(prompt(40, 2), [1, 2, 3])])
