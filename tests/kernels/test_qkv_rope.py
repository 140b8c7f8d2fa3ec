"""qkv_rope_write - the QKV projection with the RoPE kernel's work (row scale, bias, rotation, KV-cache write)
in its epilogue - against the two-step reference, and the strategy table that chooses it."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, DTYPES, assert_close_tiered

from fastdllm_kernels.linear import configs
from fastdllm_kernels.linear.configs import LinearConfig, pick_qkv_rope, qkv_rope_key
from fastdllm_kernels.linear.qkv_rope import qkv_rope_write
from fastdllm_kernels.linear.reference import qkv_rope_write_ref
from fastdllm_kernels.rope.reference import rope_tables

S, BS, SLOTS = 64, 32, 2


def _problem(dtype, T, HQ, HKV, D, hidden, bias):
    g = torch.Generator(device="cpu").manual_seed(T * 1000 + HQ * 10 + D)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    N = (HQ + 2 * HKV) * D
    x = (3 * rnd(T, hidden)).to(dtype)
    w = (rnd(N, hidden) / hidden ** 0.5).to(dtype)
    b = (0.5 * rnd(N)).to(dtype) if bias else None
    cos, sin = rope_tables(256, D, 1e6, dtype, DEVICE)
    dest = torch.tensor([1, 2, 0], device=DEVICE).repeat(T)[:T]
    # no two tokens write one cache row (as in a real step; concurrent programs would race): prefix writes at
    # distinct positions, block writes at distinct positions modulo the block size, in any block
    blocks = torch.randint(0, 250 // BS, (T,), generator=g)
    pos = torch.where(dest.cpu() == 1, torch.randperm(S, generator=g)[:T],
                      blocks * BS + torch.randperm(BS, generator=g)[:T])
    pos = pos.to(DEVICE)
    slots = torch.randint(0, SLOTS, (T,), generator=g).to(DEVICE)
    return x, w, b, cos, sin, pos, dest, slots


def _caches(dtype, HKV, D):
    pk = torch.zeros(SLOTS, HKV, S, D, device=DEVICE, dtype=dtype)
    bk = torch.zeros(SLOTS, HKV, BS, D, device=DEVICE, dtype=dtype)
    return [pk, pk.clone(), bk, bk.clone()]


def _check(dtype, T, HQ, HKV, D, hidden, bias, config):
    x, w, b, cos, sin, pos, dest, slots = _problem(dtype, T, HQ, HKV, D, hidden, bias)
    caches = _caches(dtype, HKV, D)
    out = qkv_rope_write(x, w, b, 1e-6, HQ, HKV, cos, sin, pos, dest, slots, *caches, config=config)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    caches32 = [c.float() for c in _caches(dtype, HKV, D)]
    ref32 = qkv_rope_write_ref(x.float(), w.float(), up(b), 1e-6, HQ, HKV, cos.float(), sin.float(), pos, dest,
                               slots, *caches32)
    lowp, caches_lowp = None, [None] * 4
    if dtype != torch.float32:
        caches_lowp = _caches(dtype, HKV, D)
        lowp = qkv_rope_write_ref(x, w, b, 1e-6, HQ, HKV, cos, sin, pos, dest, slots, *caches_lowp)
    assert out.shape == (T, (HQ + 2 * HKV) * D) and out.dtype == dtype
    assert_close_tiered(out, ref32, lowp, "qkv_rope_write q|k|v", fp32_tol=1e-4)
    # the caches hold exactly the k/v the kernel returned, where dest says, and nothing anywhere else
    k_out, v_out = (t.reshape(T, HKV, D) for t in out[:, HQ * D:].split(HKV * D, dim=-1))
    expect = _caches(dtype, HKV, D)
    for t in range(T):
        s, p = int(slots[t]), int(pos[t])
        if int(dest[t]) == 1:
            expect[0][s, :, p], expect[1][s, :, p] = k_out[t], v_out[t]
        elif int(dest[t]) == 2:
            expect[2][s, :, p % BS], expect[3][s, :, p % BS] = k_out[t], v_out[t]
    for name, got, want, ref, ref_lowp in zip(("prefix k", "prefix v", "block k", "block v"), caches, expect,
                                              caches32, caches_lowp):
        assert torch.equal(got, want), f"{name}: cache rows differ from the returned k/v or were written wrongly"
        assert_close_tiered(got, ref, ref_lowp, name, fp32_tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 8, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_qkv_rope_write_matches_projection_then_rope(dtype, T, bias):
    """GQA 2:1, head_dim 32, one K tile per split and two splits reduced by the last to arrive."""
    _check(dtype, T, 4, 2, 32, 128, bias, LinearConfig(16 if T <= 16 else 32, 16, 64, split_k=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("HQ, HKV, D, hidden, config", [
    (7, 1, 64, 96, LinearConfig(16, 32, 64, split_k=1)),        # GQA 7:1 (the 7B's), a partial K tile
    (6, 1, 64, 256, LinearConfig(16, 16, 64, split_k=3)),       # GQA 6:1 (the 1.5B's), three splits
    (12, 2, 128, 1536, None),                                   # the 1.5B's shapes, the derived configuration
])
def test_qkv_rope_write_at_model_like_shapes(dtype, HQ, HKV, D, hidden, config):
    _check(dtype, 9, HQ, HKV, D, hidden, True, config)


def test_a_column_tile_wider_than_half_a_head_is_refused():
    x, w, b, cos, sin, pos, dest, slots = _problem(torch.float32, 4, 4, 2, 32, 64, True)
    with pytest.raises(AssertionError, match="must divide half the head width"):
        qkv_rope_write(x, w, b, 1e-6, 4, 2, cos, sin, pos, dest, slots, *_caches(torch.float32, 2, 32),
                       config=LinearConfig(16, 32, 64))


def test_the_table_chooses_fused_or_separate_per_shape(monkeypatch):
    assert pick_qkv_rope(65, 2048, 1536)[0] == "separate"            # prefill / scoring: cuBLAS + RoPE kernel
    strategy, cfg = pick_qkv_rope(8, 2048, 1536, num_sms=132)         # untuned decode shape: fused, derived
    assert strategy == "fused" and cfg.block_n == 32 and cfg.split_k >= 1
    tuned = {"gpu": {qkv_rope_key(8, 2048, 1536): {"strategy": "separate", "config": None},
                     qkv_rope_key(32, 2048, 1536): {"strategy": "fused",
                                                    "config": LinearConfig(32, 64, 128, 4).to_json()}}}
    monkeypatch.setattr(configs, "tuned_table", lambda: tuned)
    assert pick_qkv_rope(8, 2048, 1536, gpu="gpu") == ("separate", None)
    assert pick_qkv_rope(30, 2048, 1536, gpu="gpu") == ("fused", LinearConfig(32, 64, 128, 4))


def test_swapped_operands_are_refused():
    # the epilogue needs each row's 1/rms, which the swapped tiling cannot compute (kernels/linear/kernel.py)
    x, w, b, cos, sin, pos, dest, slots = _problem(torch.float32, 4, 4, 2, 64, 128, True)
    with pytest.raises(ValueError, match="swap_ab=False"):
        qkv_rope_write(x, w, b, 1e-6, 4, 2, cos, sin, pos, dest, slots, *_caches(torch.float32, 2, 64),
                       config=LinearConfig(16, 32, 64, swap_ab=True))
