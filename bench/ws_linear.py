"""Probe: does a TMA-fed, warp-specialised weight stream bring a decode linear to the read ceiling?

A plain pipelined read of the 7B gate/up weight takes 89-90 us on the H100 (bench/read_ceiling.py, runs
92-93), about the copy-bandwidth floor; the shipped fused linear takes 96 us at 8 tokens and 102 at 32, and
no pipeline depth, warp count or programs-per-SM choice moves it (``linear_sweep.py --around-table``, run 93).
One difference from the plain read is how the loop consumes its tiles: cp.async into shared memory, a wait, then
the MMA, all in the same warps (the other, the order the weight is read in, turned out to be most of the gap:
bench/weight_layout.py, session 13). This script times the bare product ``y = x @ W.T`` (bf16, fp32 accumulation, no
epilogue; weight tile on the MMA's left, as the shipped swapped tiling) three ways, as CUDA graphs over rotating
weight copies, at the 7B and 1.5B gate/up shapes:

* ``pointer``: pointer loads, Triton's software pipeline (the shipped kernel's structure);
* ``tma``: tensor-descriptor (TMA) loads, same pipeline;
* ``tma_ws``: TMA loads with ``tl.range(..., warp_specialize=True)`` - a producer warp issues the copies and the
  MMA warps only wait on barriers. Not in the default kinds: on the H100 with Triton 3.6 the 128 x 128 tile at
  3 stages never finished (device run 99, a hang); run 96 ran out its time limit inside this kind.

Not wired into the runtime; a probe for the next kernel.

    python bench/ws_linear.py [--kinds pointer,tma] [--tilings 64x128,128x64,128x128] [--stages 3,4,6]
    python bench/ws_linear.py --shapes 7B --tokens 8 --kinds tma_ws --tilings 64x128 --stages 3,4   # run 99
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from common import DEVICE, SHAPES, copies_beyond_l2, copy_bandwidth_gbs, record, rotating_graph_ms


@triton.jit
def pointer_kernel(p_x, p_w, p_y, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   STAGES: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(p_x + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
        w = tl.load(p_w + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :], eviction_policy="evict_first")
        acc = tl.dot(w, tl.trans(x), acc)
    tl.store(p_y + rm[None, :] * N + rn[:, None], acc.to(p_y.dtype.element_ty), mask=(rm < M)[None, :])


@triton.jit
def tma_kernel(x_desc, w_desc, p_y, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               STAGES: tl.constexpr, WS: tl.constexpr):
    off_n = tl.program_id(0) * BLOCK_N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        x = x_desc.load([0, k0])
        w = w_desc.load([off_n, k0])
        acc = tl.dot(w, tl.trans(x), acc)
    rn = off_n + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    tl.store(p_y + rm[None, :] * N + rn[:, None], acc.to(p_y.dtype.element_ty), mask=(rm < M)[None, :])


def make_call(kind: str, x, w, y, bm: int, bn: int, bk: int, stages: int, warps: int):
    M, K = x.shape
    N = w.shape[0]
    grid = (N // bn,)
    if kind == "pointer":
        return lambda w_: pointer_kernel[grid](x, w_, y, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
                                              num_warps=warps)
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    return lambda w_: tma_kernel[grid](x_desc, TensorDescriptor.from_tensor(w_, [bn, bk]), y, M, N, K, BLOCK_M=bm,
                                       BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, WS=kind == "tma_ws", num_warps=warps)


def graph_us(call, ws: list) -> float:
    """Median GPU time (us) of ``call(w)``, cycling over the weight copies ``ws`` in one CUDA graph."""
    return rotating_graph_ms(lambda i: call(ws[i]), len(ws), reps=4, iters=15) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--tokens", default="8,32")
    ap.add_argument("--kinds", default="pointer,tma")
    ap.add_argument("--tilings", default="64x128,128x64,128x128", help="weight rows x K columns a tile")
    ap.add_argument("--stages", default="3,4,6")
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    command = (f"python bench/ws_linear.py --shapes {args.shapes} --tokens {args.tokens} --kinds {args.kinds} "
               f"--tilings {args.tilings} --stages {args.stages}")
    tilings = [tuple(map(int, t.split("x"))) for t in args.tilings.split(",")]
    bw = copy_bandwidth_gbs()
    print(f"{'shape':5} {'M':>3} {'kind':8} {'best us':>8} {'floor us':>8} {'TB/s':>5}  tiling (bn, bk, stages, warps)")
    for shape in args.shapes.split(","):
        f = SHAPES[shape]
        N, K = 2 * f["intermediate_size"], f["hidden_size"]          # gate and up rows: one weight stream
        w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16) * 0.02
        ws = [w] + [w.clone() for _ in range(copies_beyond_l2(w.numel() * 2) - 1)]
        floor_us = w.numel() * 2 / (bw * 1e9) * 1e6
        for M in map(int, args.tokens.split(",")):
            bm = 16 if M <= 16 else 32
            x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
            y = torch.empty(M, N, device=DEVICE, dtype=torch.bfloat16)
            ref = (x.float() @ w.float().T)
            cublas = graph_us(lambda w_: torch.nn.functional.linear(x, w_), ws)
            print(f"{shape:5} {M:3d} {'cublas':8} {cublas:8.1f} {floor_us:8.1f} {w.numel() * 2 / cublas / 1e6:5.2f}")
            for kind in args.kinds.split(","):
                best, timed = None, {}
                for (bn, bk), stages, warps in itertools.product(tilings, map(int, args.stages.split(",")), (4,)):
                    if (bn + bm) * bk * 2 * stages > (200 << 10):
                        continue
                    try:
                        call = make_call(kind, x, w, y, bm, bn, bk, stages, warps)
                        call(w)
                        err = float((y.float() - ref).norm() / ref.norm())
                        assert err < 1e-2, f"relative error {err:.2e}"
                        t = graph_us(call, ws)
                    except Exception as e:  # noqa: BLE001 - a variant this Triton / GPU cannot build: report, go on
                        print(f"  {kind} {bn},{bk},{stages}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                        continue
                    timed[f"{bn},{bk},{stages},{warps}"] = t
                    if best is None or t < best[0]:
                        best = (t, bn, bk, stages, warps)
                if best is None:
                    continue
                t = best[0]
                record("ws_linear", shape=shape, tokens=M, kind=kind, N=N, K=K, best_us=t, tiling=best[1:],
                       variants_us=timed, cublas_us=cublas, floor_us=floor_us, copy_GBps=bw, command=command)
                print(f"{shape:5} {M:3d} {kind:8} {t:8.1f} {floor_us:8.1f} {w.numel() * 2 / t / 1e6:5.2f}  {best[1:]}",
                      flush=True)


if __name__ == "__main__":
    main()
