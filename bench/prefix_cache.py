"""The prefix cache on lm-eval-shaped few-shot workloads, with the cache on and off in one process (random bf16
weights at the released shapes, random tokens):

(a) MMLU-like 5-shot scoring: ``--subjects`` subjects, each with one shared ~600-token five-example header;
    questions mixed across subjects, each a ~100-token question and four one-token choices. Reports
    questions/s and the fraction of forwarded tokens spent on headers.
(b) GSM8K-like 8-shot generation at ``--gen-batch``: one shared ~900-token header, ~60-token questions,
    ``--new-tokens`` new tokens at threshold 1. Reports tokens/s and the header's share of forwarded tokens.

Both runs warm up on other questions first (compiles kernels and graphs); the cache starts empty for each
measured run, so the first question of a header pays for it. Scores and generations of the two runs are
compared (bf16 on a GPU: reported, not asserted).

    python bench/prefix_cache.py --shape 7B [--questions 570] [--gen-questions 64] [--new-tokens 256]
    python bench/prefix_cache.py --device cpu --shape tiny --layers 2 --questions 24 --gen-questions 4 \\
        --new-tokens 16 --subjects 3        # smoke check
"""
import argparse
import gc
import time

import torch

from common import SHAPES, add_run_args, random_ids, random_state_dict, record, start, sync, token_ids

import fastdllm_rt
from fastdllm_rt.prefix_cache import PrefixCache


def _tokens(g, vocab, n):
    return random_ids(vocab, n, generator=g).tolist()


def _length(g, around):
    """A length drawn uniformly from ``around`` +- 7 %."""
    d = max(1, around // 15)
    return int(torch.randint(around - d, around + d + 1, (1,), generator=g))


def mmlu_like(n_questions, subjects, vocab, header=600, question=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    headers = [_tokens(g, vocab, _length(g, header)) for _ in range(subjects)]
    reqs = []
    for q in range(n_questions):
        ctx = headers[q % subjects] + _tokens(g, vocab, _length(g, question))
        reqs += [(ctx, [c]) for c in _tokens(g, vocab, 4)]
    return reqs, sum(len(h) for h in headers)


def gsm8k_like(n_questions, vocab, header=900, question=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = _tokens(g, vocab, header)
    return [head + _tokens(g, vocab, _length(g, question)) for _ in range(n_questions)]


def header_share(stats):
    """Fraction of forwarded tokens spent prefilling context blocks (headers dominate them)."""
    return stats.prefix_tokens_computed / stats.tokens_forwarded if stats.tokens_forwarded else 0.0


def timed(rt, device, fn):
    rt.prefix_cache = PrefixCache(rt.block_size, None, device) if rt.prefix_cache is not None else None
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7B", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smoke checks)")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--questions", type=int, default=570)
    ap.add_argument("--subjects", type=int, default=57)
    ap.add_argument("--gen-questions", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--header", type=int, default=600, help="tokens of a 5-shot scoring header (+- 7 %%)")
    ap.add_argument("--question", type=int, default=100, help="tokens of a scoring question (+- 7 %%)")
    ap.add_argument("--gen-header", type=int, default=900, help="tokens of the 8-shot generation header")
    ap.add_argument("--gen-question", type=int, default=60, help="tokens of a generation question (+- 7 %%)")
    add_run_args(ap)
    args = ap.parse_args()
    command = start(args, "prefix_cache.py")
    device = torch.device(args.device)
    fields = dict(SHAPES[args.shape])
    if args.layers:
        fields.update(num_hidden_layers=args.layers, max_window_layers=args.layers)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    sd = random_state_dict(fields, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    V = fields["vocab_size"]
    rt = fastdllm_rt.from_state_dict(fields, sd, dtype=dtype, device=str(device), backend=args.backend,
                                     **token_ids(V))
    del sd
    gc.collect()
    rows = []
    # (a) scoring
    reqs, header_tokens = mmlu_like(args.questions, args.subjects, V, args.header, args.question)
    warm, _ = mmlu_like(min(args.questions, 2 * args.subjects), args.subjects, V, args.header, args.question, seed=1)
    results = {}
    for on in (False, True):
        rt.prefix_cache = PrefixCache(rt.block_size, None, device) if on else None
        rt.score(warm, use_block_cache=False)
        res, dt = timed(rt, device, lambda: rt.score(reqs, use_block_cache=False))
        st = res.stats
        results[on] = res.loglikelihoods
        rows.append(record("prefix_cache", workload="mmlu_like_5shot", shape=args.shape, prefix_cache=on,
                           questions=args.questions, subjects=args.subjects, seconds=dt,
                           questions_per_s=args.questions / dt, tokens_forwarded=st.tokens_forwarded,
                           prefix_tokens_computed=st.prefix_tokens_computed,
                           prefix_tokens_served=st.prefix_tokens_served, prefix_evictions=st.prefix_evictions,
                           context_prefill_fraction_of_forwarded=header_share(st),
                           row_forwards=st.row_forwards, command=command))
    diff = max(abs(a - b) for a, b in zip(results[False], results[True]))
    rows[-1]["max_abs_diff_vs_cache_off"] = diff
    # (b) generation
    prompts = gsm8k_like(args.gen_questions, V, args.gen_header, args.gen_question)
    warm_prompts = gsm8k_like(min(args.gen_batch, args.gen_questions), V, args.gen_header, args.gen_question, seed=1)
    gens = {}
    for on in (False, True):
        rt.prefix_cache = PrefixCache(rt.block_size, None, device) if on else None
        kw = dict(max_new_tokens=args.new_tokens, threshold=1.0, batch_size=args.gen_batch, use_block_cache=True)
        rt.generate(warm_prompts, **dict(kw, max_new_tokens=min(args.new_tokens, 32)))
        res, dt = timed(rt, device, lambda: rt.generate(prompts, **kw))
        st = res.stats
        gens[on] = res.tokens
        rows.append(record("prefix_cache", workload="gsm8k_like_8shot", shape=args.shape, prefix_cache=on,
                           questions=args.gen_questions, batch=args.gen_batch, new_tokens=args.new_tokens,
                           seconds=dt, tokens_generated=st.tokens_generated, tokens_per_s=st.tokens_generated / dt,
                           tokens_forwarded=st.tokens_forwarded, prefix_tokens_computed=st.prefix_tokens_computed,
                           prefix_tokens_served=st.prefix_tokens_served,
                           header_fraction_of_forwarded=header_share(st), command=command))
    rows[-1]["same_tokens_as_cache_off"] = gens[False] == gens[True]
    print(f"{'workload':18} {'cache':5} {'rate':>10} {'fwd tokens':>11} {'ctx prefill share':>17} {'served':>9}")
    for r in rows:
        rate = r.get("questions_per_s") or r.get("tokens_per_s")
        unit = "q/s" if "questions_per_s" in r else "tok/s"
        share = r.get("context_prefill_fraction_of_forwarded", r.get("header_fraction_of_forwarded"))
        print(f"{r['workload']:18} {str(r['prefix_cache']):5} {rate:8.1f}{unit:>5} {r['tokens_forwarded']:11d} "
              f"{share:17.3f} {r['prefix_tokens_served']:9d}")
    print(f"scores max |diff| on vs off: {diff:.3g}; generations equal: {gens[False] == gens[True]}")


if __name__ == "__main__":
    main()
