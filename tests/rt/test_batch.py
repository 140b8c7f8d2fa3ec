"""Packing a forward on the host (``pack_batch``) and describing a replayed packing with a captured batch's
device views (``rebind``, the CUDA-graph path), checked on CPU against fresh uploads."""
import torch

import fastdllm_rt
from fastdllm_rt.batch import Kind, RowRequest, build_batch, pack_batch, rebind, upload
from tests.helpers.checkpoints import TINY_IDS


def test_pack_batch_lays_out_tokens_positions_slots_logits_and_group_metadata():
    reqs = [RowRequest(Kind.SUB, 3, 72, torch.tensor([5, 6, 7, 8, 9, 10, 11, 12], dtype=torch.int32),
                       logits_at=[0, 7], skip=True),
            RowRequest(Kind.FULL, 1, 32, torch.arange(100, 132), logits_at=[31]),
            RowRequest(Kind.SUB, 2, 40, torch.arange(8), logits_at=[1])]
    p = pack_batch(reqs, 32)
    # groups in kind order: FULL, SUB computing, SUB skipping; the caller's order within a group
    assert [(g.kind, g.skip, g.tok_lo, g.tok_hi, g.members, g.lens) for g in p.layout] == [
        (Kind.FULL, False, 0, 32, [1], [32]), (Kind.SUB, False, 32, 40, [2], [8]), (Kind.SUB, True, 40, 48, [0], [8])]
    T = p.T
    assert T == 48 and p.host.dtype == torch.long
    assert p.host[:T].tolist() == list(range(100, 132)) + list(range(8)) + list(range(5, 13))
    assert p.host[T:2 * T].tolist() == list(range(32, 64)) + list(range(40, 48)) + list(range(72, 80))
    assert p.host[2 * T:3 * T].tolist() == [1] * 32 + [2] * 8 + [3] * 8
    assert p.host[3 * T:3 * T + p.n_logits].tolist() == [31, 33, 40, 47]
    assert p.logits_rows == [(0, 2, 4), (1, 0, 1), (2, 1, 2)]
    assert (p.reuse_lo, p.skip_from) == (0, 40)
    # per group: slots, starts (SUB: its block start), cumulative lengths
    b = upload(p, "cpu")
    assert [(g.slots.tolist(), g.starts.tolist(), g.cu.tolist()) for g in b.groups] == [
        ([1], [32], [0, 32]), ([2], [32], [0, 8]), ([3], [64], [0, 8])]


def test_a_rebound_batch_computes_what_a_fresh_upload_computes(tiny_untied):
    """The graph path copies a new packing into the captured buffer and rebinds the captured batch: with the
    requests in another order (same signature) the forward and the logits rows must equal a fresh upload's."""
    rt = fastdllm_rt.load(tiny_untied, **TINY_IDS)
    caches = rt.pool.acquire(4, 256, None)
    a, b = caches.alloc(), caches.alloc()
    for sl in (a, b):
        rt.model(build_batch([RowRequest(Kind.PREFILL, sl, 0, torch.randint(0, 500, (64,)))], rt.device, 32), caches)
        rt.model(build_batch([RowRequest(Kind.FULL, sl, 64, torch.randint(0, 500, (32,)))], rt.device, 32), caches)

    def step(sub_slot, full_slot, sub_first, seed):
        g = torch.Generator().manual_seed(seed)
        sub = RowRequest(Kind.SUB, sub_slot, 72, torch.randint(0, 500, (8,), generator=g), logits_at=[0, 3, 7])
        full = RowRequest(Kind.FULL, full_slot, 64, torch.randint(0, 500, (32,), generator=g), logits_at=[5, 31])
        return [sub, full] if sub_first else [full, sub]

    first = pack_batch(step(a, b, False, 0), 32)
    buffer = first.host.to(rt.device)                  # as the graph runner keeps it
    captured = upload(first, rt.device, buffer=buffer)
    second_reqs = step(b, a, True, 1)
    second = pack_batch(second_reqs, 32)
    assert second.signature == first.signature and second.logits_rows != first.logits_rows
    buffer.copy_(second.host)
    rebound = rebind(captured, second)
    fresh = build_batch(second_reqs, rt.device, 32)
    assert rebound.logits_rows == fresh.logits_rows == [(0, 2, 5), (1, 0, 2)]
    assert [g.rows for g in rebound.groups] == [g.rows for g in fresh.groups] == [[1], [0]]
    assert torch.equal(rt.model(rebound, caches).logits, rt.model(fresh, caches).logits)
