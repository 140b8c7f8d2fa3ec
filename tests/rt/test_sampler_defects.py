"""One regression test per defect of the original sampler that we fix (docs/design.md, Sampling)."""
import pytest
import torch

import fastdllm_rt
from tests.helpers.checkpoints import TINY_IDS, make_checkpoint
from tests.helpers.naive import NaiveQwen, reference_generate
from tests.helpers.tokenizers import write_word_tokenizer


@pytest.fixture(scope="module")
def rt(tiny28):
    return fastdllm_rt.load(tiny28, **TINY_IDS)


def _p(n, seed):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_prompt_of_exactly_32_tokens_is_used(rt, tiny28):
    """Original defect: prefill ran only for prompts longer than 32, so a 32-token prompt was
    ignored and two different 32-token prompts gave identical continuations."""
    a, b = _p(32, 1), _p(32, 2)
    out = rt.generate([a, b], max_new_tokens=33, threshold=1.0, use_block_cache=False)
    assert out.tokens[0] != out.tokens[1]
    ref, _ = reference_generate(NaiveQwen(tiny28), a, 1, 1.0, False, mask=511, stop=510)
    assert out.tokens[0] == ref
    assert out.stats.forwards["prefill"] == 1


@pytest.mark.parametrize("use_block_cache", [False, True])
def test_every_row_predicts_its_first_token_from_its_own_prompt(rt, use_block_cache):
    """Original defect: a row whose length is a multiple of 32, not the minimum and shorter
    than another row (lengths 40, 64, 70) never got its AR next token and diverged from its solo run."""
    prompts = [_p(40, 3), _p(64, 4), _p(70, 5)]
    batch = rt.generate(prompts, max_new_tokens=40, use_block_cache=use_block_cache)
    for p, got in zip(prompts, batch.tokens):
        assert got == rt.generate([p], max_new_tokens=40, use_block_cache=use_block_cache).tokens[0]
    # the 64-token row's first token is the AR prediction of its prompt's last position
    assert rt.score([(prompts[1], [batch.tokens[1][0]])], scoring="trajectory").is_greedy[0]


def test_temperature_sampling_draws_each_row_from_its_own_distribution(rt):
    """Original defect: with temperature > 0 every row received row 0's samples. At a tiny
    temperature sampling is deterministic, so each row in a batch must equal the same prompt run alone."""
    prompts = [_p(20, 6), _p(45, 7)]
    kw = dict(max_new_tokens=30, temperature=1e-4, top_p=0.95, use_block_cache=False)
    batch = rt.generate(prompts, **kw)
    assert batch.tokens[0] != batch.tokens[1]
    for p, got in zip(prompts, batch.tokens):
        assert got == rt.generate([p], **kw).tokens[0]


def test_temperature_sampling_is_reproducible_with_a_seed_and_varies_without(rt):
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.9)
    a = rt.generate([_p(20, 8)], seed=11, **kw).tokens
    b = rt.generate([_p(20, 8)], seed=11, **kw).tokens
    c = rt.generate([_p(20, 8)], seed=12, **kw).tokens
    assert a == b and a != c


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    folder = make_checkpoint(str(tmp_path_factory.mktemp("worded")), seed=5, hidden=32, heads=4, kv_heads=2,
                             inter=64)
    write_word_tokenizer(folder)
    return fastdllm_rt.load(folder)


def test_stop_strings_end_a_generation(worded):
    """Original defect: lm-eval's `until` strings were ignored."""
    p = _p(21, 10)
    free = worded.generate([p], max_new_tokens=60)
    toks = free.tokens[0]
    assert len(toks) > 12
    stop = worded.tokenizer.decode([toks[10]])
    first = next(i for i, t in enumerate(toks) if worded.tokenizer.decode([t]) == stop)
    out = worded.generate([p], max_new_tokens=60, stop_strings=[stop])
    assert out.tokens[0] == toks[:first + 1]
    assert out.finish_reasons == ["stop_string"]
    assert stop not in out.texts[0]
    assert out.texts[0] == worded.tokenizer.decode(toks[:first + 1]).split(stop)[0]
    assert out.stats.tokens_generated == first + 1


def test_generated_token_counts_exclude_padding_and_masks(rt):
    """Original defect: tokens after the stop (padding) were counted as generated."""
    prompts = [_p(n, 20 + n) for n in (5, 33, 64, 90)]
    out = rt.generate(prompts, max_new_tokens=64)
    ids = rt.token_ids
    for toks, reason in zip(out.tokens, out.finish_reasons):
        assert ids.mask not in toks
        if ids.stop in toks:
            assert toks.index(ids.stop) == len(toks) - 1 and reason == "stop_token"
    assert out.stats.tokens_generated == sum(len(t) for t in out.tokens)


def test_a_stop_token_ends_the_row_and_nothing_after_it_is_returned(tmp_path):
    """A model whose head strongly prefers the stop token: every row ends with it, at once."""
    from tests.helpers.checkpoints import random_state_dict, tiny_config, write_checkpoint
    cfg = tiny_config(layers=2, hidden=32, heads=4, kv_heads=2, inter=64)
    sd = random_state_dict(cfg)
    sd["lm_head.weight"][510] = sd["model.norm.weight"] * 50
    rt = fastdllm_rt.load(write_checkpoint(str(tmp_path / "stopper"), cfg, sd), **TINY_IDS)
    out = rt.generate([_p(7, 1), _p(40, 2)], max_new_tokens=100)
    assert all(t[-1] == 510 and t.count(510) == 1 for t in out.tokens)
    assert out.finish_reasons == ["stop_token", "stop_token"]


def test_a_decoded_mask_id_is_a_token_and_the_row_stays_inside_its_cache(tmp_path):
    """A model whose head prefers the mask id: a decoded position holding that id used to be taken for an
    undecoded one, so the row recorded fewer tokens than it had decoded, ran past the positions its call had
    sized (an IndexError in the cache write for ~970-token prompts) and returned a cut generation."""
    from tests.helpers.checkpoints import random_state_dict, tiny_config, write_checkpoint
    cfg = tiny_config(layers=2, hidden=32, heads=4, kv_heads=2, inter=64)
    sd = random_state_dict(cfg)
    sd["lm_head.weight"][511] = sd["model.norm.weight"] * 50
    rt = fastdllm_rt.load(write_checkpoint(str(tmp_path / "masker"), cfg, sd), prefix_cache=False, **TINY_IDS)
    prompts = [_p(n, n) for n in (961, 963, 956, 31, 33)]     # 961 + 16 fills its slot's last block exactly
    for ee in (False, True):
        out = rt.generate(prompts, max_new_tokens=16, threshold=1.0, early_exit=ee)
        assert [len(t) for t in out.tokens] == [16] * 5 and out.finish_reasons == ["length"] * 5
        assert all(t.count(511) > 8 for t in out.tokens)          # decoded mask ids are returned as tokens
