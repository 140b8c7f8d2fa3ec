"""SwiGLU on the fused gate/up projection: ``silu(gate) * up``, in the activation dtype as HF computes it."""
import torch
import torch.nn.functional as F


def swiglu_ref(gate_up: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [T, 2F] with gate in the first half, up in the second. ``row_scale`` [T] (fp32): the rows are
    first multiplied by it and rounded to the activation dtype - the projection of an un-normalised input
    whose RMSNorm gain is folded into the weight, scaled by the input row's 1/rms (``row_rstd_ref``)."""
    if row_scale is not None:
        gate_up = (gate_up.float() * row_scale[:, None]).to(gate_up.dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
