"""Programmatic dependent launch: when it is on, and - on a Hopper GPU - that a chain of PDL kernels replayed
in a CUDA graph computes exactly what the same chain computes with ordinary launches (a kernel reading its
input before its producer finished would not)."""
import pytest
import torch

from tests.kernels.conftest import DEVICE

from fastdllm_kernels.attention.kernel import decode_attention
from fastdllm_kernels.launch import pdl_enabled, pdl_mode
from fastdllm_kernels.linear.configs import LinearConfig
from fastdllm_kernels.linear.kernel import fused_linear
from fastdllm_kernels.linear.qkv_rope import qkv_rope_write
from fastdllm_kernels.rms_norm.kernel import rms_norm
from fastdllm_kernels.rope.kernel import rope_write
from fastdllm_kernels.rope.reference import rope_tables
from fastdllm_kernels.swiglu.kernel import swiglu

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9


def test_pdl_only_when_asked_for_and_on_hopper(monkeypatch):
    monkeypatch.delenv("FASTDLLM_PDL", raising=False)
    assert not pdl_enabled(torch.device(DEVICE))                        # off by default (launch.py says why)
    monkeypatch.setenv("FASTDLLM_PDL", "0")
    assert not pdl_enabled(torch.device(DEVICE))
    monkeypatch.setenv("FASTDLLM_PDL", "1")
    assert pdl_enabled(torch.device(DEVICE)) == HOPPER
    assert pdl_mode(torch.device(DEVICE)) == (1 if HOPPER else 0)
    assert not pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("FASTDLLM_PDL", "exit")
    assert pdl_mode(torch.device(DEVICE)) == (2 if HOPPER else 0)
    monkeypatch.setenv("FASTDLLM_PDL", "yes")
    with pytest.raises(ValueError, match="FASTDLLM_PDL='yes'"):
        pdl_enabled(torch.device(DEVICE))


def _decode_layer(x, p, caches, meta, fused_qkv: bool = False):
    """One decode layer's kernel chain as the triton backend launches it (norm+QKV, RoPE and cache write -
    or, ``fused_qkv``, the QKV projection doing both in its epilogue -, attention, O + residual, norm,
    gate/up + SwiGLU, down + residual); split-K everywhere."""
    cfg = LinearConfig(block_m=16, block_n=32, block_k=64, split_k=4)
    pk, pv, bk, bv = caches
    if fused_qkv:
        qkv = qkv_rope_write(x, p["qkv"], p["bias"], 1e-6, 4, 1, p["cos"], p["sin"], meta["pos"], meta["dest"],
                             meta["slot"], pk, pv, bk, bv, config=cfg)
        q = qkv[:, :4 * 64].reshape(-1, 4, 64)
    else:
        qkv = fused_linear(x, p["qkv"], norm_weight=p["n1"], eps=1e-6, bias=p["bias"], config=cfg)
        q, k, v = qkv.split([4 * 64, 64, 64], dim=-1)
        q, k, v = q.reshape(-1, 4, 64), k.reshape(-1, 1, 64), v.reshape(-1, 1, 64)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        rope_write(q, k, v, p["cos"], p["sin"], meta["pos"], meta["dest"], meta["slot"], pk, pv, bk, bv)
    o = decode_attention(q, pk, pv, bk, bv, meta["slots"], meta["plen"], meta["tail"], meta["qstart"], n_q=8,
                         scale=0.125).reshape(x.shape[0], -1)
    x = fused_linear(o, p["o"], residual=x, config=cfg)
    h = fused_linear(rms_norm(x, p["n2"], 1e-6), p["gate_up"], swiglu=True, config=cfg)
    h = swiglu(torch.cat([h, h], dim=1))                                # one more PDL kernel in the chain
    return fused_linear(h, p["down"], residual=x, config=cfg)


@pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs a CUDA GPU of compute capability "
                                       "9.0+ (runs in the device session)")
@pytest.mark.parametrize("mode", ["1", "exit"])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_pdl_chain_in_a_cuda_graph_equals_ordinary_launches(monkeypatch, mode, fused_qkv):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(*s, scale=0.05):
        return (torch.randn(*s, device=DEVICE, generator=g) * scale).to(torch.bfloat16)

    d = 256
    p = {"qkv": rnd(6 * 64, d), "bias": rnd(6 * 64), "o": rnd(d, 4 * 64), "gate_up": rnd(2 * 512, d),
         "down": rnd(d, 512), "n1": 1 + rnd(d), "n2": 1 + rnd(d)}
    p["cos"], p["sin"] = rope_tables(4096, 64, 10000.0, torch.bfloat16, DEVICE)
    meta = {"pos": torch.arange(1000, 1008, device=DEVICE), "dest": torch.full((8,), 2, dtype=torch.int32,
                                                                                 device=DEVICE),
            "slot": torch.zeros(8, dtype=torch.long, device=DEVICE), "slots": torch.zeros(1, dtype=torch.long,
                                                                                         device=DEVICE),
            "plen": torch.tensor([992], device=DEVICE), "tail": torch.ones(1, dtype=torch.long, device=DEVICE),
            "qstart": torch.zeros(1, dtype=torch.long, device=DEVICE)}

    def fresh_caches():
        gc = torch.Generator(device=DEVICE).manual_seed(1)
        pk = (torch.randn(1, 1, 1024, 64, device=DEVICE, generator=gc)).to(torch.bfloat16)
        return pk, pk.clone() * 0.5, torch.zeros(1, 1, 32, 64, dtype=torch.bfloat16, device=DEVICE), \
            torch.zeros(1, 1, 32, 64, dtype=torch.bfloat16, device=DEVICE)

    xs = [rnd(8, d, scale=1.0) for _ in range(3)]

    def three_layers(x, caches):
        for _ in range(3):
            x = _decode_layer(x, p, caches, meta, fused_qkv)
        return x

    monkeypatch.setenv("FASTDLLM_PDL", "0")
    expected = [three_layers(x, fresh_caches()) for x in xs]
    monkeypatch.setenv("FASTDLLM_PDL", mode)
    assert pdl_enabled(torch.device(DEVICE))
    static_x, caches = xs[0].clone(), fresh_caches()
    three_layers(static_x, caches)                                     # warm-up: compiles, split-K counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = three_layers(static_x, caches)
    for x, want in zip(xs, expected):
        for c, f in zip(caches, fresh_caches()):
            c.copy_(f)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want), float((out.float() - want.float()).abs().max())
