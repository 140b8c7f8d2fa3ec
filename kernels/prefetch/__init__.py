"""prefetch: `kernel.py` (Triton; no values, so its reference is doing nothing - see its docstring)."""
