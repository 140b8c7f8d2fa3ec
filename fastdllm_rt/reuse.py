"""Layer-output reuse (docs/design.md, Reuse policy): which layers a sub-block step may skip, and what a
skipped layer returns.

``ReusePolicy`` is the user's description, validated on construction. ``resolve_policy`` turns it into a
``ReusePlan`` for one model, once per call, before any model work (``None``: compute everything).
``ReuseRuntime`` applies the plan inside the forward: ``skips`` says whether a layer belongs to the set,
``replay`` produces a skipped layer's output from the reuse cache, ``record`` refreshes that cache from every
computed FULL / SUB row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import PolicyError

NAMED_SUBSETS = ("first", "middle", "last")
MODES = ("output", "delta")


@dataclass(frozen=True)
class ReusePolicy:
    """``layers``: ``first`` / ``middle`` / ``last`` (``subset_size`` layers, default 12), an explicit list
    (``[8, 9, 10]``) or a string (``"8-19"``, ``"1,3,5"``); ``k``: on sub-block step s a layer of the set is
    skipped when ``s % k != 0``; ``mode``: ``output`` (return the cached output, the original experiment) or
    ``delta`` (add the cached residual contribution to the fresh input)."""
    layers: object = "first"
    k: int = 2
    mode: str = "output"
    subset_size: int = 12

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise PolicyError(f"reuse k must be an integer >= 1 (1 = compute every step), got {self.k!r}")
        if self.mode not in MODES:
            raise PolicyError(f"reuse mode {self.mode!r} is unknown; choose one of {MODES}")
        if not isinstance(self.subset_size, int) or self.subset_size < 1:
            raise PolicyError(f"subset_size must be a positive integer, got {self.subset_size!r}")
        if isinstance(self.layers, str) and self.layers not in NAMED_SUBSETS:
            _parse_layer_string(self.layers)  # raises with the fix

    @property
    def active(self) -> bool:
        return self.k > 1

    def resolve(self, num_layers: int) -> tuple[int, ...]:
        """The sorted layer indices for an ``num_layers``-layer model (docs/design.md, Reuse policy)."""
        S, L = self.subset_size, num_layers
        if isinstance(self.layers, str) and self.layers in NAMED_SUBSETS:
            if S > L:
                raise PolicyError(f"subset_size {S} is larger than the model's {L} layers; choose <= {L}")
            if self.layers == "first":
                ids = range(1, S + 1)
            elif self.layers == "middle":
                lo = max(0, L // 2 - S // 2)
                ids = range(lo, lo + S)
            else:
                ids = range(L - S, L)
        elif isinstance(self.layers, str):
            ids = _parse_layer_string(self.layers)
        else:
            try:
                ids = [int(i) for i in self.layers]
            except (TypeError, ValueError):
                raise PolicyError(f"reuse layers {self.layers!r} are neither a named subset {NAMED_SUBSETS} nor "
                                  f"a list of layer indices") from None
        ids = sorted(set(ids))
        bad = [i for i in ids if not 0 <= i < L]
        if bad:
            raise PolicyError(f"reuse layers {bad} do not exist in this {L}-layer model (valid: 0..{L - 1}); "
                              f"fix the layer list or subset_size")
        if not ids:
            raise PolicyError("the reuse layer set is empty; name at least one layer or use k=1")
        return tuple(ids)

    def describe(self, num_layers: int) -> dict:
        ids = self.resolve(num_layers)
        return {"layers": self.layers if isinstance(self.layers, str) else list(ids), "resolved": list(ids),
                "k": self.k, "mode": self.mode, "subset_size": self.subset_size}

    @classmethod
    def from_args(cls, k, layer_subset="first", mode="output", subset_size=12) -> "ReusePolicy | None":
        """Build from string-ish CLI/model_args values; ``None`` when k == 1 (no reuse)."""
        k = int(k)
        if isinstance(layer_subset, str) and layer_subset.startswith("[") and layer_subset.endswith("]"):
            layer_subset = layer_subset[1:-1]
        policy = cls(layers=layer_subset, k=k, mode=mode, subset_size=int(subset_size))
        return policy if policy.active else None


def _parse_layer_string(text: str) -> list[int]:
    ids: list[int] = []
    for part in re.split(r"[,\s;|]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise PolicyError(f"layer range {part!r} runs backwards; write it as {hi}-{lo}")
            ids.extend(range(lo, hi + 1))
        elif part.isdigit():
            ids.append(int(part))
        else:
            raise PolicyError(f"reuse layers {text!r} are not understood: use a named subset {NAMED_SUBSETS}, "
                              f"a range such as '8-19', or a list such as '1,3,5'")
    return ids


@dataclass(frozen=True)
class ReusePlan:
    """A policy resolved for one model: the layer set, the schedule and the mode."""
    policy: ReusePolicy
    layers: tuple[int, ...]

    @property
    def k(self) -> int:
        return self.policy.k

    @property
    def mode(self) -> str:
        return self.policy.mode

    def skips_step(self, step: int) -> bool:
        """Whether a sub-block forward at ``step`` of its block skips the layer set."""
        return step % self.policy.k != 0


def resolve_policy(policy, num_layers: int, use_block_cache: bool) -> ReusePlan | None:
    """The plan a call runs, checked before any model work; None for no policy or k == 1 (the same thing)."""
    if policy is None:
        return None
    if not isinstance(policy, ReusePolicy):
        raise PolicyError(f"reuse must be a fastdllm_rt.ReusePolicy or None, got {type(policy).__name__}")
    layers = policy.resolve(num_layers)
    if not policy.active:
        return None
    if not use_block_cache:
        raise PolicyError(f"reuse with k={policy.k} needs use_block_cache=True: layers are only skipped on "
                          f"sub-block steps, which exist only with the block cache")
    return ReusePlan(policy, layers)


class ReuseRuntime:
    """A plan bound to one set of caches for the duration of a call."""

    def __init__(self, plan: ReusePlan, caches):
        self.plan = plan
        self.mode = plan.mode
        self.layers = frozenset(plan.layers)
        self.caches = caches

    def skips(self, layer: int) -> bool:
        return layer in self.layers

    def replay(self, layer: int, x_in: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        cached = self.caches.reuse[layer][slots, offsets]
        return cached if self.mode == "output" else x_in + cached

    def record(self, layer: int, x_in, x_out, slots, offsets) -> None:
        if layer not in self.layers:
            return
        value = x_out if self.mode == "output" else x_out - x_in
        self.caches.reuse[layer][slots, offsets] = value
