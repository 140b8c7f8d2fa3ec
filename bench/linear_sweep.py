"""Tune ``fused_linear`` at the decode shapes of the released models on this GPU.

For each model, token count (8 = sub-block step, 32 = full-block / commit step) and projection as the triton
backend runs it (QKV bare - the RoPE kernel applies its input's 1/rms and the bias; O with residual; gate/up
with the row's 1/rms, its norm gain folded into the weight, + SwiGLU; down with residual; LM head with
RMSNorm and fp32 output), every strategy (``kernels/linear/configs.py``) with every candidate tiling and K split is timed
as a CUDA graph of 20 calls (launched as the runtime launches them: ordinary launches unless FASTDLLM_PDL=1).
The calls cycle through copies of the weight that together exceed the L2 cache
three times over, so each call reads its weight from HBM as in a real step (a single 33 MB weight would stay
in the 50 MB L2 and time faster than the HBM floor). The fastest strategy and configuration go to
``kernels/linear/tuned.json`` under this GPU's name (the runtime reads it) and to
``bench/results/linear_sweep.jsonl``, with each strategy's best time, cuBLAS's time for the bare matmul (no
norm, no epilogue) and the floor (weight bytes at the measured copy bandwidth).

``qkv_rope`` (not in the default list) times the QKV projection with the RoPE kernel's work in its epilogue
(``kernels/linear/qkv_rope.py``: row scale, bias, rotation, block-cache write) over its candidate tilings
against the separate path the runtime otherwise runs (``linear`` - the table's QKV strategy - then the RoPE
kernel), and tables the faster under the shape's ``rope`` key.

    python bench/linear_sweep.py [--shapes 7B,1.5B] [--tokens 8,32] [--projections qkv,gate_up,qkv_rope] [--no-write]
                                 [--no-swap-ab]     # swapped-operand tilings are timed by default on Hopper
    python bench/linear_sweep.py --around-table --no-write   # the table's tilings at every depth and warp count
"""
import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F
import triton

from common import DEVICE, SHAPES, copies_beyond_l2, copy_bandwidth_gbs, graph_time, record

from fastdllm_kernels.launch import pdl_enabled
from fastdllm_kernels.linear import configs
from fastdllm_kernels.linear.configs import LinearConfig, m_bucket, qkv_rope_key, shape_key
from fastdllm_kernels.linear.dispatch import linear
from fastdllm_kernels.linear.reference import fused_linear_ref


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


def depth_variants(cfg: LinearConfig, swiglu: bool):
    """The tiling and split of ``cfg`` at every pipeline depth that fits the shared memory and at 4 and 8 warps:
    fewer stages let two programs share an SM, more keep more of one program's weight bytes in flight."""
    stage_bytes = (cfg.block_n * (2 if swiglu else 1) + cfg.block_m) * cfg.block_k * 2
    for stages in range(2, 8):
        if stages * stage_bytes > (220 << 10):
            break
        for warps in (4, 8):
            yield dataclasses.replace(cfg, num_stages=stages, num_warps=warps)


def qkv_rope_candidates(M: int, N: int, K: int, head_dim: int, num_sms: int):
    """Tilings of the fused QKV + RoPE kernel: BLOCK_N column pairs (so 2 BLOCK_N weight rows) a program, a
    divisor of half the head width."""
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


def sweep_qkv_rope(shape: str, f: dict, M: int, rot, num_sms: int, g) -> tuple[dict, dict]:
    """Best fused tiling against the separate path at M tokens (block-cache writes at a 2k prefix, as the
    full-block and sub-block steps write); returns (table entry, measurement)."""
    from fastdllm_kernels.linear.qkv_rope import qkv_rope_write
    from fastdllm_kernels.linear.reference import qkv_rope_write_ref
    from fastdllm_kernels.rope.kernel import rope_write
    from fastdllm_kernels.rope.reference import rope_tables

    hq, hkv, K = f["num_attention_heads"], f["num_key_value_heads"], f["hidden_size"]
    D = K // hq
    N = (hq + 2 * hkv) * D
    x = torch.randn(M, K, device=DEVICE, generator=g).to(torch.bfloat16)
    b = (0.1 * torch.randn(N, device=DEVICE, generator=g)).to(torch.bfloat16)
    cos, sin = rope_tables(4096, D, f["rope_theta"], torch.bfloat16, DEVICE)
    pos = 2048 + torch.arange(M, device=DEVICE)
    dest = torch.full((M,), 2, dtype=torch.int32, device=DEVICE)
    slots = torch.zeros(M, dtype=torch.long, device=DEVICE)
    caches = [torch.zeros(1, hkv, n, D, device=DEVICE, dtype=torch.bfloat16) for n in (4096, 4096, 32, 32)]

    def separate(w_):
        q, k, v = linear(x, w_).split([hq * D, hkv * D, hkv * D], dim=-1)
        rope_write(q.view(M, hq, D), k.view(M, hkv, D), v.view(M, hkv, D), cos, sin, pos, dest, slots, *caches,
                   norm_input=x, bias=b, eps=1e-6)

    best = {"separate": (graph_time(lambda: rot(separate), reps=20, iters=10)["p50_ms"], None)}
    for cfg in qkv_rope_candidates(M, N, K, D, num_sms):
        fn = lambda: rot(lambda w_: qkv_rope_write(x, w_, b, 1e-6, hq, hkv, cos, sin, pos, dest, slots,  # noqa: E731
                                                   *caches, config=cfg))
        try:
            ms = graph_time(fn, reps=20, iters=10)["p50_ms"]
        except Exception as e:  # noqa: BLE001 - a tiling this GPU cannot run (shared memory)
            print(f"  skip fused {cfg}: {type(e).__name__}")
            continue
        if ms < best.get("fused", (float("inf"),))[0]:
            best["fused"] = (ms, cfg)
    raw = torch.randn(M, N, device=DEVICE, generator=g).to(torch.bfloat16)
    qkv = [t.view(M, -1, D) for t in raw.split([hq * D, hkv * D, hkv * D], dim=-1)]
    rope_alone = graph_time(lambda: rope_write(*qkv, cos, sin, pos, dest, slots, *caches, norm_input=x, bias=b,
                                               eps=1e-6), reps=20, iters=10)["p50_ms"]
    strategy = min(best, key=lambda k: best[k][0])
    w = rot.ws[0]
    got = qkv_rope_write(x, w, b, 1e-6, hq, hkv, cos, sin, pos, dest, slots, *caches, config=best["fused"][1])
    ref = qkv_rope_write_ref(x.float(), w.float(), b.float(), 1e-6, hq, hkv, cos.float(), sin.float(), pos, dest,
                             slots, *(c.float() for c in caches))
    rel = float((got.float() - ref).norm() / ref.norm())
    assert rel < 1e-2, f"{shape} qkv_rope M={M}: relative error {rel:.2e} against fp32"
    cfg = best[strategy][1]
    entry = {"strategy": strategy, "config": cfg and cfg.to_json()}
    return entry, dict(ours_ms=best[strategy][0], strategy=strategy, strategy_ms={k: v[0] for k, v in best.items()},
                       fused_config=best["fused"][1].to_json(), rope_kernel_ms=rope_alone, N=N, K=K,
                       weight_bytes=w.numel() * 2, rel_err_vs_fp32=rel, candidates=len(list(
                           qkv_rope_candidates(M, N, K, D, num_sms))))


class Rotating:
    """Calls ``fn(weight)`` on the next of several weight copies (together > 3x the L2 cache, at most 20)."""

    def __init__(self, w):
        n = copies_beyond_l2(w.numel() * w.element_size(), at_most=20)
        self.ws = [w] + [w.clone() for _ in range(n - 1)]
        self.i = 0

    def __call__(self, fn):
        self.i = (self.i + 1) % len(self.ws)
        return fn(self.ws[self.i])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--tokens", default="8,32")
    ap.add_argument("--projections", default="qkv,o,gate_up,down,head,qkv_rope")
    ap.add_argument("--no-write", action="store_true", help="do not update kernels/linear/tuned.json")
    ap.add_argument("--swap-ab", action=argparse.BooleanOptionalAction, default=None,
                    help="time swapped-operand tilings too (see candidates); default: on Hopper and newer, whose "
                         "table entries use them (a sweep without them made the H200's 1.5B step slower, run 124)")
    ap.add_argument("--around-table", action="store_true",
                    help="time only the table's strategy and tiling, at every pipeline depth and warp count "
                         "(depth_variants); every variant's time goes to the record")
    args = ap.parse_args()
    if args.swap_ab is None:
        args.swap_ab = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
    command = "python bench/linear_sweep.py --shapes {} --tokens {} --projections {}{}{}".format(
        args.shapes, args.tokens, args.projections, " --swap-ab" if args.swap_ab else "",
        " --around-table" if args.around_table else "")
    assert DEVICE == "cuda", "the sweep times kernels on a GPU"
    gpu = torch.cuda.get_device_name()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth_gbs()
    table = configs.tuned_table()
    tuned = dict(table.get(gpu, {}))
    rows = []
    t_start = time.time()
    for shape in args.shapes.split(","):
        f = SHAPES[shape]
        for name, p in projections(f).items():
            if name not in args.projections.split(","):
                continue
            N, K, swiglu = p["N"], p["K"], p.get("swiglu", False)
            rows_w = 2 * N if swiglu else N
            g = torch.Generator(device=DEVICE).manual_seed(0)
            w = (torch.randn(rows_w, K, device=DEVICE, generator=g) * 0.02).to(torch.bfloat16)
            kw = {"swiglu": swiglu, "out_dtype": torch.float32 if p.get("fp32") else None}
            if p.get("norm"):
                kw.update(norm_weight=torch.ones(K, device=DEVICE, dtype=torch.bfloat16), eps=1e-6)
            if p.get("row_rms"):
                kw.update(row_rms=True, eps=1e-6)
            floor_ms = w.numel() * 2 / (bw * 1e9) * 1e3
            rot = Rotating(w)
            if name == "qkv_rope":
                for M in (int(t) for t in args.tokens.split(",")):
                    entry, m = sweep_qkv_rope(shape, f, M, rot, num_sms, g)
                    tuned[qkv_rope_key(M, N, K)] = entry
                    x = torch.randn(M, K, device=DEVICE, generator=g).to(torch.bfloat16)
                    cublas = graph_time(lambda: rot(lambda w_: F.linear(x, w_)))["p50_ms"]
                    rows.append(record("linear_sweep", model=shape, projection=name, tokens=M, **m,
                                       cublas_matmul_ms=cublas, floor_ms=floor_ms,
                                       ours_TBps=w.numel() * 2 / m["ours_ms"] / 1e9,
                                       cublas_TBps=w.numel() * 2 / cublas / 1e9, copy_GBps=bw,
                                       config=entry["config"], pdl=pdl_enabled(x.device), command=command))
                    print(f"{shape:4} qkv_rope M={M:2d} "
                          + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in m["strategy_ms"].items())
                          + f"  (RoPE kernel alone {m['rope_kernel_ms'] * 1e3:.1f}, cublas-matmul {cublas * 1e3:.1f},"
                          f" floor {floor_ms * 1e3:.1f} us)  {m['fused_config']}  ({time.time() - t_start:.0f}s)",
                          flush=True)
                continue
            for M in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(M, K, device=DEVICE, generator=g).to(torch.bfloat16)
                call = dict(kw)
                if p.get("residual"):
                    call["residual"] = torch.randn(M, N, device=DEVICE, generator=g).to(torch.bfloat16)
                cublas = graph_time(lambda: rot(lambda w_: F.linear(x, w_)))["p50_ms"]
                norm = p.get("norm", False) or p.get("row_rms", False)
                best = {}                                   # strategy -> (ms, config)
                tried = 0
                variants = {}                               # --around-table: every variant's time
                strategies = ("fused", "norm_then_fused", "cublas") if norm else ("fused", "cublas")
                entry = tuned.get(shape_key(M, N, K, swiglu))
                if args.around_table:
                    if not entry or entry["strategy"] == "cublas":
                        print(f"{shape} {name} M={M}: kernels/linear/tuned.json has no fused entry for {gpu} to vary "
                              "(--around-table varies this GPU's own entries: sweep without it first)")
                        continue
                    strategies = (entry["strategy"],)
                for strategy in strategies:
                    # no swapped operands with the row norm in the kernel's prologue (fused_linear refuses it)
                    swap = args.swap_ab and not (norm and strategy == "fused")
                    if args.around_table:
                        cfgs = list(depth_variants(LinearConfig(**entry["config"]), swiglu))
                    else:
                        cfgs = candidates(M, N, K, swiglu, num_sms, swap) if strategy != "cublas" else [None]
                    for cfg in cfgs:
                        fn = lambda: rot(lambda w_: linear(x, w_, strategy=strategy, config=cfg, **call))  # noqa: E731
                        try:
                            ms = graph_time(fn, reps=20, iters=10)["p50_ms"]
                        except Exception as e:  # noqa: BLE001 - a tiling this GPU cannot run (shared memory)
                            print(f"  skip {strategy} {cfg}: {type(e).__name__}")
                            continue
                        tried += 1
                        if args.around_table:
                            variants[f"stages={cfg.num_stages},warps={cfg.num_warps}"] = ms
                        label = strategy + ("/swap_ab" if cfg is not None and cfg.swap_ab else "")
                        if ms < best.get(label, (float("inf"),))[0]:
                            best[label] = (ms, cfg)     # swapped tilings apart, so the record compares them
                label = min(best, key=lambda k: best[k][0])
                best_ms, cfg = best[label]
                strategy = label.split("/")[0]
                got = linear(x, w, strategy=strategy, config=cfg, **call).float()
                ref = fused_linear_ref(x.float(), w.float(), **{k: (v.float() if torch.is_tensor(v) else v)
                                                                for k, v in call.items()})
                rel = float((got - ref).norm() / ref.norm())
                assert rel < 1e-2, f"{shape} {name} M={M}: relative error {rel:.2e} against fp32"
                tuned[shape_key(M, N, K, swiglu)] = {"strategy": strategy, "config": cfg and cfg.to_json()}
                rows.append(record("linear_sweep", model=shape, projection=name, tokens=M, N=N, K=K,
                                   weight_bytes=w.numel() * 2, ours_ms=best_ms, strategy=strategy,
                                   strategy_ms={k: v[0] for k, v in best.items()}, cublas_matmul_ms=cublas,
                                   floor_ms=floor_ms, ours_TBps=w.numel() * 2 / best_ms / 1e9,
                                   cublas_TBps=w.numel() * 2 / cublas / 1e9, copy_GBps=bw, config=cfg and cfg.to_json(),
                                   candidates=tried, rel_err_vs_fp32=rel, pdl=pdl_enabled(x.device),
                                   command=command, **({"table_config": entry["config"], "variants_ms": variants}
                                                       if args.around_table else {})))
                if variants:
                    print(f"{shape:4} {name:8} M={M:2d} table {entry['config']}: " + "  ".join(
                        f"{k} {v * 1e3:.1f}" for k, v in variants.items()))
                print(f"{shape:4} {name:8} M={M:2d} " + "  ".join(f"{k} {v[0] * 1e3:.1f}" for k, v in best.items())
                      + f"  cublas-matmul {cublas * 1e3:.1f}  floor {floor_ms * 1e3:.1f} us  {cfg}"
                      f"  ({time.time() - t_start:.0f}s)", flush=True)
    if not args.no_write:
        table = {**configs.tuned_table(), gpu: dict(sorted(tuned.items()))}
        with open(configs.TUNED_PATH, "w") as fh:
            json.dump(table, fh, indent=1, sort_keys=True)
        configs.tuned_table.cache_clear()
        print(f"wrote {len(tuned)} entries for {gpu} to {configs.TUNED_PATH}")
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)")
    print(f"{'model':5} {'proj':8} {'M':>3} {'ours us':>8} {'strategy':15} {'cuBLAS mm':>9} {'floor us':>8} "
          f"{'x floor':>7} {'TB/s':>5}")
    for r in rows:
        print(f"{r['model']:5} {r['projection']:8} {r['tokens']:3d} {r['ours_ms'] * 1e3:8.1f} {r['strategy']:15} "
              f"{r['cublas_matmul_ms'] * 1e3:9.1f} {r['floor_ms'] * 1e3:8.1f} {r['ours_ms'] / r['floor_ms']:7.2f} "
              f"{r['ours_TBps']:5.2f}")


if __name__ == "__main__":
    main()
