"""Held-out accuracy of a model being trained, through the runtime's own sampler and scorer."""
from __future__ import annotations

from ..model import FastDLLM
from ..tokenizer import Tokenizer
from .synthetic import split


def evaluate(model: FastDLLM, tok: Tokenizer, n: int, seed: int = 1) -> dict:
    """Held-out accuracy of the model as it stands (greedy, threshold 0.9, block cache on)."""
    from ..config import resolve_token_ids
    from ..runtime import Runtime

    model.eval()
    rt = Runtime(model, tokenizer=tok, token_ids=resolve_token_ids(model.config, tok), folder="(training)",
                 backend="torch")
    arith = split("arith", seed, n, held_out=True)
    out = rt.generate([tok.encode(e["prompt"]) for e in arith], max_new_tokens=48, threshold=0.9,
                      stop_strings=["\n\n", "Question:"])
    correct = sum(text.strip().split("####")[-1].strip() == e["target"] for text, e in zip(out.texts, arith))
    mc = split("mc_letter", seed, n, held_out=True)
    letters = [tok.encode(" " + c)[0] for c in "ABCD"]
    res = rt.score([(tok.encode(e["prompt"]), [letters[k]]) for e in mc for k in range(4)])
    ll = res.loglikelihoods
    mc_correct = sum(max(range(4), key=lambda k: ll[4 * i + k]) == e["gold"] for i, e in enumerate(mc))
    model.train()
    return {"arith_exact_match": correct / n, "mc_letter_acc": mc_correct / n, "examples": n,
            "arith_tokens_per_forward": out.stats.tokens_generated / max(out.stats.total_row_forwards, 1)}
