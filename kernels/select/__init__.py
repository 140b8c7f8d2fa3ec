"""select: `kernel.py` (Triton) and `reference.py` (PyTorch)."""
