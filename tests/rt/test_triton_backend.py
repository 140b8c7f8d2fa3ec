"""The triton backend against the torch backend, at model level. On CPU the kernels
run in Triton's interpreter in fp32, which executes every program of every launch one after another: the CPU
run keeps to short generations on a 2-layer model; on a GPU the same tests run compiled at full length, and
tests/gpu adds bf16 at the released shapes."""

import copy

import pytest
import torch

import fastdllm_rt
from fastdllm_rt import ReusePolicy
from fastdllm_rt.batch import Kind, RowRequest, build_batch
from fastdllm_rt.model import block_causal_allowed, fold_norm_gains
from tests.helpers.checkpoints import TINY_IDS, make_checkpoint

INTERP = not torch.cuda.is_available()
NEW = 6 if INTERP else 40
# on CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = make_checkpoint(str(tmp_path_factory.mktemp("tri")), seed=7, layers=2 if INTERP else 4, hidden=64,
                             heads=4, kv_heads=2, inter=96)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = fastdllm_rt.load(folder, backend="torch", device=dev, dtype="fp32", **TINY_IDS)
    tri = fastdllm_rt.load(folder, backend="triton", device=dev, dtype="fp32", **TINY_IDS)
    return ref, tri


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_every_forward_kind_matches_the_torch_backend(pair):
    ref, tri = pair
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=g) for n in (70, 33, 96)]
    outs = []
    for rt in (ref, tri):
        caches = rt.pool.acquire(4, 256, None)
        got = []
        slots = [caches.alloc() for _ in prompts]
        whole = [len(p) - len(p) % 32 for p in prompts]
        run = lambda reqs: rt.model(build_batch(reqs, rt.device, 32), caches).logits  # noqa: E731
        got.append(run([RowRequest(Kind.PLAIN, s, 0, p, logits_at=list(range(len(p)))) for s, p in zip(slots, prompts)]))
        got.append(run([RowRequest(Kind.PREFILL, s, 0, p[:w], logits_at=[w - 1]) for s, p, w in zip(slots, prompts, whole)]))
        blocks = [torch.cat([p[w:], torch.full((32 - (len(p) - w),), 511)]) if len(p) > w else p[w - 32:w]
                  for p, w in zip(prompts, whole)]
        got.append(run([RowRequest(Kind.FULL, s, w, b, logits_at=list(range(32))) for s, w, b in zip(slots, whole, blocks)]))
        mixed = [RowRequest(Kind.SUB, slots[0], whole[0] + 8, blocks[0][8:16], logits_at=list(range(8))),
                 RowRequest(Kind.FULL, slots[1], whole[1], blocks[1], logits_at=list(range(32))),
                 RowRequest(Kind.COMMIT, slots[2], whole[2], blocks[2], logits_at=[31])]
        got.append(run(mixed))
        outs.append(got)
    for a, b in zip(*outs):
        assert _rel(b, a) <= 1e-4


@pytest.mark.parametrize("use_block_cache", [False, True])
def test_generations_equal_the_torch_backend(pair, use_block_cache):
    ref, tri = pair
    g = torch.Generator().manual_seed(1)
    lens = (33,) if INTERP else (5, 31, 33, 70)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in lens]
    a = ref.generate(prompts, max_new_tokens=NEW, use_block_cache=use_block_cache, early_exit=INTERP)
    b = tri.generate(prompts, max_new_tokens=NEW, use_block_cache=use_block_cache, early_exit=INTERP)
    assert a.tokens == b.tokens
    assert a.stats.forwards == b.stats.forwards


def test_scores_and_reuse_match_the_torch_backend(pair):
    ref, tri = pair
    g = torch.Generator().manual_seed(2)
    shapes = ((20, 1), (45, 3)) if INTERP else ((20, 1), (45, 12), (64, 3))
    reqs = [(torch.randint(0, 500, (c,), generator=g).tolist(), torch.randint(0, 500, (x,), generator=g).tolist())
            for c, x in shapes]
    for kw in (dict(scoring="first_token"), dict(use_block_cache=False), dict(reuse=ReusePolicy("1", k=2))):
        a, b = ref.score(reqs, **kw), tri.score(reqs, **kw)
        assert b.loglikelihoods == pytest.approx(a.loglikelihoods, rel=1e-4, abs=1e-4)
    # delta mode, and output mode over a run of two skipped layers (only the run's last layer's cache is read)
    for pol in (ReusePolicy("1", k=2, mode="delta"), ReusePolicy("0-1" if INTERP else "1-2", k=2, mode="output")):
        a = ref.generate([r[0] for r in reqs], max_new_tokens=NEW, reuse=pol, early_exit=INTERP)
        b = tri.generate([r[0] for r in reqs], max_new_tokens=NEW, reuse=pol, early_exit=INTERP)
        assert a.tokens == b.tokens and a.stats.layers_skipped == b.stats.layers_skipped
        assert sum(b.stats.layers_skipped) > 0


def test_folded_norm_gains_give_the_same_model(pair):
    """The triton backend folds every layer's RMSNorm gains into its QKV and gate/up weights (``fold_norm_gains``, which the loader runs for it): the
    gains become ones and the weights W * g. Folding the torch backend's model the same way leaves its logits
    unchanged (fp32, within 1e-4 - the GPU's matmuls sum in another order), so the triton comparisons above
    test the kernels, not the fold."""
    ref, tri = pair
    for a, b in zip(ref.model.layers, tri.model.layers):
        assert b.input_layernorm.gain_folded and b.post_attention_layernorm.gain_folded
        assert not a.input_layernorm.gain_folded
        assert torch.equal(b.input_layernorm.weight, torch.ones_like(b.input_layernorm.weight))
        torch.testing.assert_close(b.self_attn.qkv_proj.weight,
                                   a.self_attn.qkv_proj.weight * a.input_layernorm.weight[None, :])
        torch.testing.assert_close(b.mlp.gate_up_proj.weight,
                                   a.mlp.gate_up_proj.weight * a.post_attention_layernorm.weight[None, :])
    folded = copy.deepcopy(ref.model)
    fold_norm_gains(folded)
    fold_norm_gains(folded)                                  # a second fold changes nothing
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(3)).to(ref.device)
    pos = torch.arange(40, device=ref.device)[None]
    allowed = block_causal_allowed(40, 32, ref.device)[None]
    torch.testing.assert_close(folded.forward_dense(ids, pos, allowed), ref.model.forward_dense(ids, pos, allowed),
                               rtol=1e-4, atol=1e-4)


def test_triton_backend_refuses_unfolded_gains(pair):
    _, tri = pair
    norm = tri.model.layers[0].input_layernorm
    norm.gain_folded = False
    try:
        with pytest.raises(RuntimeError, match="folded.*fold_norm_gains"):
            tri.generate([[1, 2, 3]], max_new_tokens=2)
    finally:
        norm.gain_folded = True
