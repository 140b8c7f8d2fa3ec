"""RMSNorm (+ residual add), SwiGLU, RoPE + KV write, logit statistics: kernels against their references."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, DTYPES, assert_close_tiered

from fastdllm_kernels.rms_norm.kernel import add_rms_norm, rms_norm
from fastdllm_kernels.rms_norm.reference import add_rms_norm_ref, rms_norm_ref, row_rstd_ref
from fastdllm_kernels.rope.kernel import rope_write
from fastdllm_kernels.rope.reference import finish_projection_ref, rope_ref, rope_tables
from fastdllm_kernels.select.kernel import choice_stats, logit_stats, token_logp
from fastdllm_kernels.select.reference import choice_stats_ref, logit_stats_ref, token_logp_ref
from fastdllm_kernels.swiglu.kernel import swiglu
from fastdllm_kernels.swiglu.reference import swiglu_ref


def _lowp(ref_fn, dtype, *args):
    """(fp32 reference on upcast inputs, reference in the low precision or None for fp32)."""
    ref32 = ref_fn(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    return ref32, (None if dtype == torch.float32 else ref_fn(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, D", [(1, 64), (7, 96), (13, 1536), (32, 3584)])
def test_rms_norm(dtype, T, D):
    x = torch.randn(T, D, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(D, device=DEVICE)).to(dtype)
    ref32, lowp = _lowp(lambda a, b: rms_norm_ref(a, b, 1e-6), dtype, x, w)
    assert_close_tiered(rms_norm(x, w, 1e-6), ref32, lowp, "rms_norm", fp32_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_without_gain(dtype):
    x = torch.randn(9, 1536, device=DEVICE).to(dtype)
    ref32, lowp = _lowp(lambda a: rms_norm_ref(a, None, 1e-6), dtype, x)
    assert_close_tiered(rms_norm(x, None, 1e-6), ref32, lowp, "rms_norm (no gain)", fp32_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, D", [(1, 64), (11, 160), (32, 3584)])
def test_add_rms_norm_returns_norm_and_sum(dtype, T, D):
    x, res = torch.randn(T, D, device=DEVICE).to(dtype), torch.randn(T, D, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(D, device=DEVICE)).to(dtype)
    tri_n, tri_s = add_rms_norm(x, res, w, 1e-6)
    ref_n, ref_s = add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(tri_s, ref_s)                     # the sum is rounded exactly where HF rounds it
    ref32 = rms_norm_ref(ref_s.float(), w.float(), 1e-6)
    assert_close_tiered(tri_n, ref32, None if dtype == torch.float32 else ref_n, "add_rms_norm", fp32_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, F", [(1, 128), (5, 1000), (32, 4480)])
def test_swiglu(dtype, T, F):
    gu = torch.randn(T, 2 * F, device=DEVICE).to(dtype)
    ref32, lowp = _lowp(swiglu_ref, dtype, gu)
    assert_close_tiered(swiglu(gu), ref32, lowp, "swiglu", fp32_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, F, D", [(3, 128, 64), (6, 1000, 1536), (32, 4480, 3584)])
def test_swiglu_scales_rows_by_the_input_rms(dtype, T, F, D):
    """The gate/up projection of an un-normalised row (gain folded into the weight): each row first scaled
    by its input row's 1/rms (widths that are not powers of two are masked)."""
    gu = torch.randn(T, 2 * F, device=DEVICE).to(dtype)
    x = (3 * torch.randn(T, D, device=DEVICE)).to(dtype)
    r = row_rstd_ref(x, 1e-6)
    ref32 = swiglu_ref(gu.float(), r)
    lowp = None if dtype == torch.float32 else swiglu_ref(gu, r)
    assert_close_tiered(swiglu(gu, rms_of=x, eps=1e-6), ref32, lowp, "swiglu (row scale)", fp32_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("HQ, HKV, D", [(4, 2, 32), (28, 4, 128), (12, 2, 128)])
def test_rope_write_rotates_in_place_and_writes_each_destination(dtype, HQ, HKV, D):
    T, S, BS, slots_n = 19, 96, 32, 3
    cos, sin = rope_tables(512, D, 1e6, dtype, DEVICE)
    pos = torch.randint(0, 300, (T,), device=DEVICE)
    q = torch.randn(T, HQ, D, device=DEVICE).to(dtype)
    k = torch.randn(T, HKV, D, device=DEVICE).to(dtype)
    v = torch.randn(T, HKV, D, device=DEVICE).to(dtype)
    dest = torch.tensor([0, 1, 2] * 6 + [1], device=DEVICE)
    slots = torch.randint(0, slots_n, (T,), device=DEVICE)
    idx = torch.randperm(S, device=DEVICE)[:T]
    pos = torch.where(dest == 1, idx, pos)               # prefix writes go to distinct positions
    pk = torch.zeros(slots_n, HKV, S, D, device=DEVICE, dtype=dtype)
    pv, bk, bv = pk.clone(), torch.zeros(slots_n, HKV, BS, D, device=DEVICE, dtype=dtype), None
    bv = bk.clone()
    q_ref, k_ref = rope_ref(q.float(), cos[pos].float(), sin[pos].float()), rope_ref(k.float(), cos[pos].float(), sin[pos].float())
    q_low, k_low = rope_ref(q, cos[pos], sin[pos]), rope_ref(k, cos[pos], sin[pos])
    v_in = v.clone()
    qt, kt = q.clone(), k.clone()
    rope_write(qt, kt, v, cos, sin, pos, dest, slots, pk, pv, bk, bv)
    assert_close_tiered(qt, q_ref, None if dtype == torch.float32 else q_low, "rope q", fp32_tol=1e-5)
    assert_close_tiered(kt, k_ref, None if dtype == torch.float32 else k_low, "rope k", fp32_tol=1e-5)
    for t in range(T):
        s, p = int(slots[t]), int(pos[t])
        if int(dest[t]) == 1:
            assert torch.equal(pk[s, :, p], kt[t]) and torch.equal(pv[s, :, p], v_in[t])
        elif int(dest[t]) == 2:
            assert torch.equal(bk[s, :, p % BS], kt[t]) and torch.equal(bv[s, :, p % BS], v_in[t])


@pytest.mark.parametrize("N, V", [(1, 100), (8, 5000), (17, 152064)])
def test_logit_stats(N, V):
    x = torch.randn(N, V, device=DEVICE) * 4
    x[0, V // 3] = x[0, 2 * V // 3] = 100.0              # a tie: the first index wins, as torch.argmax
    mx, idx, lse = logit_stats(x)
    rmx, ridx, rlse = logit_stats_ref(x)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(mx, rmx)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N, V", [(1, 100), (8, 5000), (9, 152064)])
def test_choice_stats_is_the_softmax_max_and_flags_non_finite_rows(N, V):
    """The sampler's greedy choice: the largest softmax probability and its first index, as the original's
    softmax-then-max; a row holding NaN or +inf, or only -inf, is flagged (its probability is not finite)."""
    x = torch.randn(N, V, device=DEVICE) * 4
    x[0, V // 3] = x[0, 2 * V // 3] = 100.0              # a tie: the first index wins
    if N > 1:
        x[1, V - 1] = 30.0                               # the max in the last (partial) chunk
    if N > 4:
        x[2, V // 2] = float("nan")
        x[3, 7] = float("inf")
        x[4] = float("-inf")
    got, ref = choice_stats(x), choice_stats_ref(x)
    assert got.dtype == torch.float64 and got.shape == (3, N)
    assert torch.equal(got[2], ref[2]), (got[2], ref[2])
    finite = ref[2] == 1
    assert torch.equal(got[1][finite], ref[1][finite])
    # against the exact value (fp64): the fp32 reference's own error over 152k terms on the CPU is ~3e-5
    exact = torch.softmax(x.double(), dim=-1).max(dim=-1).values
    torch.testing.assert_close(got[0][finite], exact[finite], rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(ref[0][finite], exact[finite], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("N, V", [(1, 100), (9, 152064)])
def test_token_logp_matches_the_reference_and_flags_non_finite_rows(N, V):
    """The scorer's log p(token), whether the token is the row's (first) argmax, and finiteness."""
    x = torch.randn(N, V, device=DEVICE) * 4
    tokens = torch.randint(0, V, (N,), device=DEVICE)
    x[0, V // 3] = x[0, 2 * V // 3] = 100.0              # a tie: only the first index is the argmax
    tokens[0] = 2 * V // 3
    if N > 2:
        tokens[1] = int(x[1].argmax())
        x[2, 5] = float("nan")
    got, ref = token_logp(x, tokens), token_logp_ref(x, tokens)
    assert got.dtype == torch.float64 and got.shape == (3, N)
    assert torch.equal(got[2], ref[2]) and torch.equal(got[1], ref[1]), (got[1:], ref[1:])
    assert got[1, 0] == 0 and (N < 3 or got[1, 1] == 1)
    finite = ref[2] == 1
    exact = torch.log_softmax(x.double(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(got[0][finite], exact[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("HQ, HKV, D, hidden", [(4, 2, 32, 96), (12, 2, 128, 1536)])
@pytest.mark.parametrize("norm, bias", [(True, True), (True, False), (False, True)])
def test_rope_write_finishes_a_raw_projection(dtype, HQ, HKV, D, hidden, norm, bias):
    """q, k, v as the raw QKV projection of the un-normalised input: scaled by the input row's 1/rms, the bias
    added and rounded (v in place as well), then rotated and written to the caches."""
    T, S, BS = 7, 64, 32
    cos, sin = rope_tables(256, D, 1e6, dtype, DEVICE)
    pos = torch.arange(T, device=DEVICE) + 3
    qkv = (4 * torch.randn(T, (HQ + 2 * HKV) * D, device=DEVICE)).to(dtype)
    x = (2 * torch.randn(T, hidden, device=DEVICE)).to(dtype)
    b = (0.5 * torch.randn((HQ + 2 * HKV) * D, device=DEVICE)).to(dtype) if bias else None
    q, k, v = (t.reshape(T, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))
    r = row_rstd_ref(x, 1e-6) if norm else None

    def expected(lowp):
        cast = (lambda t: t) if lowp else (lambda t: t.float())
        bq, bk, bv = (None, None, None) if b is None else cast(b).split([HQ * D, HKV * D, HKV * D])
        fq, fk, fv = (finish_projection_ref(cast(t), r, bb) for t, bb in ((q, bq), (k, bk), (v, bv)))
        c, s_ = cast(cos)[pos], cast(sin)[pos]
        return rope_ref(fq, c, s_), rope_ref(fk, c, s_), fv

    q32, k32, v32 = expected(False)
    ql, kl, vl = expected(True) if dtype != torch.float32 else (None, None, None)
    dest = torch.tensor([1, 2, 0, 1, 2, 1, 2], device=DEVICE)
    slots = torch.zeros(T, dtype=torch.long, device=DEVICE)
    pk = torch.zeros(1, HKV, S, D, device=DEVICE, dtype=dtype)
    pv, bk, bv = pk.clone(), torch.zeros(1, HKV, BS, D, device=DEVICE, dtype=dtype), None
    bv = bk.clone()
    rope_write(q, k, v, cos, sin, pos, dest, slots, pk, pv, bk, bv, norm_input=x if norm else None, bias=b,
               eps=1e-6)
    assert_close_tiered(q, q32, ql, "finished q", fp32_tol=1e-5)
    assert_close_tiered(k, k32, kl, "finished k", fp32_tol=1e-5)
    assert_close_tiered(v, v32, vl, "finished v", fp32_tol=1e-5)
    for t in range(T):
        p = int(pos[t])
        if int(dest[t]) == 1:
            assert torch.equal(pk[0, :, p], k[t]) and torch.equal(pv[0, :, p], v[t])
        elif int(dest[t]) == 2:
            assert torch.equal(bk[0, :, p % BS], k[t]) and torch.equal(bv[0, :, p % BS], v[t])
