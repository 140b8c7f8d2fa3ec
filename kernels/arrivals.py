"""Arrival counters for kernels whose last-arriving program finishes a shared reduction (split-K in the decode
linear, the split merge in decode attention): each program that wrote its part bumps its tile's counter, the one
that sees ``parts - 1`` reduces all parts and sets the counter back to zero, so the next call - or CUDA-graph
replay - starts clean without a memset.

One buffer per device, shared by those kernels: they run one after another on one stream (a kernel launched
with programmatic dependent launch touches the counters only after waiting for its predecessor), and every
tile's counter is zero again when its kernel ends. Allocated by the first call, which must not be inside a
CUDA-graph capture (the runtime runs every step once eagerly before capturing it)."""
from __future__ import annotations

import torch

MAX_TILES = 1 << 16
COUNTERS: dict = {}


def arrival_counters(device: torch.device, who: str) -> torch.Tensor:
    """``MAX_TILES`` int32 counters on ``device``, zero between calls; ``who`` names the caller in the error."""
    key = (device.type, device.index)
    c = COUNTERS.get(key)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{who}: run one eager call before capturing a CUDA graph "
                               "(its arrival counters must outlive the graph)")
        c = COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return c
