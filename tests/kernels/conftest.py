"""Kernel tests run the Triton interpreter on CPU (TRITON_INTERPRET=1, set before triton is imported) and the
real compiler on a GPU. Outputs allocated by the kernels' wrappers are poisoned with NaN so an unwritten tile
fails the comparison."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter gets bf16 arithmetic wrong: CPU runs fp32/fp16, GPU runs bf16 too.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


def assert_close_tiered(tri, ref32, ref_lowp=None, name="", fp32_tol=1e-4):
    """The two tolerance tiers (CONTRIBUTING.md, "Tolerances"). fp32 inputs (``ref_lowp`` None): assert_close at ``fp32_tol`` (1e-5 elementwise
    ops, 1e-4 with matmuls inside). Low precision: max|tri - ref32| <= 2 max|ref_lowp - ref32| + 1e-5, or
    relative RMS error < 5e-3, where ref_lowp is the PyTorch reference run in that precision."""
    assert not torch.isnan(tri.float()).any(), f"{name}: NaN in the kernel output (unwritten tile?)"
    tri, ref32 = tri.float(), ref32.float()
    if ref_lowp is None:
        torch.testing.assert_close(tri, ref32, rtol=fp32_tol, atol=fp32_tol, msg=name)
        return
    ref_lowp = ref_lowp.float()
    err = (tri - ref32).abs().max().item()
    bound = 2 * (ref_lowp - ref32).abs().max().item() + 1e-5
    rel_rms = ((tri - ref32).norm() / ref32.norm().clamp_min(1e-12)).item()
    assert err <= bound or rel_rms < 5e-3, f"{name}: max|tri-ref32|={err:.3e} bound={bound:.3e} relRMS={rel_rms:.3e}"
