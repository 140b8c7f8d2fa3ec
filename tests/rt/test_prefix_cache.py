"""The prefix cache (docs/design.md, Prefix cache): exact against the cache switched off, counters, eviction."""
import pytest
import torch

import fastdllm_rt
from fastdllm_rt import ReusePolicy
from fastdllm_rt.prefix_cache import Lease, PrefixCache
from tests.helpers.checkpoints import TINY_IDS, make_checkpoint

BS = 32


def _r(n, seed):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def rts(tmp_path_factory):
    """(cache on, cache off) over the same checkpoint (4 layers: the cache's work is per layer alike), on the
    CPU in fp32, where the cache is exact."""
    folder = make_checkpoint(str(tmp_path_factory.mktemp("tiny4")), seed=5, layers=4, hidden=32, heads=4,
                             kv_heads=2, inter=64)
    return (fastdllm_rt.load(folder, device="cpu", **TINY_IDS),
            fastdllm_rt.load(folder, device="cpu", prefix_cache=False, **TINY_IDS))


def _fresh(rt, budget=None):
    rt.prefix_cache = PrefixCache(BS, budget if budget is not None else 1 << 30, rt.device)
    return rt


HEAD_A, HEAD_B = _r(3 * BS, 1), _r(2 * BS + 7, 2)       # a header on a block boundary and one mid-block
MIXED = [(HEAD_A + _r(q, 10 + q), _r(x, 50 + q + x)) for q, x in [(5, 1), (32, 1), (40, 3), (0, 2), (64, 1)]] + \
        [(HEAD_B + _r(q, 20 + q), _r(x, 60 + q + x)) for q, x in [(9, 1), (25, 4), (57, 1)]] + \
        [(_r(c, 30 + c), _r(x, 70 + c)) for c, x in [(7, 2), (32, 1), (70, 35)]] + \
        [(HEAD_A + _r(40, 11), [3]), (HEAD_A + _r(40, 11), [4]), (HEAD_A + _r(40, 11), [5, 6])]


@pytest.mark.parametrize("options", [
    dict(use_block_cache=False), dict(use_block_cache=True),
    dict(use_block_cache=True, reuse=ReusePolicy("1,2", 2, "delta"), threshold=1.0),
    dict(use_block_cache=True, reveal="threshold"), dict(scoring="first_token"),
    dict(use_block_cache=True, batch_size=3)])
def test_scores_equal_the_cache_off_bit_for_bit(rts, options):
    on, off = rts
    _fresh(on)
    want = off.score(MIXED, **options)
    got = on.score(MIXED, **options)
    assert got.loglikelihoods == want.loglikelihoods          # exact float equality
    assert got.is_greedy == want.is_greedy
    assert got.stats.prefix_tokens_served > 0
    assert want.stats.prefix_tokens_served == 0
    again = on.score(MIXED, **options)                        # everything now served across calls
    assert again.loglikelihoods == want.loglikelihoods
    assert again.stats.prefix_tokens_served > got.stats.prefix_tokens_served


def test_score_rolling_equals_the_cache_off(rts):
    on, off = rts
    _fresh(on)
    docs = [_r(150, 1), _r(150, 1)[:100], _r(40, 3)]
    a, _ = off.score_rolling(docs, max_length=64)
    b, _ = on.score_rolling(docs, max_length=64)
    assert a == b


def test_a_header_is_computed_once_and_served_to_every_other_question(rts):
    """10 questions sharing a 3-block header: the header is computed once, served 9 times."""
    on, off = rts
    _fresh(on)
    head = _r(3 * BS, 5)
    questions = [(head + _r(20, 100 + q), [7]) for q in range(10)]
    got = on.score(questions, use_block_cache=False)
    assert got.stats.prefix_tokens_served == 3 * BS * 9
    assert got.stats.prefix_tokens_computed == 3 * BS           # the questions' own tokens end mid-block
    assert got.loglikelihoods == off.score(questions, use_block_cache=False).loglikelihoods
    assert off.score(questions, use_block_cache=False).stats.prefix_tokens_computed == 3 * BS * 10


def test_a_second_call_serves_the_header_from_the_cache(rts):
    on, off = rts
    _fresh(on)
    head = _r(4 * BS, 6)
    first = [(head + _r(10, 200 + q), [1, 2]) for q in range(3)]
    second = [(head + _r(10, 300 + q), [1, 2]) for q in range(3)]
    on.score(first)
    res = on.score(second)
    assert res.stats.prefix_tokens_computed == 0
    assert res.stats.prefix_tokens_served == 3 * 4 * BS
    assert res.loglikelihoods == off.score(second).loglikelihoods


def test_a_budget_smaller_than_the_working_set_evicts_and_stays_exact(rts):
    on, off = rts
    block_bytes = 2 * 4 * 2 * BS * 8 * 4           # K and V, 4 layers, 2 kv heads, head_dim 8, fp32
    _fresh(on, budget=5 * block_bytes)
    want = off.score(MIXED, use_block_cache=True, batch_size=2)
    got = on.score(MIXED, use_block_cache=True, batch_size=2)
    assert got.loglikelihoods == want.loglikelihoods
    assert got.stats.prefix_evictions > 0
    assert on.prefix_cache.bytes <= 5 * block_bytes


def test_generation_with_shared_headers_equals_the_cache_off(rts):
    on, off = rts
    _fresh(on)
    head = _r(2 * BS, 8)
    prompts = [head + _r(n, 400 + n) for n in (5, 32, 0, 40)] + [_r(33, 9), head + _r(5, 405)]
    for options in (dict(use_block_cache=True), dict(use_block_cache=False, batch_size=2)):
        want = off.generate(prompts, max_new_tokens=40, **options)
        got = on.generate(prompts, max_new_tokens=40, **options)
        assert got.tokens == want.tokens
        assert got.stats.prefix_tokens_served > 0
    trace_on, trace_off = {}, {}                # every denoising step's logits, keyed by (row, kind, block, ...)
    on.generate(prompts, max_new_tokens=20, trace=lambda *a: trace_on.setdefault(a[:5], a[5].clone()))
    off.generate(prompts, max_new_tokens=20, trace=lambda *a: trace_off.setdefault(a[:5], a[5].clone()))
    assert trace_on.keys() == trace_off.keys()
    assert all(torch.equal(trace_on[key], trace_off[key]) for key in trace_off)


def test_exact_at_widths_and_threads_where_cpu_blas_is_not_row_invariant(tmp_path):
    """At these widths a plain CPU matmul gives a row other bits when it is computed among fewer rows (and,
    on two threads, with another split of the reduction); the torch backend's fixed row tiles keep the cache
    exact there too."""
    folder = make_checkpoint(str(tmp_path / "wide"), seed=3, layers=2, hidden=256, heads=2, kv_heads=1, inter=896)
    on = fastdllm_rt.load(folder, device="cpu", **TINY_IDS)
    off = fastdllm_rt.load(folder, device="cpu", prefix_cache=False, **TINY_IDS)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        head = _r(3 * BS + 5, 21)
        reqs = [(head + _r(q, 700 + q), [q % 7, 3]) for q in (2, 9, 40)] + [(head[:BS + 3], [1])]
        want, got = off.score(reqs, use_block_cache=True), on.score(reqs, use_block_cache=True)
        assert got.stats.prefix_tokens_served > 0
        assert got.loglikelihoods == want.loglikelihoods
        prompts = [head + _r(4, 800), head + _r(30, 801)]
        assert on.generate(prompts, max_new_tokens=12).tokens == off.generate(prompts, max_new_tokens=12).tokens
    finally:
        torch.set_num_threads(threads)


# ---- the data structure --------------------------------------------------------------------------------
def _kv(x):
    return torch.full((1, 1, 4, 2), float(x)), torch.full((1, 1, 4, 2), float(x))


def test_blocks_are_keyed_by_their_token_ids_chained_on_the_parent():
    cache = PrefixCache(4, budget=1 << 20)
    a = cache.insert(None, [1, 2, 3, 4], *_kv(1))
    b = cache.insert(a, [5, 6, 7, 8], *_kv(2))
    assert [n.k[0, 0, 0, 0].item() for n in cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], 2)] == [1, 2]
    assert cache.match([9, 2, 3, 4, 5, 6, 7, 8], 2) == []            # same second block, other parent
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 9], 2) == [a]
    assert cache.insert(a, [5, 6, 7, 8], *_kv(3)) is b                  # present: not replaced


def test_a_pinned_block_is_never_evicted():
    one = 2 * 8 * 4
    cache = PrefixCache(4, budget=2 * one)
    a = cache.insert(None, [1, 1, 1, 1], *_kv(1))
    lease = Lease(cache)
    lease.pin([a])
    b = cache.insert(None, [2, 2, 2, 2], *_kv(2))
    c = cache.insert(None, [3, 3, 3, 3], *_kv(3))                     # evicts b (LRU, unpinned), not a
    assert c is not None and cache.evictions == 1
    assert cache.match([1, 1, 1, 1], 1) == [a] and cache.match([2, 2, 2, 2], 1) == []
    lease.pin([c])
    assert cache.insert(None, [4, 4, 4, 4], *_kv(4)) is None          # everything pinned: not cached
    lease.close()
    assert cache.insert(None, [4, 4, 4, 4], *_kv(4)) is not None
    assert cache.bytes <= 2 * one
    assert b.k is None


def test_shrink_frees_unpinned_blocks_and_halves_the_budget():
    cache = PrefixCache(4, budget=1 << 20)
    a = cache.insert(None, [1, 1, 1, 1], *_kv(1))
    cache.insert(a, [2, 2, 2, 2], *_kv(2))
    assert cache.shrink() == 2 * 2 * 8 * 4
    assert cache.bytes == 0 and cache.budget == 1 << 19


def test_the_triton_backend_serves_the_cache_within_its_tolerance(tmp_path):
    """The triton kernels read served blocks like computed ones (their own extend and decode kernels: within
    the triton tier, not bit for bit). On CPU in the interpreter: one layer, a short generation."""
    folder = make_checkpoint(str(tmp_path / "tri"), seed=7, layers=1, hidden=64, heads=4, kv_heads=2, inter=96)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    on = fastdllm_rt.load(folder, backend="triton", device=dev, dtype="fp32", **TINY_IDS)
    off = fastdllm_rt.load(folder, backend="triton", device=dev, dtype="fp32", prefix_cache=False, **TINY_IDS)
    _fresh(on)
    head = _r(2 * BS, 12)
    reqs = [(head + _r(9, 500), [3]), (head + _r(40, 503), [1, 2])]
    want, got = off.score(reqs, use_block_cache=True), on.score(reqs, use_block_cache=True)
    assert got.stats.prefix_tokens_served == 2 * BS
    assert max(abs(a - b) for a, b in zip(got.loglikelihoods, want.loglikelihoods)) <= 1e-4
    prompts = [head + _r(5, 600), head + _r(20, 601)]
    g_off = off.generate(prompts, max_new_tokens=4, use_block_cache=True)
    g_on = on.generate(prompts, max_new_tokens=4, use_block_cache=True)
    assert g_on.stats.prefix_tokens_served == 2 * 2 * BS           # the header, served from the scoring call
    assert g_on.tokens == g_off.tokens
