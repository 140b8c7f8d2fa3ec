"""SwiGLU on the fused gate/up projection: ``silu(gate) * up``, in the activation dtype as HF computes it."""
import torch
import torch.nn.functional as F


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2F] with gate in the first half, up in the second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
