"""fused_linear (norm prologue, bias / SwiGLU / residual epilogues, split-K) against the HF-order reference."""
import json

import pytest
import torch

from tests.kernels.conftest import DEVICE, DTYPES, assert_close_tiered

from fastdllm_kernels.linear import configs
from fastdllm_kernels.linear.configs import STRATEGIES, LinearConfig, pick_config, pick_strategy
from fastdllm_kernels.linear.dispatch import linear
from fastdllm_kernels.linear.kernel import _COUNTERS, fused_linear
from fastdllm_kernels.linear.reference import fused_linear_ref

FUSIONS = {
    "plain": dict(),
    "norm_bias": dict(norm=True, bias=True),                       # QKV
    "residual": dict(residual=True),                               # O, down
    "norm_swiglu": dict(norm=True, swiglu=True),                   # gate/up
    "rms_swiglu": dict(row_rms=True, swiglu=True),                 # gate/up, the norm gain folded in
    "norm_fp32_out": dict(norm=True, out_dtype=torch.float32),     # LM head
    "swiglu": dict(swiglu=True),                                   # gate/up after a norm kernel
    "bias_fp32_out": dict(bias=True, out_dtype=torch.float32),     # a head after a norm kernel, with a bias
}


def _inputs(dtype, M, N, K, fusion):
    """x, weight and the keyword arguments of one fusion (weights scaled to unit-variance outputs)."""
    f = FUSIONS[fusion]
    rows = 2 * N if f.get("swiglu") else N
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn(rows, K, device=DEVICE) / K ** 0.5).to(dtype)
    kw = {"swiglu": f.get("swiglu", False), "out_dtype": f.get("out_dtype")}
    if f.get("norm"):
        kw["norm_weight"] = (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype)
        kw["eps"] = 1e-6
    if f.get("row_rms"):
        kw["row_rms"] = True
    if f.get("bias"):
        kw["bias"] = (0.1 * torch.randn(rows, device=DEVICE)).to(dtype)
    if f.get("residual"):
        kw["residual"] = torch.randn(M, N, device=DEVICE).to(dtype)
    return x, w, kw


def _case(dtype, M, N, K, fusion, config):
    x, w, kw = _inputs(dtype, M, N, K, fusion)
    tri = fused_linear(x, w, config=config, **kw)
    assert tri.shape == (M, N) and tri.dtype == (kw["out_dtype"] or dtype)
    up = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref32 = fused_linear_ref(x.float(), w.float(), **up)
    lowp = None if dtype == torch.float32 else fused_linear_ref(x, w, **kw)
    assert_close_tiered(tri, ref32, lowp, f"fused_linear[{fusion}]", fp32_tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("M", [1, 8, 32])
def test_fused_linear_each_fusion_one_pass(dtype, fusion, M):
    _case(dtype, M, 80, 256, fusion, LinearConfig(block_m=16 if M <= 16 else 32, block_n=32, block_k=64))


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("split_k, K", [(2, 256), (3, 320), (5, 200)])
def test_fused_linear_split_k_reduces_every_partial_once(fusion, split_k, K):
    # 320 = 5 tiles of 64 over 3 splits (uneven), 200 not a multiple of the tile (masked tail); 40 token rows
    # over two row tiles, 48 columns over two column tiles with a ragged edge
    _case(torch.float32, 40, 48, K, fusion, LinearConfig(block_m=32, block_n=32, block_k=64, split_k=split_k))
    # the last split of every tile resets its counter: the next call starts from zero
    assert all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", ["plain", "residual", "swiglu", "bias_fp32_out"])
@pytest.mark.parametrize("M, split_k, stages", [(1, 1, 4), (8, 3, 3), (16, 1, 2), (32, 1, 4), (40, 2, 3)])
def test_fused_linear_with_swapped_operands(dtype, fusion, M, split_k, stages):
    # weight tile @ x.T, transposed back before the split reduction and epilogue: the same linear (40 rows:
    # two row tiles; 80 columns: a ragged column tile of 64; K 320 over 3 splits: uneven) - every fusion
    # without the row norm (O, down; gate/up after a norm kernel; a head after one)
    cfg = LinearConfig(block_m=16 if M <= 16 else 32, block_n=64, block_k=64, split_k=split_k, num_stages=stages,
                       swap_ab=True)
    _case(dtype, M, 80, 320, fusion, cfg)


@pytest.mark.parametrize("fusion", ["norm_bias", "rms_swiglu", "norm_fp32_out"])
def test_swapped_operands_with_the_row_norm_are_refused(fusion):
    x, w, kw = _inputs(torch.float32, 8, 80, 320, fusion)
    with pytest.raises(ValueError, match="norm_then_fused"):
        fused_linear(x, w, config=LinearConfig(16, 64, 64, swap_ab=True), **kw)


def test_fused_linear_split_k_is_deterministic():
    x = torch.randn(8, 512, device=DEVICE)
    w = torch.randn(64, 512, device=DEVICE)
    cfg = LinearConfig(block_m=16, block_n=32, block_k=64, split_k=4)
    a = fused_linear(x, w, config=cfg)
    assert torch.equal(a, fused_linear(x, w, config=cfg))


def test_tuned_table_sets_strategy_and_config(monkeypatch, tmp_path):
    path = tmp_path / "tuned.json"
    entry = LinearConfig(block_m=32, block_n=128, block_k=256, split_k=3, num_warps=8, num_stages=3)
    path.write_text(json.dumps({"Some GPU": {"32,4608,3584,0": {"strategy": "norm_then_fused",
                                                                "config": entry.to_json()},
                                             "16,4608,3584,0": {"strategy": "cublas", "config": None},
                                             "64,4608,3584,0": {"strategy": "fused", "config": None}}}))
    monkeypatch.setattr(configs, "TUNED_PATH", str(path))
    configs.tuned_table.cache_clear()
    try:
        assert pick_config(32, 4608, 3584, False, 132, "Some GPU") == entry
        assert pick_config(20, 4608, 3584, False, 132, "Some GPU") == entry        # same M bucket
        assert pick_strategy(20, 4608, 3584, False, "Some GPU") == "norm_then_fused"
        assert pick_strategy(8, 4608, 3584, False, "Some GPU") == "cublas"
        assert pick_strategy(8, 4608, 3584, False, "Other GPU") == "fused"          # untuned: fused ...
        assert pick_strategy(64, 4608, 3584, False, "Other GPU") == "cublas"        # ... up to 32 tokens
        # the 64-token bucket never reaches compute-bound forwards: above FUSED_MAX_TOKENS it is cuBLAS
        assert pick_strategy(64, 4608, 3584, False, "Some GPU") == "fused"
        assert pick_strategy(configs.FUSED_MAX_TOKENS + 1, 4608, 3584, False, "Some GPU") == "cublas"
        derived = pick_config(32, 4608, 3584, False, 132, "Other GPU")
        assert derived != entry and derived.block_m == 32
        # derived: enough splits for ~2 programs per SM, never splits thinner than 4 K tiles
        tiles = -(-4608 // derived.block_n)
        assert tiles * derived.split_k >= 132 or derived.split_k == 3584 // (4 * derived.block_k)
    finally:
        configs.tuned_table.cache_clear()


def test_gpu_tuned_for_some_shapes_borrows_the_rest(monkeypatch, tmp_path):
    """A GPU with entries of its own for some shapes (an H200 sweep of one model) takes the entries of the tuned
    GPU of its generation for the others - not the derived configuration an untuned shape would get."""
    own = LinearConfig(block_m=16, block_n=128, block_k=128, split_k=2, num_warps=4, num_stages=4)
    borrowed = LinearConfig(block_m=16, block_n=64, block_k=256, split_k=6, num_warps=4, num_stages=3)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({
        "New GPU": {"16,4608,3584,0": {"strategy": "fused", "config": own.to_json()}},
        "Old GPU": {"16,4608,3584,0": {"strategy": "cublas", "config": None},
                    "16,3584,3584,0": {"strategy": "fused", "config": borrowed.to_json()},
                    "16,4608,3584,rope": {"strategy": "separate", "config": None}}}))
    monkeypatch.setattr(configs, "TUNED_PATH", str(path))
    monkeypatch.setitem(configs.BORROWS_FROM, "New GPU", "Old GPU")
    configs.tuned_table.cache_clear()
    try:
        assert (pick_strategy(8, 4608, 3584, False, "New GPU"), pick_config(8, 4608, 3584, False, 132, "New GPU")) \
            == ("fused", own)                                                          # its own entry wins
        assert pick_config(8, 3584, 3584, False, 132, "New GPU") == borrowed           # borrowed shape
        assert configs.pick_qkv_rope(8, 4608, 3584, 132, "New GPU") == ("separate", None)
        assert pick_config(8, 3584, 3584, False, 132, "Other GPU") != borrowed         # no borrowing: derived
    finally:
        configs.tuned_table.cache_clear()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fusion", ["norm_bias", "residual", "norm_swiglu", "rms_swiglu", "norm_fp32_out"])
def test_every_strategy_computes_the_same_linear(strategy, fusion):
    x, w, kw = _inputs(torch.float32, 8, 48, 128, fusion)
    got = linear(x, w, strategy=strategy, config=LinearConfig(16, 32, 64, 2), **kw)
    torch.testing.assert_close(got, fused_linear_ref(x, w, **kw), rtol=1e-4, atol=1e-4)


def test_folded_gain_equals_the_gain_in_the_norm():
    """rmsnorm(x; g) @ W.T == (x / rms(x)) @ (W * g).T: every strategy's ``row_rms`` path on the folded weight
    gives the gated linear of the unfolded one (what ``fold_norm_gains`` relies on)."""
    for M in (8, configs.FUSED_MAX_TOKENS + 16):        # decode sizes, and the compute-bound path above them
        x, w, kw = _inputs(torch.float32, M, 48, 128, "norm_swiglu")
        gain = kw.pop("norm_weight")
        want = fused_linear_ref(x, w, norm_weight=gain, **kw)
        for strategy in STRATEGIES if M <= configs.FUSED_MAX_TOKENS else (None,):
            got = linear(x, w * gain[None, :], row_rms=True, strategy=strategy, config=LinearConfig(16, 32, 64, 2),
                         **kw)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{strategy} M={M}")


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown linear strategy"):
        linear(torch.randn(2, 64, device=DEVICE), torch.randn(16, 64, device=DEVICE), strategy="magic")


def test_fused_linear_rejects_mismatched_shapes():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(AssertionError):
        fused_linear(x, torch.randn(32, 48, device=DEVICE))
    with pytest.raises(AssertionError):
        fused_linear(x, torch.randn(32, 64, device=DEVICE), residual=torch.randn(4, 16, device=DEVICE))


def test_shipped_tuned_table_is_well_formed():
    configs.tuned_table.cache_clear()
    table = configs.tuned_table()
    assert "NVIDIA H100 80GB HBM3" in table and configs.TUNED_ON["9.0"] in table
    for gpu, entries in table.items():
        for key, entry in entries.items():
            bm, n, k, kind = key.split(",")
            bm, n, k = int(bm), int(n), int(k)
            assert bm in (16, 32, 64) and n > 0 and k > 0 and kind in ("0", "1", "rope"), key
            if kind == "rope":                      # the QKV projection with its RoPE epilogue (qkv_rope.py)
                assert entry["strategy"] in configs.QKV_ROPE_STRATEGIES, (gpu, key)
                if entry["strategy"] == "separate":
                    continue
                assert 64 % entry["config"]["block_n"] == 0, (gpu, key, entry)   # divides half a 128-wide head
            else:
                assert entry["strategy"] in STRATEGIES, (gpu, key)
            if entry["strategy"] == "cublas":
                continue
            cfg = LinearConfig(**entry["config"])
            assert cfg.block_m == bm and cfg.split_k >= 1, (gpu, key, cfg)
            # swapped operands: only fused_linear has them, and only wide weight tiles use the warpgroup MMA
            assert not cfg.swap_ab or (kind != "rope" and cfg.block_n >= 64), (gpu, key, cfg)
            # gate/up's fused strategy normalises in the prologue: swapped only after a norm kernel
            assert not (cfg.swap_ab and kind == "1") or entry["strategy"] == "norm_then_fused", (gpu, key, entry)
            for size in (cfg.block_m, cfg.block_n, cfg.block_k):
                assert size >= 16 and size & (size - 1) == 0, (gpu, key, cfg)
