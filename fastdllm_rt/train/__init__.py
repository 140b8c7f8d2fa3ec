"""Training a small Fast-dLLM-v2-style model: the objective, a synthetic task family, a tokenizer
builder and a trainer. ``python -m fastdllm_rt.train --help``."""
