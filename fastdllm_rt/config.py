"""Frozen configuration records: the checkpoint's and each call's.

``ModelConfig`` holds what the transformer needs, read from ``config.json`` (whose name for the block size is
``bd_size``); ``TokenIds`` holds the three special ids the algorithms use (mask, stop, pad). Fields the
checkpoint states are never re-derived; a field it omits gets the Qwen2 default, and anything we cannot run
raises ``ConfigError`` naming the field and the fix. ``DecodeConfig`` and ``ScoreConfig`` hold one sampling or
scoring call's settings, validated on construction; their defaults are written here only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .errors import ConfigError, InputError, PolicyError
from .reuse import ReusePolicy

# The released checkpoints' ids, used when neither tokenizer nor config says.
RELEASED_MASK_ID = 151665
RELEASED_STOP_ID = 151645
RELEASED_PAD_ID = 151643
MASK_TOKEN_TEXT = "|<MASK>|"

SUPPORTED_MODEL_TYPES = ("Fast_dLLM_Qwen", "qwen2")
BLOCK_SIZE = 32          # positions per block (the released models' bd_size)
SUB_BLOCK_SIZE = 8       # positions per sub-block
THRESHOLD = 0.9          # a masked position is unmasked when its confidence is above this
SCORING_MODES = ("trajectory", "first_token")
REVEAL_MODES = ("one", "threshold")

REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bd_size: int = BLOCK_SIZE
    model_type: str = "Fast_dLLM_Qwen"
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "bd_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}; "
                                  f"fix config.json")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads}); GQA needs whole groups")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.bd_size % 8:
            raise ConfigError(f"bd_size must be a multiple of the 8-token sub-block, got {self.bd_size}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; expected one of "
                              f"{SUPPORTED_MODEL_TYPES} (a Fast-dLLM v2 or plain Qwen2 checkpoint)")
        missing = [f for f in REQUIRED_FIELDS if f not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}; the released checkpoints state "
                              f"them, so the file is incomplete or not a Qwen2-family config")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported; Fast-dLLM v2 checkpoints "
                              f"use full attention in every layer")
        rope_theta, rope_type = _rope_fields(raw, source)
        if rope_type not in (None, "default"):
            raise ConfigError(f"{source}: RoPE scaling {rope_type!r} is not supported; the released checkpoints "
                              f"use default RoPE (rope_scaling null)")
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if raw["hidden_size"] % heads:
                raise ConfigError(f"{source}: hidden_size {raw['hidden_size']} is not divisible by "
                                  f"num_attention_heads {heads} and no head_dim is given")
            head_dim = raw["hidden_size"] // heads
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bd_size=raw.get("bd_size", BLOCK_SIZE),
            model_type=model_type,
            eos_token_id=_first_id(raw.get("eos_token_id")),
            pad_token_id=_first_id(raw.get("pad_token_id")),
            bos_token_id=_first_id(raw.get("bos_token_id")),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json at {path}; point `model` at a checkpoint folder that has one")
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
        return cls.from_dict(raw, source=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_parameters(self) -> int:
        """Parameter count of the model this config describes (tied head counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + q + 2 * (d * kv + kv) + q * d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head


def _rope_fields(raw: dict, source: str):
    """rope_theta and rope type, from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type")
    if scaling and rope_type is None:
        raise ConfigError(f"{source}: rope_scaling {scaling!r} has no type; only default RoPE is supported")
    return theta, rope_type


def _first_id(value):
    if isinstance(value, list):
        return value[0] if value else None
    return value


@dataclass(frozen=True)
class TokenIds:
    """The ids the algorithms need. ``mask``: the diffusion mask; ``stop``: ends a generation; ``pad``: what a
    finished row is blanked with in the original code (we never return padding, but keep it for parity)."""
    mask: int
    stop: int
    pad: int

    def validate(self, vocab_size: int) -> None:
        for name in ("mask", "stop", "pad"):
            value = getattr(self, name)
            if not 0 <= value < vocab_size:
                raise ConfigError(f"{name} token id {value} is outside the model's vocabulary (0..{vocab_size - 1}); "
                                  f"pass {name}_token_id= to fastdllm_rt.load, or ship a tokenizer that defines it")
        if self.mask == self.stop:
            raise ConfigError(f"mask and stop token ids are both {self.mask}; they must differ")


def resolve_token_ids(config: ModelConfig, tokenizer=None, *, mask=None, stop=None, pad=None) -> TokenIds:
    """Caller overrides win; then the tokenizer (its ``|<MASK>|`` token, eos, pad); then config.json; then the
    released values."""
    tok_mask = tok_stop = tok_pad = None
    if tokenizer is not None:
        tok_mask = tokenizer.token_to_id(MASK_TOKEN_TEXT)
        tok_stop = tokenizer.eos_token_id
        tok_pad = tokenizer.pad_token_id
    ids = TokenIds(
        mask=_pick(mask, tok_mask, RELEASED_MASK_ID),
        stop=_pick(stop, config.eos_token_id, tok_stop, RELEASED_STOP_ID),
        pad=_pick(pad, tok_pad, config.pad_token_id, RELEASED_PAD_ID),
    )
    ids.validate(config.vocab_size)
    return ids


def _pick(*candidates):
    for c in candidates:
        if c is not None:
            return int(c)
    raise AssertionError("unreachable: the last candidate is a constant")


def _check_steps(threshold, block_size, sub_block_size) -> None:
    if not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"threshold must lie in [0, 1], got {threshold}")
    if not isinstance(sub_block_size, int) or sub_block_size < 1 or block_size % sub_block_size:
        raise ConfigError(f"sub-block size (small_block_size) {sub_block_size!r} must be a positive divisor of "
                          f"the block size {block_size}")


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive integer or None (as many as fit), got {batch_size!r}")


@dataclass(frozen=True)
class DecodeConfig:
    """One generation call. ``reuse``: a ``ReusePolicy`` (None or k=1: compute every layer); ``early_exit``:
    leave a block as soon as every token that will be returned is decoded; ``batch_size``: rows in flight
    (None: all); ``temperature`` / ``top_p``: one value or one per prompt."""
    max_new_tokens: int
    threshold: float = THRESHOLD
    block_size: int = BLOCK_SIZE
    sub_block_size: int = SUB_BLOCK_SIZE
    use_block_cache: bool = True
    temperature: object = 0.0
    top_p: object = 1.0
    reuse: ReusePolicy | None = None
    stop_strings: tuple = ()
    early_exit: bool = False
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check_steps(self.threshold, self.block_size, self.sub_block_size)
        _check_batch_size(self.batch_size)
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "stop_strings", tuple(s for s in (self.stop_strings or ()) if s))


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring call. ``scoring``: ``trajectory`` (the sampler's steps replayed with the answer known) or
    ``first_token`` (the original evaluation); ``reveal``: ``one`` token per step, or also every later one above
    ``threshold``; ``batch_size``: requests per chunk (None: as many as memory allows)."""
    scoring: str = "trajectory"
    reveal: str = "one"
    threshold: float = THRESHOLD
    block_size: int = BLOCK_SIZE
    sub_block_size: int = SUB_BLOCK_SIZE
    use_block_cache: bool = True
    reuse: ReusePolicy | None = None
    batch_size: int | None = None

    def __post_init__(self):
        if self.scoring not in SCORING_MODES:
            raise ConfigError(f"scoring={self.scoring!r} is unknown; choose one of {SCORING_MODES}")
        if self.reveal not in REVEAL_MODES:
            raise ConfigError(f"reveal={self.reveal!r} is unknown; choose one of {REVEAL_MODES}")
        _check_steps(self.threshold, self.block_size, self.sub_block_size)
        _check_batch_size(self.batch_size)
        if self.scoring == "first_token" and isinstance(self.reuse, ReusePolicy) and self.reuse.active:
            raise PolicyError("first_token scoring is one plain forward with no denoising steps, so a reuse "
                              "policy cannot act on it; use scoring='trajectory' to study reuse")
        object.__setattr__(self, "threshold", float(self.threshold))
