"""Counting the model's forwards: from outside, through a PyTorch forward pre-hook, and as the original code
counts them."""
import contextlib


@contextlib.contextmanager
def counting_forwards(model):
    """Yields a list that grows by one entry per call of ``model.forward`` while the block runs."""
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def as_original_counts(stats) -> dict:
    """A generation's forwards by kind as the original counts them: the prompt's prefill is a commit-kind
    forward. With the prefix cache on (the default) a prompt whose whole blocks an earlier call computed is
    served without a prefill forward: that served prefill stands for the original's one."""
    f = stats.forwards
    prefill = f["prefill"] or (1 if stats.prefix_tokens_served else 0)
    return {"commit": prefill + f["commit"], "full_block": f["full_block"], "sub_block": f["sub_block"]}
