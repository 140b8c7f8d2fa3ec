"""Probe: is the decode linears' gap to a plain read the weight's memory layout?

A plain read of the 7B gate/up weight takes 89.0 us on the H100 (bench/read_ceiling.py: programs summing
contiguous chunks, grid-strided, so the GPU as a whole sweeps the bytes front to back); the bare product over
the same bytes takes 93.1 (bench/ws_linear.py) and the shipped linear 96.4. One difference is the loop (a stage
wait, then the MMA); another is where a tile's bytes are. In the row-major weight a [BN, BK] tile is BN
segments of 2*BK bytes, each ``2 K`` bytes from the next (7 KB for the 7B hidden size), and the ~600 programs
walk ~600 separate row panels at once. Packed tile by tile at load time (as GEMV kernels such as Marlin do) a
tile is one contiguous run of 2*BN*BK bytes.

This script times, per projection and tiling, one weight stream (CUDA graphs over rotating copies, cold):

* ``read``: the tile loop summing its tiles (no MMA) - the access pattern alone;
* ``product``: ``y = x @ W.T`` at 8 tokens, weight tile on the MMA's left (the shipped swapped tiling),
  split-K partials written out (not reduced) where the row panels alone do not cover the SMs;

over three layouts of the same weight: ``row_major``; ``tiled`` (each tile contiguous, a program's row panel
contiguous); ``tiled_kmajor`` (each tile contiguous, the panels' j-th tiles side by side, so the programs
running at once read one contiguous region, as the plain read does). ``read`` against ``product`` in one
layout separates the loop's cost from the access pattern's.

    python bench/weight_layout.py [--shapes 7B,1.5B] [--weights gate_up,down] [--layouts row_major,tiled_kmajor]
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl

from common import DEVICE, SHAPES, copies_beyond_l2, copy_bandwidth_gbs, record, rotating_graph_ms


@triton.jit
def tile_loop_kernel(p_x, p_w, p_out, M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr, LAYOUT: tl.constexpr, PRODUCT: tl.constexpr):
    """One program per (BLOCK_N rows, K split). ``LAYOUT`` 0 (row-major): element (n, k) at ``n K + k``.
    1 (panel-major tiles): tile (i, j) of the [BLOCK_N, BLOCK_K] grid at ``(i (K / BLOCK_K) + j) BLOCK_N BLOCK_K``,
    row-major inside the tile. 2 (k-major tiles): tile (i, j) at ``(j (N / BLOCK_N) + i) BLOCK_N BLOCK_K`` - the
    programs' j-th tiles side by side, so the grid sweeps the weight front to back as the plain read does."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    k_lo = pid_k * K_PER_SPLIT
    if LAYOUT == 1:
        w_ptrs = p_w + pid_n.to(tl.int64) * BLOCK_N * K + k_lo * BLOCK_N + rn[:, None] * BLOCK_K + rk[None, :]
        step = BLOCK_N * BLOCK_K
    elif LAYOUT == 2:
        w_ptrs = (p_w + ((k_lo // BLOCK_K).to(tl.int64) * N + pid_n * BLOCK_N) * BLOCK_K
                  + rn[:, None] * BLOCK_K + rk[None, :])
        step = N.to(tl.int64) * BLOCK_K
    else:
        w_ptrs = p_w + (pid_n * BLOCK_N + rn)[:, None].to(tl.int64) * K + (k_lo + rk)[None, :]
        step = BLOCK_K
    x_ptrs = p_x + rm[:, None] * K + (k_lo + rk)[None, :]
    if PRODUCT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for _ in tl.range(0, K_PER_SPLIT, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        if PRODUCT:
            x = tl.load(x_ptrs, mask=(rm < M)[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc += w.to(tl.float32)
        w_ptrs += step
        x_ptrs += BLOCK_K
    if PRODUCT:
        out = p_out + pid_k * M * N + rm[None, :] * N + (pid_n * BLOCK_N + rn)[:, None]
        tl.store(out, acc, mask=(rm < M)[None, :])
    else:
        s = tl.sum(tl.sum(acc, axis=1), axis=0)
        if s == -1.2345e30:
            tl.store(p_out, s)


LAYOUTS = {"row_major": 0, "tiled": 1, "tiled_kmajor": 2}


def pack_tiles(w: torch.Tensor, bn: int, bk: int, kmajor: bool = False) -> torch.Tensor:
    """``w`` [N, K] rearranged so each [bn, bk] tile is contiguous; tiles in row-major order of the tile grid
    (a program's row panel contiguous), or with ``kmajor`` in column-major order (the panels' j-th tiles
    side by side)."""
    N, K = w.shape
    tiles = w.view(N // bn, bn, K // bk, bk)
    return tiles.permute(*((2, 0) if kmajor else (0, 2)), 1, 3).contiguous().view(N, K)


def launch(x, w, out, bn: int, bk: int, split: int, stages: int, layout: str, product: bool, warps: int = 4):
    M, K = x.shape
    N = w.shape[0]
    tile_loop_kernel[(N // bn, split)](x, w, out, M, N, K, K // split, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                                       STAGES=stages, LAYOUT=LAYOUTS[layout], PRODUCT=product, num_warps=warps)


def projection_shape(fields: dict, name: str) -> tuple:
    d, f = fields["hidden_size"], fields["intermediate_size"]
    return {"gate_up": (2 * f, d), "down": (d, f)}[name]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--weights", default="gate_up,down")
    ap.add_argument("--tilings", default="32x256,64x128,64x256,128x128", help="weight rows x K columns a tile")
    ap.add_argument("--stages", default="3,4")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    command = ("python bench/weight_layout.py " +
               " ".join(f"--{k} {v}" for k, v in vars(args).items()))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth_gbs()
    tilings = [tuple(map(int, t.split("x"))) for t in args.tilings.split(",")]
    print(f"{'shape':5} {'weight':7} {'op':7} {'layout':9} {'best us':>8} {'floor':>6}  tiling (bn, bk, split, stages)")
    for shape, name in itertools.product(args.shapes.split(","), args.weights.split(",")):
        N, K = projection_shape(SHAPES[shape], name)
        w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16) * 0.02
        copies = copies_beyond_l2(w.numel() * 2)
        x = torch.randn(args.tokens, K, device=DEVICE, dtype=torch.bfloat16)
        ref = x.float() @ w.float().T
        floor_us = w.numel() * 2 / (bw * 1e9) * 1e6
        for product, layout in itertools.product((False, True), args.layouts.split(",")):
            op = "product" if product else "read"
            best, timed = None, {}
            for (bn, bk), stages in itertools.product(tilings, map(int, args.stages.split(","))):
                if N % bn or K % bk:
                    continue
                # split K where the row panels alone do not cover the SMs (splits of whole tiles)
                split = next((s for s in (1, 2, 4, 8) if N // bn * s >= sms and K // bk % s == 0), None)
                if split is None:
                    continue
                ws = [w if layout == "row_major" else pack_tiles(w, bn, bk, kmajor=layout == "tiled_kmajor")]
                ws += [ws[0].clone() for _ in range(copies - 1)]
                out = torch.zeros(split, args.tokens, N, device=DEVICE, dtype=torch.float32)
                call = lambda i, bn=bn, bk=bk, split=split, stages=stages: launch(  # noqa: E731
                    x, ws[i], out, bn, bk, split, stages, layout, product)
                try:
                    call(0)
                    if product:
                        err = float((out.sum(0) - ref).norm() / ref.norm())
                        assert err < 1e-2, f"relative error {err:.2e}"
                    t = rotating_graph_ms(call, copies, reps=4, iters=15) * 1e3
                except Exception as e:  # noqa: BLE001 - a variant this GPU cannot build: report, go on
                    print(f"  {op} {layout} {bn}x{bk} s{stages}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                timed[f"{bn}x{bk},split{split},stages{stages}"] = t
                if best is None or t < best[0]:
                    best = (t, bn, bk, split, stages)
            if best is None:
                continue
            record("weight_layout", shape=shape, weight=name, N=N, K=K, tokens=args.tokens, op=op, layout=layout,
                   best_us=best[0], tiling=best[1:], variants_us=timed, floor_us=floor_us, copy_GBps=bw,
                   command=command)
            print(f"{shape:5} {name:7} {op:7} {layout:9} {best[0]:8.1f} {floor_us:6.1f}  {best[1:]}   all: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in timed.items()), flush=True)


if __name__ == "__main__":
    main()
