"""Tune the decode-step linears for this GPU and write the winners to ``tuned.json`` beside this file.

For each model shape, token count (8 = sub-block step, 32 = full-block / commit step) and projection as the
triton backend runs it (QKV bare - the RoPE kernel applies its input's 1/rms and the bias; O with residual;
gate/up with the row's 1/rms, its norm gain folded into the weight, + SwiGLU; down with residual; LM head with
RMSNorm and fp32 output), every strategy (``configs.py``) with every candidate tiling and K split is timed as a
CUDA graph of 20 calls. The calls cycle through copies of the weight that together exceed the L2 three times
over, so each call reads its weight from HBM as in a real step (a 33 MB weight would otherwise stay in a 50 MB
L2 and time faster than the HBM floor). ``qkv_rope`` times the QKV projection with the RoPE kernel's work in its
epilogue (``qkv_rope.py``) against the separate path (``linear``, then the RoPE kernel).

The fastest strategy and tiling of each shape go to ``tuned.json`` under this GPU's name (the runtime reads it);
``--record FILE`` also appends one JSON line per shape with each strategy's best time, cuBLAS's bare matmul, and
the floor (weight bytes at the measured copy bandwidth), naming card, versions, commit, date and command.

    python -m fastdllm_kernels.linear.sweep [--shapes 7B,1.5B | --config path/to/config.json] [--tokens 8,32]
        [--projections qkv,o,gate_up,down,head,qkv_rope] [--no-write] [--no-swap-ab] [--record FILE]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton

from fastdllm_kernels.linear import configs
from fastdllm_kernels.linear.configs import LinearConfig, m_bucket, qkv_rope_key, shape_key
from fastdllm_kernels.linear.dispatch import linear
from fastdllm_kernels.linear.reference import fused_linear_ref
from fastdllm_kernels.timing import append_record, copies_beyond_l2, copy_bandwidth_gbs, graph_time

# the released Fast-dLLM v2 models' projection sizes
SHAPES = {"7B": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                     vocab_size=152064, rope_theta=1e6),
          "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                       vocab_size=151936, rope_theta=1e6)}


def projections(f: dict) -> dict:
    d, inter, V = f["hidden_size"], f["intermediate_size"], f["vocab_size"]
    hd = d // f["num_attention_heads"]
    q, kv = f["num_attention_heads"] * hd, f["num_key_value_heads"] * hd
    return {"qkv": dict(N=q + 2 * kv, K=d), "qkv_rope": dict(N=q + 2 * kv, K=d), "o": dict(N=d, K=q, residual=True),
            "gate_up": dict(N=inter, K=d, row_rms=True, swiglu=True), "down": dict(N=d, K=inter, residual=True),
            "head": dict(N=V, K=d, norm=True, fp32=True)}


def candidates(M: int, N: int, K: int, swiglu: bool, num_sms: int, swap_ab: bool = False):
    """Tilings and K splits to time; ``swap_ab`` adds each tiling of 64 or more weight rows with the weight
    tile as the MMA's left operand (Hopper's asynchronous warpgroup MMA then reads it from shared memory)."""
    bm = m_bucket(M)
    for bn, bk in ((32, 256), (64, 128), (64, 256), (128, 64), (128, 128), (128, 256), (256, 64), (256, 128)):
        stage_bytes = (bn * (2 if swiglu else 1) + bm) * bk * 2
        stages = max(2, min(6, (128 << 10) // stage_bytes))
        if stages * stage_bytes > (200 << 10):
            continue
        warps = 8 if bn * bk * (2 if swiglu else 1) >= 128 * 256 else 4
        tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
        for split in (1, 2, 3, 4, 6, 8, 12, 16):
            if split > 1 and (K // split < 2 * bk or tiles * split > 16 * num_sms
                              or (tiles * split < num_sms // 2 and split < 16)):
                continue
            yield LinearConfig(bm, bn, bk, split, warps, stages)
            if swap_ab and bn >= 64:
                yield LinearConfig(bm, bn, bk, split, warps, stages, swap_ab=True)


def qkv_rope_candidates(M: int, N: int, K: int, head_dim: int, num_sms: int):
    """Tilings of the fused QKV + RoPE kernel: BLOCK_N column pairs (2 BLOCK_N weight rows) a program, a divisor
    of half the head width."""
    bm = m_bucket(M)
    for bn in (16, 32, 64):
        if (head_dim // 2) % bn:
            continue
        for bk in (64, 128, 256):
            stage_bytes = (2 * bn + bm) * bk * 2
            stages = max(2, min(6, (128 << 10) // stage_bytes))
            tiles = N // (2 * bn) * triton.cdiv(M, bm)
            for split in (1, 2, 3, 4, 6, 8, 12):
                if split > 1 and (K // split < 2 * bk or tiles * split > 16 * num_sms):
                    continue
                yield LinearConfig(bm, bn, bk, split, 8 if 2 * bn * bk >= 128 * 256 else 4, stages)


class Rotating:
    """Calls ``fn(weight)`` on the next of several weight copies (together > 3x the L2, at most 20)."""

    def __init__(self, w):
        n = copies_beyond_l2(w.numel() * w.element_size(), at_most=20)
        self.ws = [w] + [w.clone() for _ in range(n - 1)]
        self.i = 0

    def __call__(self, fn):
        self.i = (self.i + 1) % len(self.ws)
        return fn(self.ws[self.i])


def fastest(fns: dict) -> dict:
    """{label: (ms, config)} of the fastest config per label; ``fns`` maps (label, config) to a call. A tiling
    this GPU cannot run (shared memory) is skipped."""
    best = {}
    for (label, cfg), fn in fns.items():
        try:
            ms = graph_time(fn, reps=20, iters=10)["p50_ms"]
        except Exception as e:  # noqa: BLE001
            print(f"  skip {label} {cfg}: {type(e).__name__}")
            continue
        if ms < best.get(label, (float("inf"),))[0]:
            best[label] = (ms, cfg)
    return best


def rel_err(got, ref) -> float:
    return float((got.float() - ref).norm() / ref.norm())


def sweep_qkv_rope(f: dict, M: int, rot: Rotating, num_sms: int, g) -> tuple[dict, dict]:
    """Best fused tiling against the separate path at M tokens (block-cache writes at a 2k prefix, as the
    full-block and sub-block steps write); returns (table entry, measurement)."""
    from fastdllm_kernels.linear.qkv_rope import qkv_rope_write
    from fastdllm_kernels.linear.reference import qkv_rope_write_ref
    from fastdllm_kernels.rope.kernel import rope_write
    from fastdllm_kernels.rope.reference import rope_tables

    hq, hkv, K = f["num_attention_heads"], f["num_key_value_heads"], f["hidden_size"]
    D = K // hq
    N = (hq + 2 * hkv) * D
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    b = (0.1 * torch.randn(N, device="cuda", generator=g)).to(torch.bfloat16)
    cos, sin = rope_tables(4096, D, f["rope_theta"], torch.bfloat16, "cuda")
    pos = 2048 + torch.arange(M, device="cuda")
    dest = torch.full((M,), 2, dtype=torch.int32, device="cuda")
    slots = torch.zeros(M, dtype=torch.long, device="cuda")
    caches = [torch.zeros(1, hkv, n, D, device="cuda", dtype=torch.bfloat16) for n in (4096, 4096, 32, 32)]

    def separate(w_):
        q, k, v = linear(x, w_).split([hq * D, hkv * D, hkv * D], dim=-1)
        rope_write(q.view(M, hq, D), k.view(M, hkv, D), v.view(M, hkv, D), cos, sin, pos, dest, slots, *caches,
                   norm_input=x, bias=b, eps=1e-6)

    def fused(cfg):
        return lambda: rot(lambda w_: qkv_rope_write(x, w_, b, 1e-6, hq, hkv, cos, sin, pos, dest, slots,
                                                     *caches, config=cfg))

    fns = {("separate", None): lambda: rot(separate)}
    fns.update({("fused", cfg): fused(cfg) for cfg in qkv_rope_candidates(M, N, K, D, num_sms)})
    best = fastest(fns)
    strategy = min(best, key=lambda k: best[k][0])
    w = rot.ws[0]
    got = qkv_rope_write(x, w, b, 1e-6, hq, hkv, cos, sin, pos, dest, slots, *caches, config=best["fused"][1])
    ref = qkv_rope_write_ref(x.float(), w.float(), b.float(), 1e-6, hq, hkv, cos.float(), sin.float(), pos, dest,
                             slots, *(c.float() for c in caches))
    rel = rel_err(got, ref)
    assert rel < 1e-2, f"qkv_rope M={M}: relative error {rel:.2e} against fp32"
    cfg = best[strategy][1]
    return ({"strategy": strategy, "config": cfg and cfg.to_json()},
            dict(ours_ms=best[strategy][0], strategy=strategy, strategy_ms={k: v[0] for k, v in best.items()},
                 config=cfg and cfg.to_json(), rel_err_vs_fp32=rel))


def sweep_linear(p: dict, M: int, w, rot: Rotating, num_sms: int, swap_ab: bool, g) -> tuple[dict, dict]:
    """The fastest strategy and tiling of one projection at M tokens; returns (table entry, measurement)."""
    N, K, swiglu = p["N"], p["K"], p.get("swiglu", False)
    call = {"swiglu": swiglu, "out_dtype": torch.float32 if p.get("fp32") else None}
    if p.get("norm"):
        call.update(norm_weight=torch.ones(K, device="cuda", dtype=torch.bfloat16), eps=1e-6)
    if p.get("row_rms"):
        call.update(row_rms=True, eps=1e-6)
    if p.get("residual"):
        call["residual"] = torch.randn(M, N, device="cuda", generator=g).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    norm = p.get("norm", False) or p.get("row_rms", False)
    fns = {}
    for strategy in (("fused", "norm_then_fused", "cublas") if norm else ("fused", "cublas")):
        # no swapped operands with the row norm in the kernel's prologue (fused_linear refuses it)
        swap = swap_ab and not (norm and strategy == "fused")
        for cfg in candidates(M, N, K, swiglu, num_sms, swap) if strategy != "cublas" else [None]:
            label = strategy + ("/swap_ab" if cfg is not None and cfg.swap_ab else "")
            fns[(label, cfg)] = (lambda s=strategy, c=cfg: rot(lambda w_: linear(x, w_, strategy=s, config=c,
                                                                                  **call)))
    best = fastest(fns)                  # swapped tilings kept apart, so the record compares them
    label = min(best, key=lambda k: best[k][0])
    best_ms, cfg = best[label]
    strategy = label.split("/")[0]
    ref = fused_linear_ref(x.float(), w.float(), **{k: (v.float() if torch.is_tensor(v) else v)
                                                    for k, v in call.items()})
    rel = rel_err(linear(x, w, strategy=strategy, config=cfg, **call), ref)
    assert rel < 1e-2, f"N={N} K={K} M={M}: relative error {rel:.2e} against fp32"
    return ({"strategy": strategy, "config": cfg and cfg.to_json()},
            dict(ours_ms=best_ms, strategy=strategy, strategy_ms={k: v[0] for k, v in best.items()},
                 config=cfg and cfg.to_json(), candidates=len(fns), rel_err_vs_fp32=rel))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="7B,1.5B", help="released model shapes: " + ", ".join(SHAPES))
    ap.add_argument("--config", help="a checkpoint's config.json to tune instead of --shapes")
    ap.add_argument("--tokens", default="8,32")
    ap.add_argument("--projections", default="qkv,o,gate_up,down,head,qkv_rope")
    ap.add_argument("--no-write", action="store_true", help=f"leave {configs.TUNED_PATH} as it is")
    ap.add_argument("--swap-ab", action=argparse.BooleanOptionalAction, default=None,
                    help="time swapped-operand tilings too (default: on Hopper and newer, whose table entries "
                         "use them; a table swept without them can make a step slower)")
    ap.add_argument("--record", help="append one JSON line per shape to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the sweep times kernels on a GPU")
    if args.swap_ab is None:
        args.swap_ab = torch.cuda.get_device_capability() >= (9, 0)
    command = "python -m fastdllm_kernels.linear.sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    shapes = ({args.config: json.load(open(args.config))} if args.config
              else {s: SHAPES[s] for s in args.shapes.split(",")})
    gpu = torch.cuda.get_device_name()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth_gbs()
    tuned = dict(configs.tuned_table().get(gpu, {}))
    rows = []
    for shape, f in shapes.items():
        for name, p in projections(f).items():
            if name not in args.projections.split(","):
                continue
            N, K, swiglu = p["N"], p["K"], p.get("swiglu", False)
            g = torch.Generator(device="cuda").manual_seed(0)
            w = (torch.randn(2 * N if swiglu else N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
            weight_bytes = w.numel() * 2
            rot = Rotating(w)
            for M in (int(t) for t in args.tokens.split(",")):
                if name == "qkv_rope":
                    entry, m = sweep_qkv_rope(f, M, rot, num_sms, g)
                    tuned[qkv_rope_key(M, N, K)] = entry
                else:
                    entry, m = sweep_linear(p, M, w, rot, num_sms, args.swap_ab, g)
                    tuned[shape_key(M, N, K, swiglu)] = entry
                x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
                cublas = graph_time(lambda: rot(lambda w_: F.linear(x, w_)))["p50_ms"]
                row = dict(model=shape, projection=name, tokens=M, N=N, K=K, weight_bytes=weight_bytes, **m,
                           cublas_matmul_ms=cublas, floor_ms=weight_bytes / (bw * 1e9) * 1e3, copy_GBps=bw,
                           ours_TBps=weight_bytes / m["ours_ms"] / 1e9, command=command)
                rows.append(append_record(args.record, row) if args.record else row)
                print(f"{shape:4} {name:8} M={M:2d} " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in
                                                                  m["strategy_ms"].items())
                      + f"  cublas-matmul {cublas * 1e3:.1f}  floor {row['floor_ms'] * 1e3:.1f} us  {m['config']}",
                      flush=True)
    if not args.no_write:
        table = {**configs.tuned_table(), gpu: dict(sorted(tuned.items()))}
        with open(configs.TUNED_PATH, "w") as fh:
            json.dump(table, fh, indent=1, sort_keys=True)
        configs.tuned_table.cache_clear()
        print(f"wrote {len(tuned)} entries for {gpu} to {configs.TUNED_PATH}")
    print(f"copy bandwidth {bw:.0f} GB/s (read + write) on {gpu}")
    print(f"{'model':5} {'proj':8} {'M':>3} {'ours us':>8} {'strategy':15} {'cuBLAS mm':>9} {'floor us':>8} "
          f"{'x floor':>7}")
    for r in rows:
        print(f"{r['model']:5} {r['projection']:8} {r['tokens']:3d} {r['ours_ms'] * 1e3:8.1f} {r['strategy']:15} "
              f"{r['cublas_matmul_ms'] * 1e3:9.1f} {r['floor_ms'] * 1e3:8.1f} {r['ours_ms'] / r['floor_ms']:7.2f}")


if __name__ == "__main__":
    main()
