"""``l2_prefetch`` asks the L2 for bytes and changes nothing: whole chunks only, never past the tensor, nothing
off Hopper or in the interpreter; on a Hopper GPU it runs inside a CUDA graph and leaves every value as it was."""
import pytest
import torch

from fastdllm_kernels.prefetch.kernel import CHUNK, l2_prefetch, prefetch_span, supported

from .conftest import DEVICE


def test_the_span_is_whole_chunks_within_the_tensor():
    w = torch.zeros(3 * CHUNK // 2 + 10, dtype=torch.bfloat16)          # 3 chunks and 20 bytes
    assert prefetch_span(w, 10 ** 9) == 3 * CHUNK
    assert prefetch_span(w, 2 * CHUNK + 5) == 2 * CHUNK
    assert prefetch_span(w, CHUNK - 1) == 0


def test_nothing_is_asked_where_the_hardware_cannot():
    w = torch.ones(4 * CHUNK, dtype=torch.float16, device=DEVICE)
    if not supported(w.device):
        assert l2_prefetch(w, 10 ** 9) == 0
    assert supported(torch.device("cpu")) is False


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="the bulk L2 prefetch needs a Hopper GPU (compute capability 9.0)")
def test_prefetch_in_a_graph_changes_no_value():
    w = torch.randn(5 * CHUNK + 3, device="cuda", dtype=torch.bfloat16)
    before = w.clone()
    assert l2_prefetch(w, 10 ** 9) == 10 * CHUNK                          # bf16: 10 whole chunks of bytes
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        l2_prefetch(w, 10 ** 9)
        y = w * 2
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(w, before) and torch.equal(y, before * 2)
