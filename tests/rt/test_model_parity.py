"""Our transformer against independent references: transformers' Qwen2 modules fed a block-causal 4-D mask,
and the from-scratch NaiveQwen of tests/helpers; cache consistency of the unified forward."""
import pytest
import torch

import fastdllm_rt
from fastdllm_rt.batch import Kind, RowRequest, build_batch
from tests.helpers.checkpoints import TINY_IDS
from tests.helpers.naive import NaiveQwen


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _plain_logits(rt, ids):
    req = RowRequest(Kind.PLAIN, 0, 0, torch.tensor(ids), logits_at=list(range(len(ids))))
    batch = build_batch([req], rt.device, rt.config.bd_size)
    return rt.model(batch, None).logits


def _hf_logits(folder, ids):
    transformers = pytest.importorskip("transformers", reason="transformers is the independent reference here")
    from safetensors.torch import load_file
    import json, os
    raw = json.load(open(os.path.join(folder, "config.json")))
    cfg = transformers.Qwen2Config(**{k: v for k, v in raw.items() if k not in ("auto_map", "architectures",
                                                                               "model_type", "bd_size",
                                                                               "conplemenrary_mask")})
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    sd = load_file(os.path.join(folder, "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    n = len(ids)
    pos = torch.arange(n)
    allowed = (pos[:, None] // raw["bd_size"]) >= (pos[None, :] // raw["bd_size"])
    additive = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)  # eager adds the mask
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=additive[None, None], position_ids=pos[None])
    return out.logits[0].float()


@pytest.mark.parametrize("which", ["tiny_untied", "tiny_tied"])
def test_plain_forward_matches_transformers_qwen2_with_block_causal_mask(which, request):
    folder = request.getfixturevalue(which)
    rt = fastdllm_rt.load(folder, **TINY_IDS)
    ids = torch.randint(0, 500, (77,)).tolist()
    ours = _plain_logits(rt, ids)
    ref = _hf_logits(folder, ids)
    # two fp32 implementations summing in different orders: 1e-4 for results with matmuls inside (some CPUs
    # measure just above 1e-5 for the tied model)
    assert _rel(ours, ref) <= 1e-4, _rel(ours, ref)


def test_plain_forward_matches_the_naive_reference(tiny_untied):
    rt = fastdllm_rt.load(tiny_untied, **TINY_IDS)
    ids = torch.randint(0, 500, (45,)).tolist()
    ref, _ = NaiveQwen(tiny_untied).plain(ids)
    assert _rel(_plain_logits(rt, ids), ref) <= 1e-5


def test_prefill_commit_full_block_through_caches_equal_one_plain_forward(tiny_untied):
    """K/V appended by prefill and commit, a full-block forward over prefix + block, give the
    logits of one plain forward of the whole sequence."""
    rt = fastdllm_rt.load(tiny_untied, **TINY_IDS)
    ids = torch.randint(0, 500, (128,)).tolist()
    ref = _plain_logits(rt, ids)
    caches = rt.pool.acquire(2, 256, None)
    slot = caches.alloc()

    def run(kind, start, toks):
        req = RowRequest(kind, slot, start, torch.tensor(toks), logits_at=list(range(len(toks))))
        return rt.model(build_batch([req], rt.device, 32), caches).logits

    got = [run(Kind.PREFILL, 0, ids[:64]), run(Kind.COMMIT, 64, ids[64:96]), run(Kind.FULL, 96, ids[96:128])]
    assert _rel(torch.cat(got), ref) <= 1e-5


def test_sub_block_forward_uses_fresh_kv_for_its_8_positions_and_stale_kv_elsewhere(tiny_untied):
    """A sub-block forward at offset r sees the prefix, fresh K/V at [r, r+8) and the block cache's
    stale K/V (from the last full-block forward) at the other 24 positions."""
    rt = fastdllm_rt.load(tiny_untied, **TINY_IDS)
    naive = NaiveQwen(tiny_untied)
    prefix = torch.randint(0, 500, (64,)).tolist()
    block_old = torch.randint(0, 500, (32,)).tolist()
    block_new = list(block_old)
    r = 16
    block_new[r:r + 8] = torch.randint(0, 500, (8,)).tolist()
    block_new[3] = 511                              # a stale position that changed: the cache must not see it
    caches = rt.pool.acquire(1, 160, None)
    slot = caches.alloc()
    rt.model(build_batch([RowRequest(Kind.PREFILL, slot, 0, torch.tensor(prefix))], rt.device, 32), caches)
    rt.model(build_batch([RowRequest(Kind.FULL, slot, 64, torch.tensor(block_old))], rt.device, 32), caches)
    sub = RowRequest(Kind.SUB, slot, 64 + r, torch.tensor(block_new[r:r + 8]), logits_at=list(range(8)))
    ours = rt.model(build_batch([sub], rt.device, 32), caches).logits
    _, kvs = naive.plain(prefix + block_old)
    stale = [(k[64:], v[64:]) for k, v in kvs]
    ref, _ = naive.sub_block(prefix, stale, block_new[r:r + 8], r)
    assert _rel(ours, ref) <= 1e-5


def test_rows_of_different_lengths_in_one_forward_equal_each_row_alone(tiny_untied):
    rt = fastdllm_rt.load(tiny_untied, **TINY_IDS)
    lens = [5, 37, 64, 90]
    seqs = [torch.randint(0, 500, (n,)).tolist() for n in lens]
    caches = rt.pool.acquire(8, 256, None)
    alone = []
    for s in seqs:
        alone.append(_plain_logits(rt, s))
    reqs = [RowRequest(Kind.PLAIN, 0, 0, torch.tensor(s), logits_at=list(range(len(s)))) for s in seqs]
    batch = build_batch(reqs, rt.device, 32)
    together = rt.model(batch, caches).logits
    for (_, lo, hi), ref in zip(batch.logits_rows, alone):
        assert _rel(together[lo:hi], ref) <= 1e-5
    # and through the caches: prefill rows of different lengths, then a mixed FULL/SUB/COMMIT step
    slots = [caches.alloc() for _ in seqs]
    whole = [len(s) - len(s) % 32 for s in seqs]
    pre = [RowRequest(Kind.PREFILL, sl, 0, torch.tensor(s[:w])) for sl, s, w in zip(slots, seqs, whole) if w]
    rt.model(build_batch(pre, rt.device, 32), caches)
    blocks = [s[w:] + [511] * (32 - (len(s) - w)) for s, w in zip(seqs, whole)]
    step = [RowRequest(Kind.FULL, sl, w, torch.tensor(b), logits_at=list(range(32)))
            for sl, w, b in zip(slots, whole, blocks)]
    mixed = rt.model(build_batch(step, rt.device, 32), caches).logits
    for i, (s, w, b) in enumerate(zip(seqs, whole, blocks)):
        ref = _plain_logits(rt, s[:w] + b)[w:]
        lo, hi = build_batch(step, rt.device, 32).logits_rows[i][1:]
        assert _rel(mixed[lo:hi], ref) <= 1e-5


def test_logits_are_computed_only_where_asked(tiny_untied):
    rt = fastdllm_rt.load(tiny_untied, **TINY_IDS)
    ids = torch.randint(0, 500, (40,)).tolist()
    full = _plain_logits(rt, ids)
    req = RowRequest(Kind.PLAIN, 0, 0, torch.tensor(ids), logits_at=[3, 39])
    got = rt.model(build_batch([req], rt.device, 32), None).logits
    assert got.shape == (2, 512)
    assert torch.allclose(got, full[[3, 39]], rtol=1e-5, atol=1e-5)
