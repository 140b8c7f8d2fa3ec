"""``fastdllm_rt.load``: checkpoint folder or hub id -> a ready ``Runtime``."""
from __future__ import annotations

import os

import torch

from .config import ModelConfig, resolve_token_ids
from .errors import ConfigError
from .hub import resolve_checkpoint
from .backend import BACKENDS, make_backend
from .model import FastDLLM, fold_norm_gains
from .tokenizer import load_tokenizer
from .weights import load_into, load_state_dict_into

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def pick_device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was requested but CUDA is not available here; pass device='cpu'")
    return device


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    """Caller's choice, else bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose bf16, fp16 or fp32") from None


def triton_unsupported(config: ModelConfig) -> str | None:
    """Why the Triton kernels cannot run this model's shapes, or None. Their matmuls (``tl.dot``) contract
    over at least 16 elements, and the attention kernels take a power-of-two head dimension."""
    hd = config.head_dim
    if hd < 16 or hd & (hd - 1):
        return f"head_dim {hd} (the Triton kernels need a power of two >= 16)"
    if min(config.hidden_size, config.intermediate_size) < 16:
        return f"hidden_size {config.hidden_size} / intermediate_size {config.intermediate_size} (the Triton " \
               f"kernels need >= 16)"
    return None


def pick_backend(backend, device: torch.device, config: ModelConfig | None = None) -> str:
    """The caller's backend, else ``triton`` on a GPU when the kernels support the model's shapes (``torch``
    otherwise: a tiny test model's 8-wide heads run there, not as a Triton compile error)."""
    reason = triton_unsupported(config) if config is not None else None
    if backend is None or backend == "auto":
        return "triton" if device.type == "cuda" and reason is None else "torch"
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is unknown; choose one of {BACKENDS}")
    if backend == "triton" and reason is not None:
        raise ConfigError(f"backend='triton' cannot run this model: {reason}; use backend='torch'")
    return backend


def build_model(config: ModelConfig, backend: str = "torch", device="cpu") -> FastDLLM:
    """An unmaterialised model on the meta device (parameter counting, loading)."""
    with torch.device("meta"):
        return FastDLLM(config, make_backend(backend, torch.device(device)))


def ready(net: FastDLLM) -> None:
    """Inference mode, no gradients, and the weight layout the backend runs (folded norm gains for triton)."""
    net.eval()
    net.requires_grad_(False)
    if net.backend.folds_norm_gains:
        fold_norm_gains(net)


def load(model, *, dtype=None, device=None, backend=None, mask_token_id=None, stop_token_id=None,
         pad_token_id=None, revision=None, prefix_cache=True, prefix_cache_bytes=None):
    """Load a Fast-dLLM v2 (or plain Qwen2) checkpoint into our own model code.

    ``model``: a local folder or a hub id (e.g. ``Efficient-Large-Model/Fast_dLLM_v2_7B``). Token ids come from
    the checkpoint's tokenizer and config, with the released values as fallback; pass them to override.
    ``prefix_cache``: keep whole context blocks' K/V across requests (docs/design.md, Prefix cache), within
    ``prefix_cache_bytes`` (default: a fraction of the free memory)."""
    from .runtime import Runtime

    folder = resolve_checkpoint(model, revision=revision)
    config = ModelConfig.from_file(folder)
    tokenizer = load_tokenizer(folder)
    token_ids = resolve_token_ids(config, tokenizer, mask=mask_token_id, stop=stop_token_id, pad=pad_token_id)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    backend = pick_backend(backend, device, config)
    net = build_model(config, backend, device)
    load_into(net, folder, dtype, device)
    ready(net)
    return Runtime(net, tokenizer=tokenizer, token_ids=token_ids, folder=os.path.abspath(folder), backend=backend,
                   prefix_cache=prefix_cache, prefix_cache_bytes=prefix_cache_bytes)


def from_state_dict(config, state_dict, *, tokenizer=None, dtype=None, device=None, backend=None,
                    mask_token_id=None, stop_token_id=None, pad_token_id=None, prefix_cache=True,
                    prefix_cache_bytes=None):
    """A ``Runtime`` from an in-memory state dict with the checkpoint's HF names (benchmarks, training)."""
    from .runtime import Runtime

    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    token_ids = resolve_token_ids(config, tokenizer, mask=mask_token_id, stop=stop_token_id, pad=pad_token_id)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    backend = pick_backend(backend, device, config)
    net = build_model(config, backend, device)
    load_state_dict_into(net, state_dict, dtype, device)
    ready(net)
    return Runtime(net, tokenizer=tokenizer, token_ids=token_ids, folder="(state dict)", backend=backend,
                   prefix_cache=prefix_cache, prefix_cache_bytes=prefix_cache_bytes)
