"""Block-diffusion attention kernels against the PyTorch definitions (kernels/attention/reference.py)."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, DTYPES, assert_close_tiered

from fastdllm_kernels.attention.kernel import DecodePlan, decode_attention, decode_plan, prefill_attention
from fastdllm_kernels.attention.reference import decode_attention_ref, extend_attention_ref


def _caches(slots, hkv, S, D, dtype):
    pk = torch.randn(slots, hkv, S, D, device=DEVICE).to(dtype)
    return pk, torch.randn_like(pk), torch.randn(slots, hkv, 32, D, device=DEVICE).to(dtype), \
        torch.randn(slots, hkv, 32, D, device=DEVICE).to(dtype)


def _decode_case(dtype, hq, hkv, D, n_q, plens, tails, S=160, plan=None):
    R = len(plens)
    pk, pv, bk, bv = _caches(R + 1, hkv, S, D, dtype)
    q = torch.randn(R * n_q, hq, D, device=DEVICE).to(dtype)
    slots = torch.randperm(R + 1, device=DEVICE)[:R]
    args = (slots, torch.tensor(plens, device=DEVICE), torch.tensor(tails, device=DEVICE),
            torch.arange(R, device=DEVICE) * n_q)
    scale = D ** -0.5
    tri = decode_attention(q, pk, pv, bk, bv, *args, n_q=n_q, scale=scale, plan=plan)
    ref32 = decode_attention_ref(q.float(), pk.float(), pv.float(), bk.float(), bv.float(), *args, n_q, scale)
    lowp = None if dtype == torch.float32 else decode_attention_ref(q, pk, pv, bk, bv, *args, n_q, scale)
    assert_close_tiered(tri, ref32, lowp, "decode_attention")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv, D", [(28, 4, 128), (12, 2, 128), (4, 2, 32)])
@pytest.mark.parametrize("n_q", [32, 8])
def test_decode_attention_full_sub_and_commit_rows(dtype, hq, hkv, D, n_q):
    # rows of different prefix lengths in one batch; tail = block cache (full/sub) or none (commit)
    _decode_case(dtype, hq, hkv, D, n_q, plens=[96, 0, 64, 131], tails=[1, 1, 0, 1])


def test_decode_attention_one_row_with_many_splits():
    plan = decode_plan(1, 2, 2, 8, 160 + 32)
    assert plan.splits > 1                               # the combine kernel is exercised
    _decode_case(torch.float32, 4, 2, 32, 8, plens=[157], tails=[1])


@pytest.mark.parametrize("splits", [3, 12, 20])
def test_decode_attention_splits_divide_each_rows_keys(splits):
    # keys are divided among the splits per row at run time: 189 keys in tiles of 16 over 3 (uneven), 12
    # (one tile each) and 20 splits (8 of them empty, which the combine must weigh 0); rows of other lengths
    # (0 + 32 block keys, 64 without tail) share the launch
    plan = DecodePlan(block_m=16, m_tiles=1, splits=splits, block_n=16)
    _decode_case(torch.float32, 4, 2, 32, 8, plens=[157, 0, 64], tails=[1, 1, 0], S=192, plan=plan)


def _prefill_case(dtype, hq, hkv, D, lens, starts, S=192):
    R = len(lens)
    pk, pv, _, _ = _caches(R, hkv, S, D, dtype)
    T = sum(lens)
    q = torch.randn(T, hq, D, device=DEVICE).to(dtype)
    k = torch.randn(T, hkv, D, device=DEVICE).to(dtype)
    v = torch.randn(T, hkv, D, device=DEVICE).to(dtype)
    slots = torch.arange(R, device=DEVICE)
    st = torch.tensor(starts, device=DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), device=DEVICE)
    scale = D ** -0.5
    tri = prefill_attention(q, k, v, pk, pv, slots, st, cu, max(lens), scale, 32)
    ref32 = extend_attention_ref(q.float(), k.float(), v.float(), pk.float(), pv.float(), slots, st, cu, lens, 32, scale)
    lowp = None if dtype == torch.float32 else extend_attention_ref(q, k, v, pk, pv, slots, st, cu, lens, 32, scale)
    assert_close_tiered(tri, ref32, lowp, "prefill_attention")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv, D", [(28, 4, 128), (4, 2, 32)])
def test_prefill_attention_block_causal_varlen(dtype, hq, hkv, D):
    # a prime-length row, a one-token row, a row that starts after a cached prefix
    _prefill_case(dtype, hq, hkv, D, lens=[37, 1, 96, 70], starts=[0, 0, 64, 32])


def test_prefill_attention_rows_equal_a_per_sequence_loop():
    lens, starts = [45, 64, 3], [32, 0, 96]
    _prefill_case(torch.float32, 4, 2, 32, lens, starts)
    for n, s in zip(lens, starts):
        _prefill_case(torch.float32, 4, 2, 32, [n], [s])
