"""Training a small Fast-dLLM-v2-style model: the objective (spec §2.1), a synthetic task family, a tokenizer
builder and a trainer. ``python -m fastdllm_rt.train --help``."""
