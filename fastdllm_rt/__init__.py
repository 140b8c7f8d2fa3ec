"""fastdllm_rt: our own runtime for Fast-dLLM v2 block-diffusion language models.

    rt = fastdllm_rt.load("Efficient-Large-Model/Fast_dLLM_v2_7B")      # or a local folder
    out = rt.generate([ids], max_new_tokens=256)                        # block-diffusion sampling
    res = rt.score([(context_ids, continuation_ids)])                   # trajectory log-likelihood
    rt.generate([ids], max_new_tokens=256, reuse=fastdllm_rt.ReusePolicy("first", k=2))
"""
from .config import DecodeConfig, ModelConfig, ScoreConfig, TokenIds
from .errors import (CheckpointError, ConfigError, FastDLLMError, HubError, InputError, NumericsError,
                     PolicyError)
from .loader import build_model, from_state_dict, load
from .reuse import ReusePolicy
from .runtime import Runtime

__version__ = "0.1.0"

__all__ = ["load", "from_state_dict", "build_model", "Runtime", "ReusePolicy", "DecodeConfig", "ScoreConfig",
           "ModelConfig", "TokenIds", "FastDLLMError",
           "ConfigError", "CheckpointError", "HubError", "InputError", "PolicyError", "NumericsError",
           "small_model_path", "__version__"]


def small_model_path() -> str:
    """The shipped small Fast-dLLM-v2-style model (28 layers), trained here; see fastdllm_rt/small_model."""
    import os

    return os.path.join(os.path.dirname(__file__), "small_model")
