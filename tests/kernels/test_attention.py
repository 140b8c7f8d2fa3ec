"""Block-diffusion attention kernels against the PyTorch definitions (kernels/attention/reference.py)."""
import dataclasses

import pytest
import torch

from tests.kernels.conftest import DEVICE, DTYPES, assert_close_tiered

from fastdllm_kernels.attention import kernel as attention_kernel
from fastdllm_kernels.attention.kernel import (DecodePlan, decode_attention, decode_plan, merge_rows_in_kernel,
                                               prefill_attention)
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


def test_one_launch_merge_only_where_programs_run_together(monkeypatch):
    plan = DecodePlan(block_m=64, m_tiles=1, splits=16)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert merge_rows_in_kernel(plan, 4, cuda, 132) == 4                 # 64 rows over 16 splits
    assert merge_rows_in_kernel(dataclasses.replace(plan, splits=22), 4, cuda, 132) == 4    # 3 rounded up to 4
    assert merge_rows_in_kernel(dataclasses.replace(plan, splits=64), 4, cuda, 132) == 1
    assert merge_rows_in_kernel(plan, 4, cpu, 132) == 0                  # auto: GPUs only
    assert merge_rows_in_kernel(dataclasses.replace(plan, merge_in_kernel=False), 4, cuda, 132) == 0
    assert merge_rows_in_kernel(dataclasses.replace(plan, splits=1), 4, cuda, 132) == 0       # nothing to merge
    assert merge_rows_in_kernel(plan, 4, cuda, 8) == 0                   # 16 splits cannot be resident on 8 SMs
    assert merge_rows_in_kernel(plan, attention_kernel.SYNC_COUNTERS + 1, cuda, 132) == 0  # more tiles than counters
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert merge_rows_in_kernel(plan, 4, cuda, 132) == 0                 # the interpreter: always the second launch
    with pytest.raises(ValueError, match="one after another"):
        merge_rows_in_kernel(dataclasses.replace(plan, merge_in_kernel=True), 4, cuda, 132)


def _merged_both_ways(hq, hkv, D, n_q, plens, tails, plan, S=2048 + 64):
    """The same call with the splits merged in the split pass's launch and by the merge kernel, each program
    merging as many rows (the merge's sum over splits is then laid out alike: other row counts may round one
    output element in ~10^5 differently - device run 84)."""
    R = len(plens)
    pk, pv, bk, bv = _caches(R + 1, hkv, S, D, torch.bfloat16)
    q = torch.randn(R * n_q, hq, D, device=DEVICE).to(torch.bfloat16)
    args = (torch.randperm(R + 1, device=DEVICE)[:R], torch.tensor(plens, device=DEVICE),
            torch.tensor(tails, device=DEVICE), torch.arange(R, device=DEVICE) * n_q)

    rows = merge_rows_in_kernel(dataclasses.replace(plan, merge_in_kernel=True), R * hkv * plan.m_tiles,
                                torch.device(DEVICE), 132)

    def call(merge_in_kernel, out=None):
        return decode_attention(q, pk, pv, bk, bv, *args, n_q=n_q, scale=D ** -0.5, out=out,
                                plan=dataclasses.replace(plan, merge_in_kernel=merge_in_kernel, merge_rows=rows))
    return call


ONE_LAUNCH = pytest.mark.skipif(DEVICE != "cuda", reason="the one-launch merge needs a GPU's programs running "
                                "together; the interpreter runs them one after another (the merge kernel path, "
                                "sharing its merge code, is tested on CPU above)")


@ONE_LAUNCH
@pytest.mark.parametrize("hq, hkv, n_q", [(28, 4, 32), (28, 4, 8), (12, 2, 32), (12, 2, 8)])
def test_one_launch_merge_equals_the_merge_kernel(hq, hkv, n_q):
    # the decode plan's own splits at a 2k prefix; rows of other lengths (a short one leaves most splits
    # empty) share the launch; the same partials, merged by the same code: equal bit for bit
    plens = [2048, 5, 1000, 2048]
    plan = decode_plan(len(plens), hkv, hq // hkv, n_q, 2048 + 64 + 32)
    assert plan.splits > 1
    call = _merged_both_ways(hq, hkv, 128, n_q, plens, [1, 1, 0, 1], plan)
    torch.testing.assert_close(call(True), call(False), rtol=0, atol=0)
    counters = attention_kernel._sync_counters(torch.device(DEVICE))
    assert int(counters.abs().sum()) == 0                       # every launch leaves its counters as it found them


@ONE_LAUNCH
@pytest.mark.parametrize("splits", [2, 3, 20, 64])
def test_one_launch_merge_with_uneven_and_empty_splits(splits):
    # 3 and 20 splits leave a remainder of rows; at 64 splits of a short row most splits have no keys
    plan = DecodePlan(block_m=64, m_tiles=1, splits=splits)
    call = _merged_both_ways(28, 4, 128, 8, [157, 0, 64], [1, 1, 0], plan, S=256)
    torch.testing.assert_close(call(True), call(False), rtol=0, atol=0)


@ONE_LAUNCH
def test_one_launch_merge_replays_in_a_cuda_graph():
    # a graph replays the launch with the counters the previous replay left: each replay must meet afresh
    plan = decode_plan(1, 4, 7, 8, 2048 + 64 + 32)
    call = _merged_both_ways(28, 4, 128, 8, [2048], [1], plan)
    want = call(False)
    out = torch.full_like(want, float("nan"))
    call(True, out)                                             # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(5):                                      # five launches meeting at the same counters
            call(True, out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=0, atol=0)


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
