"""Errors a user can act on: each message names the cause and the fix, in one line."""


class FastDLLMError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(FastDLLMError, ValueError):
    """config.json or a caller's argument describes something we cannot run."""


class CheckpointError(FastDLLMError):
    """The weights do not match the config: missing, unexpected or wrongly shaped tensors."""


class HubError(FastDLLMError):
    """A hub id could not be resolved to local files (offline, gated, unknown repository)."""


class InputError(FastDLLMError, ValueError):
    """A request the algorithms cannot serve: empty, over-long, or out-of-vocabulary tokens."""


class PolicyError(FastDLLMError, ValueError):
    """A reuse policy that names layers the model lacks, or a schedule that cannot apply."""


class NumericsError(FastDLLMError, FloatingPointError):
    """The model produced non-finite logits."""
