"""A synthetic task family with checkable answers, for the small shipped model.

* ``arith``     GSM8K-style word problems ending in ``#### N`` (generation, exact match);
* ``mc_letter`` MMLU-style multiple choice answered with one letter (`` A`` ... `` D``);
* ``mc_text``   multiple choice whose choices are several tokens long (numbers and words), listed in the
                prompt and scored as continuations;
* ``prose``     short documents for rolling log-likelihood (perplexity).

Every example is a pure function of ``(task, seed, index)``. The held-out split is every example whose
prompt hashes into bucket 0 of 10; training examples come from other buckets only, so no held-out prompt is
ever trained on.
"""
from __future__ import annotations

import hashlib
import random

NAMES = ["Mia", "Liam", "Ava", "Noah", "Emma", "Leo", "Zoe", "Omar", "Ivy", "Ravi", "Nora", "Sam", "Lena", "Tom",
         "Aria", "Ben", "Chloe", "Dan", "Ella", "Finn", "Gia", "Hugo", "Iris", "Jay", "Kira", "Luca", "Maya", "Nia"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "shells", "stamps",
         "beads", "toys", "pens", "cups", "keys", "rocks"]
CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "animal": ["tiger", "horse", "rabbit", "zebra", "camel", "mouse", "eagle", "whale", "sheep", "otter"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "brown", "pink", "gray", "white"],
    "tool": ["hammer", "saw", "wrench", "drill", "shovel", "rake", "chisel", "ladder", "needle", "axe"],
}
LETTERS = "ABCD"
TASKS = ("arith", "mc_letter", "mc_text", "prose", "mc_lookup", "mc_recall")


def _rng(task: str, seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{task}/{seed}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def is_held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] % 10 == 0


def _word_problem(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        q = (f"{name} has {a} {item}. {name} gets {b} more {item}. "
             f"How many {item} does {name} have now?")
        ans = a + b
        sol = f"{name} has {a} + {b} = {ans} {item} now.\n#### {ans}"
    else:
        a, b = max(a, b), min(a, b)
        q = (f"{name} has {a} {item}. {name} gives away {b} {item}. "
             f"How many {item} does {name} have left?")
        ans = a - b
        sol = f"{name} has {a} - {b} = {ans} {item} left.\n#### {ans}"
    return q, sol, ans


def _distractors(rng, answer: int, n: int = 3) -> list[int]:
    pool = {answer + d for d in (1, -1, 10, -10, 2, -2, 11, -9)} | {rng.randint(0, 198) for _ in range(4)}
    pool = sorted(x for x in pool if x >= 0 and x != answer)
    return rng.sample(pool, n)


MC_KINDS = ("largest", "smallest", "category")


def _mc_question(rng, kinds=MC_KINDS):
    """(question, options, correct option index). Multiple choice asks what one step of reading decides
    (compare four numbers, recognise a category); arithmetic is the generation task's job."""
    kind = rng.choice(kinds)
    if kind in ("sum", "diff"):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if kind == "diff":
            a, b = max(a, b), min(a, b)
        ans = a + b if kind == "sum" else a - b
        opts = [ans] + _distractors(rng, ans)
        q = f"What is {a} {'+' if kind == 'sum' else '-'} {b}?"
        order = list(range(4))
        rng.shuffle(order)
        return q, [str(opts[i]) for i in order], order.index(0)
    if kind in ("largest", "smallest"):
        nums = rng.sample(range(10, 100), 4)
        target = max(nums) if kind == "largest" else min(nums)
        return f"Which number is the {kind}?", [str(x) for x in nums], nums.index(target)
    cat = rng.choice(sorted(CATEGORIES))
    right = rng.choice(CATEGORIES[cat])
    others = [rng.choice(CATEGORIES[c]) for c in rng.sample([c for c in CATEGORIES if c != cat], 3)]
    opts = [right] + others
    order = list(range(4))
    rng.shuffle(order)
    article = "an" if cat[0] in "aeiou" else "a"
    return f"Which of these is {article} {cat}?", [opts[i] for i in order], order.index(0)


def make_example(task: str, seed: int, index: int) -> dict:
    """One example as a record: ``prompt`` and ``answer`` (training text) plus task fields for lm-eval."""
    rng = _rng(task, seed, index)
    if task == "arith":
        q, sol, ans = _word_problem(rng)
        prompt = f"Question: {q}\nAnswer:"
        return {"question": q, "answer": sol, "target": str(ans), "prompt": prompt, "response": " " + sol}
    if task == "mc_letter":
        q, opts, gold = _mc_question(rng)
        body = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts))
        prompt = f"Question: {q}\n{body}\nAnswer:"
        return {"question": q, "choices": opts, "gold": gold, "prompt": prompt, "response": " " + LETTERS[gold]}
    if task == "mc_text":
        q, opts, gold = _mc_question(rng)
        prompt = f"Question: {q}\nOptions: {', '.join(opts)}\nAnswer:"
        return {"question": q, "choices": opts, "gold": gold, "prompt": prompt, "response": " " + opts[gold]}
    if task == "mc_lookup":
        # training-only auxiliary skill for mc_letter: find the letter of a given option
        _, opts, gold = _mc_question(rng)
        body = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts))
        prompt = f"{body}\nWhich letter is {opts[gold]}?\nAnswer:"
        return {"choices": opts, "gold": gold, "prompt": prompt, "response": " " + LETTERS[gold]}
    if task == "mc_recall":
        # training-only: the forward direction of the lookup (find "C." and copy what follows), which forms
        # the induction-style attention that the letter lookup needs
        _, opts, _ = _mc_question(rng)
        k = rng.randrange(4)
        body = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts))
        prompt = f"{body}\nWhat is option {LETTERS[k]}?\nAnswer:"
        return {"choices": opts, "gold": k, "prompt": prompt, "response": " " + opts[k]}
    if task == "prose":
        q, sol, _ = _word_problem(rng)
        text = f"{q} {sol.splitlines()[0]}"
        return {"text": text, "prompt": "", "response": text}
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def split(task: str, seed: int, n: int, held_out: bool, start: int = 0) -> list[dict]:
    """The first ``n`` examples of the held-out (or training) split, in a fixed order."""
    out, i = [], start
    while len(out) < n:
        ex = make_example(task, seed, i)
        key = ex["prompt"] or ex["response"]
        if is_held_out(key) == held_out:
            out.append(ex)
        i += 1
    return out


def training_stream(seed: int, weights=None):
    """Endless training examples, tasks mixed by ``weights`` (task -> weight)."""
    weights = weights or {"arith": 4, "mc_letter": 4, "mc_text": 2, "mc_lookup": 3, "mc_recall": 2, "prose": 1}
    rng = random.Random(seed)
    counters = {t: 0 for t in weights}
    tasks, w = list(weights), list(weights.values())
    while True:
        task = rng.choices(tasks, w)[0]
        while True:
            ex = make_example(task, seed, counters[task])
            counters[task] += 1
            if not is_held_out(ex["prompt"] or ex["response"]):
                break
        yield ex
