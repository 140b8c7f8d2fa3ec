"""The call configurations: defaults written once, validated on construction, the public aliases."""
import pytest

import fastdllm_rt
from fastdllm_rt import ConfigError, DecodeConfig, InputError, PolicyError, ReusePolicy, ScoreConfig
from fastdllm_rt.reuse import resolve_policy


def test_decoding_and_scoring_share_their_defaults():
    d, s = DecodeConfig(max_new_tokens=4), ScoreConfig()
    assert (d.threshold, d.block_size, d.sub_block_size) == (s.threshold, s.block_size, s.sub_block_size) == \
        (0.9, 32, 8)
    assert d.use_block_cache and s.use_block_cache and d.reuse is None and s.reuse is None


@pytest.mark.parametrize("make, error, words", [
    (lambda: DecodeConfig(max_new_tokens=0), InputError, "max_new_tokens"),
    (lambda: DecodeConfig(max_new_tokens=4, threshold=-0.1), InputError, "threshold"),
    (lambda: DecodeConfig(max_new_tokens=4, sub_block_size=5), ConfigError, "small_block_size"),
    (lambda: DecodeConfig(max_new_tokens=4, batch_size=0), InputError, "batch_size"),
    (lambda: ScoreConfig(scoring="nope"), ConfigError, "scoring='nope'"),
    (lambda: ScoreConfig(reveal="all"), ConfigError, "reveal='all'"),
    (lambda: ScoreConfig(scoring="first_token", reuse=ReusePolicy("first", k=2)), PolicyError, "first_token"),
])
def test_bad_settings_are_rejected_on_construction(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_k_1_is_no_policy_and_the_block_cache_requirement_is_checked_once():
    assert resolve_policy(None, 28, True) is None
    assert resolve_policy(ReusePolicy("first", k=1), 28, False) is None
    plan = resolve_policy(ReusePolicy("middle", k=3, mode="delta"), 28, True)
    assert plan.layers == tuple(range(8, 20)) and (plan.k, plan.mode) == (3, "delta")
    assert [plan.skips_step(s) for s in range(4)] == [False, True, True, False]
    with pytest.raises(PolicyError, match="needs use_block_cache=True"):
        resolve_policy(ReusePolicy("first", k=2), 28, False)
    assert ReusePolicy.from_args("1") is None and ReusePolicy.from_args(2).k == 2


def test_small_block_size_is_the_public_name_of_the_sub_block_size():
    rt = fastdllm_rt.load(fastdllm_rt.small_model_path())
    p = rt.tokenizer.encode("Question: 2 + 3 = ?\nAnswer:")
    a = rt.generate([p], max_new_tokens=8, small_block_size=4)
    b = rt.generate([p], max_new_tokens=8, sub_block_size=4)
    assert a.tokens == b.tokens
    with pytest.raises(ConfigError, match="not both"):
        rt.generate([p], max_new_tokens=8, small_block_size=4, sub_block_size=4)
    assert rt.score([(p, [5])], small_block_size=4).loglikelihoods == rt.score([(p, [5])], sub_block_size=4).loglikelihoods
