"""Layer-output reuse (docs/design.md, Reuse policy): schedule, semantics, real skipping, validation."""
import pytest
import torch

import fastdllm_rt
from fastdllm_rt import PolicyError, ReusePolicy
from tests.helpers.checkpoints import TINY_IDS
from tests.helpers.forwards import counting_forwards


@pytest.fixture(scope="module")
def rt(tiny28):
    return fastdllm_rt.load(tiny28, **TINY_IDS)


PROMPTS = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (20, 45)]


def test_named_subsets_for_28_layers():
    assert ReusePolicy("first").resolve(28) == tuple(range(1, 13))
    assert ReusePolicy("middle").resolve(28) == tuple(range(8, 20))
    assert ReusePolicy("last").resolve(28) == tuple(range(16, 28))
    assert ReusePolicy("first", subset_size=4).resolve(28) == (1, 2, 3, 4)
    assert ReusePolicy("8-10,20").resolve(28) == (8, 9, 10, 20)
    assert ReusePolicy([3, 1, 3]).resolve(28) == (1, 3)


def _trace():
    seen = []
    return seen, lambda row, kind, start, sub, step, logits: seen.append((row, kind, start, sub, step,
                                                                          logits.clone()))


def test_k1_is_bit_identical_to_no_policy(rt):
    a_seen, a_trace = _trace()
    b_seen, b_trace = _trace()
    a = rt.generate(PROMPTS, max_new_tokens=60, trace=a_trace)
    b = rt.generate(PROMPTS, max_new_tokens=60, reuse=ReusePolicy("middle", k=1), trace=b_trace)
    assert a.tokens == b.tokens
    assert len(a_seen) == len(b_seen)
    assert all(torch.equal(x[-1], y[-1]) for x, y in zip(a_seen, b_seen))
    assert b.stats.skipped_layer_evaluations == 0


@pytest.mark.parametrize("subset", ["first", "middle", "last"])
@pytest.mark.parametrize("k", [2, 3])
def test_output_mode_skipped_step_replays_the_previous_steps_logits_bit_for_bit(rt, subset, k):
    """With a contiguous range in `output` mode a skipped step is an exact replay of the previous
    step's logits at the same absolute positions. Row 0 of a sub-block window is the own-position slot (its
    source lies outside the window), never used for a masked position, so it is not compared."""
    seen, trace = _trace()
    rt.generate(PROMPTS[:1], max_new_tokens=70, reuse=ReusePolicy(subset, k=k), trace=trace)
    replays = 0
    for prev, cur in zip(seen, seen[1:]):
        row, kind, start, sub, step, logits = cur
        if kind == "sub_block" and step % k:
            assert prev[2:4] == (start, sub) and prev[4] == step - 1
            assert torch.equal(logits[1:], prev[-1][1:])
            replays += 1
    assert replays > 0


@pytest.mark.parametrize("k", [2, 3])
def test_first_middle_last_give_identical_tokens_in_output_mode(rt, k):
    outs = [rt.generate(PROMPTS, max_new_tokens=70, reuse=ReusePolicy(s, k=k)).tokens
            for s in ("first", "middle", "last")]
    assert outs[0] == outs[1] == outs[2]


def test_delta_mode_differs_from_output_mode(rt):
    seen_o, trace_o = _trace()
    seen_d, trace_d = _trace()
    o = rt.generate(PROMPTS, max_new_tokens=70, reuse=ReusePolicy("middle", k=2, mode="output"), trace=trace_o)
    d = rt.generate(PROMPTS, max_new_tokens=70, reuse=ReusePolicy("middle", k=2, mode="delta"), trace=trace_d)
    differs = o.tokens != d.tokens or any(not torch.equal(x[-1], y[-1]) for x, y in zip(seen_o, seen_d))
    assert differs
    assert d.stats.skipped_layer_evaluations > 0


def test_a_skipped_layer_is_never_entered(rt):
    """Counted with forward hooks on the layers themselves, not inferred from the schedule."""
    calls = [0] * 28
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(rt.model.layers)]
    try:
        out = rt.generate(PROMPTS[:1], max_new_tokens=70, reuse=ReusePolicy("first", k=2))
    finally:
        for h in hooks:
            h.remove()
    st = out.stats
    forwards = st.total_row_forwards
    assert calls[0] == forwards and all(calls[i] == forwards for i in range(13, 28))
    assert all(calls[i] < forwards for i in range(1, 13))
    assert st.layers_computed == calls                     # batch 1: one row per layer call
    assert all(st.layers_skipped[i] == forwards - calls[i] for i in range(28))
    assert st.computed_layer_evaluations + st.skipped_layer_evaluations == 28 * forwards


@pytest.mark.parametrize("mode, reads_per_skip_forward", [("output", 2), ("delta", 6)])
def test_a_run_of_skipped_layers_reads_the_reuse_cache_once_in_output_mode(rt, monkeypatch, mode,
                                                                          reads_per_skip_forward):
    """Layers 1-3 and 6-8 skipped: in output mode only the last layer of each run is read (its cached output is
    the run's output, whatever the input), in delta mode every skipped layer adds its cached difference."""
    from fastdllm_rt.reuse import ReuseRuntime
    reads = []
    real = ReuseRuntime.replay
    monkeypatch.setattr(ReuseRuntime, "replay", lambda self, layer, *a: reads.append(layer) or real(self, layer, *a))
    out = rt.generate(PROMPTS[:1], max_new_tokens=70, reuse=ReusePolicy("1-3,6-8", k=2, mode=mode))
    skip_forwards = out.stats.layers_skipped[1]                 # batch 1: one row skips per skipping forward
    assert skip_forwards > 0
    assert len(reads) == reads_per_skip_forward * skip_forwards
    assert set(reads) == ({3, 8} if mode == "output" else {1, 2, 3, 6, 7, 8})


@pytest.mark.parametrize("policy, use_block_cache, words", [
    (lambda: ReusePolicy("inner", k=2), True, "not understood"),
    (lambda: ReusePolicy("3-40", k=2), True, "do not exist"),
    (lambda: ReusePolicy("first", k=0), True, "k must be an integer >= 1"),
    (lambda: ReusePolicy("first", k=2, subset_size=40), True, "larger than the model's 28 layers"),
    (lambda: ReusePolicy("first", k=2, mode="weights"), True, "mode 'weights'"),
    (lambda: ReusePolicy("first", k=2), False, "needs use_block_cache=True"),
])
def test_bad_policies_fail_before_any_model_work(rt, policy, use_block_cache, words):
    with counting_forwards(rt.model) as forwards:
        with pytest.raises(PolicyError, match=words):
            rt.generate(PROMPTS, max_new_tokens=8, reuse=policy(), use_block_cache=use_block_cache)
        with pytest.raises(PolicyError, match=words):
            rt.score([(PROMPTS[0], [1, 2, 3])], reuse=policy(), use_block_cache=use_block_cache)
    assert not forwards


def test_reuse_caches_are_per_row_a_batch_equals_its_rows_alone(rt):
    pol = ReusePolicy("middle", k=2, mode="delta")
    batch = rt.generate(PROMPTS, max_new_tokens=50, reuse=pol)
    for p, got in zip(PROMPTS, batch.tokens):
        assert got == rt.generate([p], max_new_tokens=50, reuse=pol).tokens[0]


def test_generation_says_why_a_reuse_policy_skipped_nothing():
    """The shipped model finishes each sub-block of an easy answer in one (full-block) step at threshold 0.9, so
    the policy never acts; the call must say so instead of reporting a silent zero."""
    rt = fastdllm_rt.load(fastdllm_rt.small_model_path())
    p = rt.tokenizer.encode("Question: Mia has 12 apples. Mia gets 30 more apples. How many apples does Mia have "
                            "now?\nAnswer:")
    policy = ReusePolicy("first", k=2)
    confident = rt.generate([p], max_new_tokens=40, threshold=0.9, reuse=policy)
    assert confident.stats.skipped_layer_evaluations == 0
    assert any("no layer evaluation was skipped" in n for n in confident.stats.notes)
    one_per_step = rt.generate([p], max_new_tokens=40, threshold=1.0, reuse=policy)
    assert one_per_step.stats.skipped_layer_evaluations > 0 and not one_per_step.stats.notes
