"""Op-level pytest-benchmark suite: decode attention against SDPA with a mask at the decode shapes,
and the fused elementwise kernels against their PyTorch references. Times are host clock with a synchronise
per call (launch included, as eager code sees it); bench/attention_op.py times the same ops inside CUDA
graphs, as the runtime replays them."""
import pytest
import torch
import torch.nn.functional as F

from common import DEVICE, decode_attention_inputs, record
from fastdllm_kernels.attention.kernel import decode_attention
from fastdllm_kernels.rms_norm.kernel import add_rms_norm
from fastdllm_kernels.rms_norm.reference import add_rms_norm_ref
from fastdllm_kernels.swiglu.kernel import swiglu
from fastdllm_kernels.swiglu.reference import swiglu_ref

HEADS = {"7B": (28, 4, 3584, 18944), "1.5B": (12, 2, 1536, 8960)}


def _record(benchmark, **fields):
    record("bench_ops", **fields, median_ms=benchmark.stats.stats.median * 1e3,
           iqr_ms=benchmark.stats.stats.iqr * 1e3, timing="host clock, synchronised per call",
           command="python -m pytest bench/test_bench_ops.py")


@pytest.mark.parametrize("provider", ["ours", "sdpa_mask"])
@pytest.mark.parametrize("queries", [32, 8])
@pytest.mark.parametrize("prefix", [2048, 8192])
@pytest.mark.parametrize("model", ["7B", "1.5B"])
def test_decode_attention(timed, benchmark, model, prefix, queries, provider):
    hq, hkv, _, _ = HEADS[model]
    D = 128
    q, pk, pv, bk, bv, meta = decode_attention_inputs(hq, hkv, prefix, queries, D)
    if provider == "ours":
        fn = lambda: decode_attention(q, pk, pv, bk, bv, *meta, n_q=queries, scale=D ** -0.5)  # noqa: E731
    else:
        kk, vv = torch.cat([pk[:, :, :prefix], bk], 2), torch.cat([pv[:, :, :prefix], bv], 2)
        qq, mask = q.transpose(0, 1)[None], torch.ones(1, 1, queries, prefix + 32, dtype=torch.bool, device=DEVICE)
        fn = lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)  # noqa: E731
    timed(fn)
    _record(benchmark, op="decode_attention", model=model, prefix=prefix, queries=queries, provider=provider)


@pytest.mark.parametrize("provider", ["ours", "torch"])
@pytest.mark.parametrize("tokens", [1, 32])
@pytest.mark.parametrize("op", ["add_rms_norm", "swiglu"])
def test_fused_elementwise(timed, benchmark, op, tokens, provider):
    _, _, hidden, inter = HEADS["7B"]
    dt = torch.bfloat16
    if op == "add_rms_norm":
        x, res = torch.randn(tokens, hidden, device=DEVICE, dtype=dt), torch.randn(tokens, hidden, device=DEVICE, dtype=dt)
        w = torch.ones(hidden, device=DEVICE, dtype=dt)
        fn = (lambda: add_rms_norm(x, res, w, 1e-6)) if provider == "ours" else (lambda: add_rms_norm_ref(x, res, w, 1e-6))
    else:
        gu = torch.randn(tokens, 2 * inter, device=DEVICE, dtype=dt)
        fn = (lambda: swiglu(gu)) if provider == "ours" else (lambda: swiglu_ref(gu))
    timed(fn)
    _record(benchmark, op=op, model="7B", tokens=tokens, provider=provider)


@pytest.mark.parametrize("provider", ["ours", "cublas_unfused"])
@pytest.mark.parametrize("tokens", [8, 32])
@pytest.mark.parametrize("projection", ["gate_up", "down"])
def test_decode_linear(timed, benchmark, projection, tokens, provider):
    """The 7B MLP projections at a step's token counts: ``linear`` as the runtime dispatches it (tuned.json)
    against the cuBLAS sequence (RMSNorm, matmul, SwiGLU / residual add as separate kernels)."""
    from fastdllm_kernels.linear.dispatch import linear

    _, _, hidden, inter = HEADS["7B"]
    dt = torch.bfloat16
    if projection == "gate_up":
        w, x = torch.randn(2 * inter, hidden, device=DEVICE, dtype=dt) * 0.02, torch.randn(tokens, hidden, device=DEVICE, dtype=dt)
        # ours: the norm's gain folded into the weight (the triton backend's layout); cuBLAS: the RMSNorm kernel
        kw = dict(row_rms=True, swiglu=True) if provider == "ours" else \
            dict(norm_weight=torch.ones(hidden, device=DEVICE, dtype=dt), swiglu=True)
    else:
        w, x = torch.randn(hidden, inter, device=DEVICE, dtype=dt) * 0.02, torch.randn(tokens, inter, device=DEVICE, dtype=dt)
        kw = dict(residual=torch.randn(tokens, hidden, device=DEVICE, dtype=dt))
    strategy = None if provider == "ours" else "cublas"
    timed(lambda: linear(x, w, strategy=strategy, **kw))
    _record(benchmark, op=f"linear_{projection}", model="7B", tokens=tokens, provider=provider,
            weight_bytes=w.numel() * 2)
