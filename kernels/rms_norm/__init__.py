"""rms_norm: `kernel.py` (Triton) and `reference.py` (PyTorch)."""
