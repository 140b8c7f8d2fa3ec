"""Probe: a decode layer's whole MLP as one Gluon launch that streams its weights at the copy floor.

Session 13's probes (``weight_layout.py``, ``layer_stream.py``, ``gluon_stream.py``) sized the next kernel: the 7B
MLP's two shipped launches (gate/up + SwiGLU, then down + residual) take 146.9 us a layer at 8 tokens and 153.7 at
32 against 134.8 for a plain read of their 407 MB, and a Gluon producer warp keeps a weight stream going through
grid barriers that a Triton loop drains at. This kernel is that launch:

* one program per SM; a **producer warp** streams the program's share of the gate/up weight and then, without
  waiting for anything, its share of the down weight, by TMA, into a ring of shared-memory stages (two
  ``[64, BK]`` boxes a stage: 64 gate rows and the matching 64 up rows, or 128 rows of the down weight);
* the **consumer warpgroup** multiplies each stage with the tokens' activations as swapped-operand warpgroup
  MMAs (``W_box [64, BK] @ x^T [BK, MP]``: the weight is the 64-row side, the 8-32 tokens are the MMA's N),
  asynchronous with one unit in flight, its activation tiles loaded two units ahead (or, ``+xtma``, copied by
  the producer into the gate/up stages);
* work is **stream-K**: the (output tile, K chunk) units of a matmul are cut into equal contiguous ranges, one
  per program, so every SM streams the same bytes; a program's partial sums of each tile it touched go to a
  workspace slot, and after a grid barrier the tile's pieces are summed in a fixed order (deterministic);
* between the matmuls: the row's 1/rms (its sum of squares gathered from the same x chunks, per piece), the
  rounding the shipped path does, SwiGLU, and at the end the residual add.

Three grid barriers (gate/up partials -> SwiGLU -> down partials -> sum + residual); the producer never stops at
them. ``python bench/gluon_mlp.py`` checks the result against the shipped path and the PyTorch reference (and two
calls bit for bit), then times it beside the shipped two launches and the copy floor, each as a CUDA graph over
rotating weight copies, and traces the best of each ``--schemes`` variant (``phase_trace``: every program's
timestamps at the phase boundaries). Weight layouts: ``rowmajor`` (as stored), ``packed`` (box by box in unit
order), ``interleaved`` (the programs' shares interleaved unit by unit - the one that beat the shipped launches,
at 8 tokens; bench/RESULTS.md, runs 110-118). Not used by the runtime.

    python bench/gluon_mlp.py [--shapes 7B,1.5B] [--tokens 8,32] [--bk 128] [--stages 4] [--schemes interleaved,...]
"""
import argparse
import itertools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                 warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from common import DEVICE, SHAPES, copies_beyond_l2, copy_bandwidth_gbs, record, rotating_graph_ms

TMA_LOAD = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
CTA_SYNC = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
ROWS = 64                     # rows of a weight box (a stage holds two); BOX in the kernels
BOX = gl.constexpr(ROWS)
MAX_SEGS = gl.constexpr(8)    # tiles one program's unit range may touch (checked on the host)


@gluon.jit
def _stamp(trace_ptr, j: gl.constexpr, TRACE: gl.constexpr):
    """With TRACE, the GPU's global timer (ns) into trace[program, j]: where a program's time goes."""
    if TRACE:
        pid = gl.program_id(0)
        now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=gl.int64, is_pure=False,
                                        pack=1)
        gl.store(trace_ptr + pid * 16 + j, now)


@gluon.jit
def _units(n_units, pid, G):
    per = gl.cdiv(n_units, G)
    lo = pid * per
    return per, lo, gl.minimum(lo + per, n_units)


@gluon.jit
def _rotation(lo, hi, pid, KS: gl.constexpr, ROTATE: gl.constexpr):
    """Where in its share a program starts (it then wraps around): with ROTATE, at the unit whose K chunk is
    pid mod KS, so that at any moment the programs read different activation tiles rather than the same few.
    Returns (start offset, share length, share length or 1 - a safe modulus)."""
    n = hi - lo
    n1 = gl.maximum(n, 1)
    r = lo * 0
    if ROTATE:
        r = (((pid - lo) % KS + KS) % KS) % n1
    return r, n, n1


@gluon.jit
def _producer(wgu_desc, wd_desc, x_desc, bufs, xbufs, ready, empty, trace_ptr, rot, P1, P2, H: gl.constexpr,
              I: gl.constexpr, BK: gl.constexpr, TRACE: gl.constexpr, PACKED: gl.constexpr, X_TMA: gl.constexpr,
              ROTATE: gl.constexpr):
    STAGES: gl.constexpr = bufs.type.shape[0] // 2
    X_BYTES: gl.constexpr = xbufs.type.shape[1] * BK * 2
    STAGE_BYTES: gl.constexpr = 2 * BOX * BK * 2
    KS1: gl.constexpr = H // BK
    KS2: gl.constexpr = I // BK
    G = gl.num_programs(0)
    pid = (gl.program_id(0) + rot) % G          # the share this program streams (rot: a diagnostic shift)
    it = 0
    _stamp(trace_ptr, 8, TRACE)
    _, lo, hi = _units((I // BOX) * KS1, pid, G)
    r, n, n1 = _rotation(lo, hi, pid, KS1, ROTATE)
    for j in range(0, n):                        # gate/up: 64 gate rows and their 64 up rows
        u = lo + (j + r) % n1
        t = u // KS1
        k = u - t * KS1
        t = (t * P1) % (I // BOX)                # the weight tile this unit's tile stands for (scramble)
        s = it % STAGES
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        if X_TMA:                                # the activation tile rides in the same stage
            mbarrier.expect(ready.index(s), STAGE_BYTES + X_BYTES)
            TMA_LOAD(x_desc, [0, k * BK], ready.index(s), xbufs.index(s))
        else:
            mbarrier.expect(ready.index(s), STAGE_BYTES)
        if PACKED:                               # the unit's two boxes lie one after the other
            mu = j * G + pid if PACKED == 2 else t * KS1 + k     # 2: the shares interleaved in walk order
            TMA_LOAD(wgu_desc, [mu * 2 * BOX, 0], ready.index(s), bufs.index(2 * s))
            TMA_LOAD(wgu_desc, [mu * 2 * BOX + BOX, 0], ready.index(s), bufs.index(2 * s + 1))
        else:
            TMA_LOAD(wgu_desc, [t * BOX, k * BK], ready.index(s), bufs.index(2 * s))
            TMA_LOAD(wgu_desc, [I + t * BOX, k * BK], ready.index(s), bufs.index(2 * s + 1))
        it += 1
    _stamp(trace_ptr, 9, TRACE)
    _, lo, hi = _units((H // (2 * BOX)) * KS2, pid, G)
    r, n, n1 = _rotation(lo, hi, pid, KS2, ROTATE)
    for j in range(0, n):                        # down: 128 output rows
        u = lo + (j + r) % n1
        t = u // KS2
        k = u - t * KS2
        t = (t * P2) % (H // (2 * BOX))
        s = it % STAGES
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), STAGE_BYTES)
        if PACKED:
            mu = j * G + pid if PACKED == 2 else t * KS2 + k
            TMA_LOAD(wd_desc, [mu * 2 * BOX, 0], ready.index(s), bufs.index(2 * s))
            TMA_LOAD(wd_desc, [mu * 2 * BOX + BOX, 0], ready.index(s), bufs.index(2 * s + 1))
        else:
            TMA_LOAD(wd_desc, [t * 2 * BOX, k * BK], ready.index(s), bufs.index(2 * s))
            TMA_LOAD(wd_desc, [t * 2 * BOX + BOX, k * BK], ready.index(s), bufs.index(2 * s + 1))
        it += 1
    _stamp(trace_ptr, 10, TRACE)


@gluon.jit
def _load_x(x_ptr, M, XK: gl.constexpr, BK: gl.constexpr, k, rows, cols, valid):
    ptrs = x_ptr + rows[:, None] * XK + (k * BK + cols)[None, :]
    return gl.load(ptrs, mask=(rows[:, None] < M) & valid, other=0.0)


@gluon.jit
def _mma_phase(x_ptr, M, XK: gl.constexpr, ws_ptr, ss_ptr, bufs, xbufs, ready, empty, xs, it, pid, G,
               WITH_SS: gl.constexpr, MP: gl.constexpr, BK: gl.constexpr, acc_layout: gl.constexpr,
               x_layout: gl.constexpr, N_TILES: gl.constexpr, DIAG: gl.constexpr, X_TMA: gl.constexpr,
               ROTATE: gl.constexpr):
    """One matmul's stream-K share: x [M, XK] (bf16, row-major) against the stages the producer fills; each tile's
    two [BOX, MP] partial sums (and, with WITH_SS, the x rows' partial sums of squares) go to workspace slots
    (program, segment). A unit's MMAs run while the next unit's x tile is stored (two x buffers); its stage is
    freed once they are done; x tiles are loaded two units ahead - or, with X_TMA, read from the stage itself."""
    STAGES: gl.constexpr = bufs.type.shape[0] // 2
    KS: gl.constexpr = XK // BK
    per, lo, hi = _units(N_TILES * KS, pid, G)
    t_first = lo // KS
    rows = gl.arange(0, MP, layout=gl.SliceLayout(1, x_layout))
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, x_layout))
    a_rows = gl.arange(0, BOX, layout=gl.SliceLayout(1, acc_layout))
    a_cols = gl.arange(0, MP, layout=gl.SliceLayout(0, acc_layout))
    a_off = a_rows[:, None] * MP + a_cols[None, :]
    acc0 = gl.zeros([BOX, MP], gl.float32, acc_layout)
    acc1 = gl.zeros([BOX, MP], gl.float32, acc_layout)
    ss = gl.zeros([MP, BK], gl.float32, x_layout)
    # DIAG (timing only, wrong results): 1 every unit reads x's first tile, 2 no sums of squares, 4 no MMAs
    KX: gl.constexpr = 1 if DIAG & 1 else KS
    r, n, n1 = _rotation(lo, hi, pid, KS, ROTATE)    # the share is walked from lo + r, wrapping around
    first_t = (lo + r) // KS
    flushes = lo * 0
    xv = _load_x(x_ptr, M, XK, BK, (lo + r % n1) % KX, rows, cols, (n > 0) & (not X_TMA))  # (X_TMA: no loads)
    xn = _load_x(x_ptr, M, XK, BK, (lo + (1 + r) % n1) % KX, rows, cols, (n > 1) & (not X_TMA))
    pend = -1
    for j in range(0, n):
        u = lo + (j + r) % n1
        t = u // KS
        xa = _load_x(x_ptr, M, XK, BK, (lo + (j + 2 + r) % n1) % KX, rows, cols, (j + 2 < n) & (not X_TMA))
        s = it % STAGES
        if X_TMA:
            xb = xbufs.index(s)
        else:
            xb = xs.index(j % 2)
            xb.store(xv)
            fence_async_shared()
            CTA_SYNC()
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        if (DIAG & 4) == 0:
            acc0 = warpgroup_mma(bufs.index(2 * s), xb.permute((1, 0)), acc0, is_async=True)
            acc1 = warpgroup_mma(bufs.index(2 * s + 1), xb.permute((1, 0)), acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))      # the previous unit's
        if pend >= 0:
            mbarrier.arrive(empty.index(pend), count=1)
        pend = s
        if WITH_SS and (DIAG & 2) == 0:
            if X_TMA:
                xf = xb.load(x_layout).to(gl.float32)
                fence_async_shared()             # this read ordered before the slot's next TMA write
            else:
                xf = xv.to(gl.float32)
            ss += xf * xf
        if (j == n - 1) | ((lo + (j + 1 + r) % n1) // KS != t):    # the tile's piece is done: to its slot
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
            mbarrier.arrive(empty.index(s), count=1)
            pend = -1
            slot = (pid * MAX_SEGS + t - t_first) * 2
            # a rotated walk visits its first tile twice (start and end): the second visit adds to the first
            again = (t == first_t) & (flushes > 0)
            acc0 += gl.load(ws_ptr + slot * BOX * MP + a_off, mask=(a_off >= 0) & again, other=0.0)
            acc1 += gl.load(ws_ptr + (slot + 1) * BOX * MP + a_off, mask=(a_off >= 0) & again, other=0.0)
            gl.store(ws_ptr + slot * BOX * MP + a_off, acc0)
            gl.store(ws_ptr + (slot + 1) * BOX * MP + a_off, acc1)
            acc0 = gl.zeros([BOX, MP], gl.float32, acc_layout)
            acc1 = gl.zeros([BOX, MP], gl.float32, acc_layout)
            if WITH_SS:
                ss_at = ss_ptr + (pid * MAX_SEGS + t - t_first) * MP + rows
                gl.store(ss_at, gl.sum(ss, axis=1) + gl.load(ss_at, mask=(rows >= 0) & again, other=0.0))
                ss = gl.zeros([MP, BK], gl.float32, x_layout)
            flushes += 1
        xv = xn
        xn = xa
        it += 1
    return it


@gluon.jit
def _grid_barrier(p_count, target):
    CTA_SYNC()                                   # every warp's stores before the release
    arrived = gl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        arrived = gl.atomic_add(p_count, 0, sem="acquire", scope="gpu")
    CTA_SYNC()


@gluon.jit
def _pieces(t, KS: gl.constexpr, n_units, G, NP: gl.constexpr, l3: gl.constexpr):
    """The programs whose unit range touched tile t (p0 .. p1, at most NP of them) and the segment each used."""
    per = gl.cdiv(n_units, G)
    p0 = (t * KS) // per
    p1 = ((t + 1) * KS - 1) // per
    p = p0 + gl.arange(0, NP, layout=gl.SliceLayout(1, gl.SliceLayout(2, l3)))
    return p, p <= p1, t - (p * per) // KS


@gluon.jit
def _piece_sum(ws_ptr, p, valid, seg, half, r0, RB: gl.constexpr, MP: gl.constexpr, l3: gl.constexpr):
    """Sum of the pieces' [RB, MP] slices (rows r0 .. r0 + RB of the half) - all loads issued at once, summed in
    registers in piece order."""
    r = gl.arange(0, RB, layout=gl.SliceLayout(0, gl.SliceLayout(2, l3)))
    m = gl.arange(0, MP, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3)))
    base = ((p * MAX_SEGS + seg) * 2 + half) * BOX * MP
    off = base[:, None, None] + (r0 + r)[None, :, None] * MP + m[None, None, :]
    return gl.sum(gl.load(ws_ptr + off, mask=valid[:, None, None], other=0.0), axis=0)


@gluon.jit
def _consumer(x_ptr, act_ptr, out_ptr, ws1_ptr, ss1_ptr, ws2_ptr, p_count, bufs, xbufs, ready, empty, xs, M, eps,
              trace_ptr, rot, P1, P2, H: gl.constexpr, I: gl.constexpr, MP: gl.constexpr, BK: gl.constexpr,
              NP1: gl.constexpr,
              NP2: gl.constexpr, RB2: gl.constexpr, TRACE: gl.constexpr, DIAG: gl.constexpr,
              X_TMA: gl.constexpr, ROTATE: gl.constexpr):
    CW: gl.constexpr = gl.num_warps()            # consumer warps: 4, or 8 (two warpgroups splitting the tokens)
    WG: gl.constexpr = CW // 4
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                         instr_shape=[16, MP // WG, 16])
    TPK: gl.constexpr = BK // 8
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPK, TPK], [CW, 1], [1, 0])
    TPM: gl.constexpr = MP // 4
    l3a: gl.constexpr = gl.BlockedLayout([NP1, 1, 4], [1, 32 // TPM, TPM], [1, CW, 1], [2, 1, 0])
    l3b: gl.constexpr = gl.BlockedLayout([NP2, 1, 4], [1, 32 // TPM, TPM], [1, CW, 1], [2, 1, 0])
    G = gl.num_programs(0)
    pid = (gl.program_id(0) + rot) % G          # the share this program streams (rot: a diagnostic shift)
    KS1: gl.constexpr = H // BK
    KS2: gl.constexpr = I // BK
    _stamp(trace_ptr, 0, TRACE)
    it = _mma_phase(x_ptr, M, H, ws1_ptr, ss1_ptr, bufs, xbufs, ready, empty, xs, pid * 0, pid, G, True, MP, BK,
                    acc_layout, x_layout, I // BOX, DIAG, X_TMA, ROTATE)
    _stamp(trace_ptr, 1, TRACE)
    _grid_barrier(p_count, G)
    _stamp(trace_ptr, 2, TRACE)

    la: gl.constexpr = gl.SliceLayout(0, l3a)                    # [BOX, MP]
    r = gl.arange(0, BOX, layout=gl.SliceLayout(1, la))
    m = gl.arange(0, MP, layout=gl.SliceLayout(0, la))
    mask = (m[None, :] < M) & (r[:, None] < BOX)
    mp = gl.arange(0, MP, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3a)))
    n1 = (I // BOX) * KS1
    for t in range(pid, I // BOX, G):            # SwiGLU of 64 intermediate columns
        p, valid, seg = _pieces(t, KS1, n1, G, NP1, l3a)
        g = _piece_sum(ws1_ptr, p, valid, seg, 0, 0, BOX, MP, l3a)
        up = _piece_sum(ws1_ptr, p, valid, seg, 1, 0, BOX, MP, l3a)
        ls: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(1, l3a))
        slot = gl.convert_layout(p * MAX_SEGS + seg, ls)
        ss = gl.sum(gl.load(ss1_ptr + slot[:, None] * MP + mp[None, :], mask=gl.convert_layout(valid, ls)[:, None],
                            other=0.0), axis=0)
        rstd = gl.convert_layout(gl.rsqrt(ss / H + eps), gl.SliceLayout(0, la))
        gf = (g * rstd[None, :]).to(gl.bfloat16).to(gl.float32)      # rounded as the shipped kernel rounds
        uf = (up * rstd[None, :]).to(gl.bfloat16).to(gl.float32)
        a = (gf / (1.0 + gl.exp(-gf))).to(gl.bfloat16).to(gl.float32)
        tw = (t * P1) % (I // BOX)               # the intermediate columns this tile computed
        gl.store(act_ptr + m[None, :] * I + (tw * BOX + r)[:, None], (a * uf).to(gl.bfloat16), mask=mask)
    _stamp(trace_ptr, 3, TRACE)
    _grid_barrier(p_count, 2 * G)
    _stamp(trace_ptr, 4, TRACE)

    it = _mma_phase(act_ptr, M, I, ws2_ptr, ss1_ptr, bufs, xbufs, ready, empty, xs, it, pid, G, False, MP, BK,
                    acc_layout, x_layout, H // (2 * BOX), DIAG, False, ROTATE)
    _stamp(trace_ptr, 5, TRACE)
    _grid_barrier(p_count, 3 * G)
    _stamp(trace_ptr, 6, TRACE)

    lb: gl.constexpr = gl.SliceLayout(0, l3b)                    # [RB2, MP]
    rb = gl.arange(0, RB2, layout=gl.SliceLayout(1, lb))
    mb = gl.arange(0, MP, layout=gl.SliceLayout(0, lb))
    maskb = (mb[None, :] < M) & (rb[:, None] < RB2)
    n2 = (H // (2 * BOX)) * KS2
    for item in range(pid, H // RB2, G):         # RB2 output columns: pieces + residual
        row0 = item * RB2
        t = row0 // (2 * BOX)
        half = (row0 // BOX) % 2
        p, valid, seg = _pieces(t, KS2, n2, G, NP2, l3b)
        y = _piece_sum(ws2_ptr, p, valid, seg, half, row0 % BOX, RB2, MP, l3b)
        col = (((t * P2) % (H // (2 * BOX))) * 2 * BOX + row0 % (2 * BOX) + rb)[:, None]
        res = gl.load(x_ptr + mb[None, :] * H + col, mask=maskb, other=0.0)
        gl.store(out_ptr + mb[None, :] * H + col, (y + res.to(gl.float32)).to(gl.bfloat16), mask=maskb)

    _stamp(trace_ptr, 7, TRACE)
    left = gl.atomic_add(p_count + 1, 1, sem="acq_rel", scope="gpu") + 1
    if left == G:                                # the last to leave resets the counts for the next launch
        gl.atomic_xchg(p_count, 0, sem="relaxed", scope="gpu")
        gl.atomic_xchg(p_count + 1, 0, sem="relaxed", scope="gpu")


@gluon.jit
def gluon_mlp_kernel(x_ptr, act_ptr, out_ptr, ws1_ptr, ss1_ptr, ws2_ptr, p_count, wgu_desc, wd_desc, x_desc, M, eps,
                     trace_ptr, rot, P1, P2,
                     H: gl.constexpr, I: gl.constexpr, MP: gl.constexpr, BK: gl.constexpr,
                     STAGES: gl.constexpr, NP1: gl.constexpr, NP2: gl.constexpr, RB2: gl.constexpr,
                     TRACE: gl.constexpr, DIAG: gl.constexpr, PACKED: gl.constexpr, X_TMA: gl.constexpr,
                     X_STAGES: gl.constexpr, ROTATE: gl.constexpr, num_warps: gl.constexpr):
    bufs = gl.allocate_shared_memory(gl.bfloat16, [2 * STAGES, BOX, BK], wgu_desc.layout)
    xs = gl.allocate_shared_memory(gl.bfloat16, [2, MP, BK], gl.NVMMASharedLayout.get_default_for([MP, BK],
                                                                                                   gl.bfloat16))
    xbufs = gl.allocate_shared_memory(gl.bfloat16, [X_STAGES, MP, BK], x_desc.layout)   # X_TMA: STAGES, else 1
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (x_ptr, act_ptr, out_ptr, ws1_ptr, ss1_ptr, ws2_ptr, p_count, bufs, xbufs, ready, empty, xs, M,
                     eps, trace_ptr, rot, P1, P2, H, I, MP, BK, NP1, NP2, RB2, TRACE, DIAG, X_TMA, ROTATE)),
        (_producer, (wgu_desc, wd_desc, x_desc, bufs, xbufs, ready, empty, trace_ptr, rot, P1, P2, H, I, BK, TRACE,
                     PACKED, X_TMA, ROTATE)),
    ], [1], [40])


def max_segments(n_tiles: int, ks: int, grid: int) -> int:
    """The most output tiles one program's contiguous unit range touches (the workspace slots it needs)."""
    n = n_tiles * ks
    per = -(-n // grid)
    return max((min(lo + per, n) - 1) // ks - lo // ks + 1 for lo in range(0, n, per))


def max_pieces(n_tiles: int, ks: int, grid: int) -> int:
    """The most programs whose unit ranges touch one tile, rounded up to a power of two (a tensor dimension)."""
    per = -(-n_tiles * ks // grid)
    most = max(((t + 1) * ks - 1) // per - (t * ks) // per + 1 for t in range(n_tiles))
    return 1 << (most - 1).bit_length()


def scramble_step(n: int) -> int:
    """The integer nearest 0.618 n that is coprime to n: t -> t * step mod n visits every tile once, neighbours
    far apart."""
    import math
    return min((p for p in range(1, n) if math.gcd(p, n) == 1), key=lambda p: abs(p - 0.618 * n), default=1)


def pack_units(gate_up_w, down_w, bk: int, interleave_grid: int = 0, rotate: bool = False):
    """The weights as [units * 128, bk]: unit (tile, k) of gate/up is its 64 gate rows then its 64 up rows of K
    columns k * bk .. + bk; unit (tile, k) of down its 128 rows; units in the order the kernel numbers them - or,
    with ``interleave_grid`` G, the j-th unit program p walks (from its ``_rotation`` start with ``rotate``) at
    slot j * G + p, so that at any moment the programs read neighbouring memory (as a grid of programs over tiles
    does) while each keeps a contiguous share."""
    I2, H = gate_up_w.shape
    I = I2 // 2
    gu = gate_up_w.view(2, I // ROWS, ROWS, H // bk, bk).permute(1, 3, 0, 2, 4).reshape(-1, 2 * ROWS, bk)
    d = down_w.view(H // (2 * ROWS), 2, ROWS, I // bk, bk).permute(0, 3, 1, 2, 4).reshape(-1, 2 * ROWS, bk)
    out = []
    for w, ks in ((gu, H // bk), (d, I // bk)):
        if interleave_grid:
            n, G = w.shape[0], interleave_grid
            per = -(-n // G)
            u = torch.arange(n, device=w.device)
            p = u // per
            lo = p * per
            length = torch.clamp(n - lo, max=per)
            r = ((p - lo) % ks) % length if rotate else torch.zeros_like(u)    # as _rotation computes it
            slots = w.new_zeros(per * G, 2 * ROWS, bk)
            slots[((u - lo - r) % length) * G + p] = w
            w = slots
        out.append(w.reshape(-1, bk).contiguous())
    return tuple(out)


class GluonMLP:
    """The one-launch MLP for fixed weights, token count and grid: descriptors and workspaces made once, so the
    call can be captured in a CUDA graph."""

    def __init__(self, gate_up_w, down_w, max_tokens: int, grid: int, bk: int = 128, stages: int = 6,
                 eps: float = 1e-6, packed: bool | str = False, scramble: bool = False, x_tma: bool = False,
                 warps: int = 4, rotate: bool = False):
        """``packed``: stream copies of the weights laid out box by box in the order the units read them, so each
        program's share is one contiguous range of memory (``pack_units``); ``"interleaved"``: the programs' shares
        interleaved unit by unit in that copy. ``scramble``: unit tile t reads weight
        tile t * P mod T (P coprime to T, near 0.618 T), so a program's two or three tiles lie far apart in the
        weight. ``x_tma``: the producer also copies each gate/up unit's activation tile into its stage. ``warps``:
        the consumer's, 4 (one warpgroup) or 8 (two, each taking half the tokens; 16 tokens or more). ``rotate``:
        each program walks its share from the unit whose K chunk is its index mod K/BK (``_rotation``)."""
        I2, H = gate_up_w.shape
        self.H, self.I = H, I2 // 2
        assert down_w.shape == (H, self.I)
        assert self.I % ROWS == 0 and H % (2 * ROWS) == 0 and H % bk == 0 and self.I % bk == 0, "shape not tileable"
        self.mp = max(8, -(-max_tokens // 8) * 8)
        assert self.mp <= 32, "up to 32 tokens (the decode steps)"
        assert max_segments(self.I // ROWS, H // bk, grid) <= MAX_SEGS
        assert max_segments(H // (2 * ROWS), self.I // bk, grid) <= MAX_SEGS
        self.bk, self.stages, self.grid, self.eps = bk, stages, grid, eps
        self.p1 = scramble_step(self.I // ROWS) if scramble else 1
        self.p2 = scramble_step(H // (2 * ROWS)) if scramble else 1
        self.x_tma = x_tma
        assert warps == 4 or (warps == 8 and self.mp >= 16), "8 consumer warps split 16 or more tokens"
        self.warps = warps
        self.rotate = rotate
        self.x_layout = gl.NVMMASharedLayout.get_default_for([self.mp, bk], gl.bfloat16)
        self.np1 = max_pieces(self.I // ROWS, H // bk, grid)
        self.np2 = max_pieces(H // (2 * ROWS), self.I // bk, grid)
        self.rb2 = min(ROWS, 8192 // (self.np2 * self.mp))      # final sum: <= 64 fp32 registers a thread
        assert self.np1 * ROWS * self.mp <= 8192 and self.rb2 >= 8
        self.packed = packed
        if packed:
            gate_up_w, down_w = pack_units(gate_up_w, down_w, bk, grid if packed == "interleaved" else 0, rotate)
            self.keep = (gate_up_w, down_w)
        layout = gl.NVMMASharedLayout.get_default_for([ROWS, bk], gl.bfloat16)
        self.wgu_desc = TensorDescriptor.from_tensor(gate_up_w, [ROWS, bk], layout)
        self.wd_desc = TensorDescriptor.from_tensor(down_w, [ROWS, bk], layout)
        dev = gate_up_w.device
        self.ws1 = torch.empty(grid * MAX_SEGS * 2 * ROWS * self.mp, dtype=torch.float32, device=dev)
        self.ss1 = torch.empty(grid * MAX_SEGS * self.mp, dtype=torch.float32, device=dev)
        self.ws2 = torch.empty_like(self.ws1)
        self.act = torch.empty(max_tokens, self.I, dtype=torch.bfloat16, device=dev)
        self.count = torch.zeros(2, dtype=torch.int32, device=dev)

    def __call__(self, x, out=None, trace=None, diag=0, rot=0):
        """``trace``: an int64 [grid, 16] tensor that receives each program's timestamps (``_stamp``).
        ``diag``: timing only, the result is wrong - 1: every unit multiplies x's first tile, 2: no sums of squares,
        4: no MMAs (bits combine)."""
        M = x.shape[0]
        out = torch.empty_like(x) if out is None else out
        x_desc = TensorDescriptor.from_tensor(x, [self.mp, self.bk], self.x_layout)   # rows >= M read as zeros
        gluon_mlp_kernel[(self.grid,)](x, self.act, out, self.ws1, self.ss1, self.ws2, self.count, self.wgu_desc,
                                       self.wd_desc, x_desc, M, self.eps, self.count if trace is None else trace, rot,
                                       self.p1, self.p2, H=self.H, I=self.I, MP=self.mp, BK=self.bk,
                                       STAGES=self.stages, NP1=self.np1, NP2=self.np2, RB2=self.rb2,
                                       TRACE=trace is not None, DIAG=diag,
                                       PACKED={False: 0, True: 1, "interleaved": 2}[self.packed],
                                       X_TMA=self.x_tma, X_STAGES=self.stages if self.x_tma else 1,
                                       ROTATE=self.rotate, num_warps=self.warps)
        return out


def compile_for_sm90(H: int, I: int, tokens: int, bk: int = 128, stages: int = 4, x_tma: bool = False,
                     packed: int = 0, warps: int = 4, grid: int = 132, rotate: bool = False):
    """Compile the kernel for Hopper without a GPU (Triton's interpreter has no Gluon): run with TRITON_INTERPRET
    unset. Returns (PTX, bytes of shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    mp = max(8, -(-tokens // 8) * 8)
    box = gl.NVMMASharedLayout.get_default_for([ROWS, bk], gl.bfloat16)
    descs = {"wgu_desc": TensorDescriptor.from_tensor(torch.empty(2 * I, H, dtype=torch.bfloat16), [ROWS, bk], box),
             "wd_desc": TensorDescriptor.from_tensor(torch.empty(H, I, dtype=torch.bfloat16), [ROWS, bk], box),
             "x_desc": TensorDescriptor.from_tensor(torch.empty(tokens, H, dtype=torch.bfloat16), [mp, bk],
                                                    gl.NVMMASharedLayout.get_default_for([mp, bk], gl.bfloat16))}
    np2 = max_pieces(H // (2 * ROWS), I // bk, grid)
    sig = {"x_ptr": "*bf16", "act_ptr": "*bf16", "out_ptr": "*bf16", "ws1_ptr": "*fp32", "ss1_ptr": "*fp32",
           "ws2_ptr": "*fp32", "p_count": "*i32", **{k: mangle_type(v) for k, v in descs.items()}, "M": "i32",
           "eps": "fp32", "trace_ptr": "*i64", "rot": "i32", "P1": "i32", "P2": "i32"}
    const = dict(H=H, I=I, MP=mp, BK=bk, STAGES=stages, NP1=max_pieces(I // ROWS, H // bk, grid), NP2=np2,
                 RB2=min(ROWS, 8192 // (np2 * mp)), TRACE=False, DIAG=0, PACKED=packed, X_TMA=x_tma,
                 X_STAGES=stages if x_tma else 1, ROTATE=rotate, num_warps=warps)
    sig.update({k: "constexpr" for k in const})
    src = GluonASTSource(gluon_mlp_kernel, sig, const, {(i,): [["tt.divisibility", 16]] for i in range(7)})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return kernel.asm["ptx"], kernel.metadata.shared


STAMPS = {0: "start", 1: "gate/up done", 2: "barrier 1", 3: "SwiGLU done", 4: "barrier 2", 5: "down done",
          6: "barrier 3", 7: "end", 8: "producer start", 9: "producer gate/up issued", 10: "producer down issued"}


def scheme_options(scheme: str) -> dict:
    parts = scheme.split("+")
    assert parts[0] in ("rowmajor", "packed", "interleaved") and set(parts[1:]) <= {"scramble", "xtma", "w8", "rot"}, \
        f"unknown scheme {scheme}"
    assert not (parts[0] == "interleaved" and "scramble" in parts), "interleaved shares are not scrambled"
    return dict(packed={"rowmajor": False, "packed": True, "interleaved": "interleaved"}[parts[0]],
                scramble="scramble" in parts, x_tma="xtma" in parts, warps=8 if "w8" in parts else 4,
                rotate="rot" in parts)


def phase_trace(mlps, x):
    """One launch with timestamps (its weights last read a launch earlier than the other copy's): each stamp's
    median and max over the programs, us after the earliest start. ``mlps``: one variant over two weight copies."""
    grid = mlps[0].grid
    traces = [torch.zeros(grid, 16, dtype=torch.int64, device=x.device) for _ in range(4)]
    for trace, rot in zip(traces, (0, 0, 0, grid // 2)):
        mlps[0](x)
        mlps[1](x, trace=trace, rot=rot)
    torch.cuda.synchronize()
    ts = [(tr[:, :len(STAMPS)] - tr[:, 0].min()).double() / 1e3 for tr in traces]
    t = ts[2]
    out = {name: (float(t[:, j].median()), float(t[:, j].max())) for j, name in STAMPS.items()}
    # is a program's gate/up time a property of its SM (the same programs slow in every launch) or chance?
    a, b = ts[1][:, 1] - ts[1][:, 0], ts[2][:, 1] - ts[2][:, 0]
    out["gate/up time, corr. between launches"] = (float(torch.corrcoef(torch.stack([a, b]))[0, 1]), 0.0)
    # the fourth launch gave program i the share of program i + grid/2: do the slow ones follow the SM or the share?
    c = ts[3][:, 1] - ts[3][:, 0]
    share = torch.arange(grid, device=c.device)
    by_share = torch.empty_like(c)
    by_share[(share + grid // 2) % grid] = c
    corr = [float(torch.corrcoef(torch.stack([b, other]))[0, 1]) for other in (c, by_share)]
    out["same, shifted shares: corr. by program / by share"] = tuple(corr)
    return out


def mlp_reference(x, gate_up_w, down_w, eps=1e-6):
    from fastdllm_kernels.linear.reference import fused_linear_ref
    act = fused_linear_ref(x, gate_up_w, row_rms=True, eps=eps, swiglu=True)
    return fused_linear_ref(act, down_w, residual=x)


def shipped_mlp(x, gate_up_w, down_w, sms, eps=1e-6):
    """What the triton backend runs for a decode layer's MLP (ops_triton: norm_swiglu, then linear_residual)."""
    from fastdllm_kernels.linear.dispatch import linear
    act = linear(x, gate_up_w, row_rms=True, eps=eps, swiglu=True, num_sms=sms)
    return linear(act, down_w, residual=x, num_sms=sms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--tokens", default="8,32")
    ap.add_argument("--bk", default="128,64")
    ap.add_argument("--stages", default="4,6")
    ap.add_argument("--schemes", "--layouts", default="rowmajor,packed", help="comma-separated; each rowmajor "
                    "(the weights as stored), packed (box by box in unit order, pack_units) or interleaved (packed, "
                    "the "
                    "programs' shares interleaved unit by unit), optionally with "
                    "+scramble (tiles read in a scrambled order), +xtma (activation tiles by TMA), +w8 (8 consumer "
                    "warps; 16 tokens or more), +rot (each share walked from a different K chunk)")
    ap.add_argument("--x-same", type=int, default=0, help="1: also time the best variant with every unit reading "
                    "x's first chunk (a wrong result: what the activation loads cost)")
    ap.add_argument("--diag", default="", help="comma-separated DIAG masks (2: no sums of squares, 4: no MMAs, ...) "
                    "to time with the best variant - timing only, wrong results")
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    command = "python bench/gluon_mlp.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth_gbs()
    print(f"{'shape':5} {'tok':>3} {'floor':>7} {'shipped':>8} {'gluon':>8}   us per layer; gluon's (bk, stages)")
    for shape, tokens in itertools.product(args.shapes.split(","), map(int, args.tokens.split(","))):
        f = SHAPES[shape]
        H, I = f["hidden_size"], f["intermediate_size"]
        nbytes = 3 * H * I * 2
        copies = copies_beyond_l2(nbytes, at_least=2)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        ws = [(torch.randn(2 * I, H, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.02,
               torch.randn(H, I, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
        x = torch.randn(tokens, H, device=DEVICE, generator=gen, dtype=torch.bfloat16)
        floor_us = nbytes / bw / 1e3
        ref = mlp_reference(x, *ws[0]).float()
        ship = shipped_mlp(x, *ws[0], sms).float()
        scale = ref.abs().max().item()
        ship_err = (ship - ref).abs().max().item() / scale
        t_ship = rotating_graph_ms(lambda i: shipped_mlp(x, *ws[i], sms), copies, reps=3, iters=15) * 1e3
        timed, errs = {}, {}
        kept = {}                 # scheme -> (us, built variant): the best of each, reused for its trace and diags
        for bk, stages, scheme in itertools.product(map(int, args.bk.split(",")), map(int, args.stages.split(",")),
                                                    args.schemes.split(",")):
            if (stages * 2 * ROWS + 2 * 32 + ("xtma" in scheme) * stages * 32) * bk * 2 > 220 * 1024 or \
                    ("w8" in scheme and tokens < 16):
                continue
            key = f"{bk},{stages},{scheme}"
            try:
                mlps = [GluonMLP(gu, d, tokens, sms, bk=bk, stages=stages, **scheme_options(scheme)) for gu, d in ws]
                out = mlps[0](x).float()
                torch.cuda.synchronize()
                err = (out - ref).abs().max().item() / scale
                again = mlps[0](x).float()
                assert torch.equal(out, again), "two calls differ (the reduction must be deterministic)"
                assert int(mlps[0].count.sum()) == 0, "the barrier counts were not reset"
                assert err <= 4 * ship_err + 1e-3, f"max error {err:.2e} of the output scale (shipped {ship_err:.2e})"
                errs[key] = err
                outs = [torch.empty_like(x) for _ in range(copies)]
                timed[key] = rotating_graph_ms(lambda i: mlps[i](x, outs[i]), copies, reps=3, iters=15) * 1e3
                if scheme not in kept or timed[key] < kept[scheme][0]:
                    kept[scheme] = (timed[key], mlps)
            except Exception as e:  # noqa: BLE001 - a variant this Triton cannot build or that is wrong: report
                print(f"  {shape} {tokens} {key}: {type(e).__name__}: "
                      + " | ".join(str(e).splitlines()[-12:])[:1500], flush=True)
            finally:
                mlps = None
                torch.cuda.synchronize()
        best = min(timed, key=timed.get) if timed else None
        traces = {scheme: phase_trace(built, x) for scheme, (_, built) in kept.items()}
        diags = ([1] if args.x_same else []) + [int(d) for d in args.diag.split(",") if d]
        if best and diags:
            probe = kept[best.split(",")[2]][1]
            for diag in diags:
                name = "x_same (timing only)" if diag == 1 else f"diag {diag} (timing only)"
                timed[name] = rotating_graph_ms(lambda i: probe[i](x, diag=diag), copies, reps=3, iters=15) * 1e3
        kept = probe = None
        record("gluon_mlp", shape=shape, tokens=tokens, mlp_bytes=nbytes, floor_us=floor_us, copy_GBps=bw,
               shipped_us=t_ship, gluon_us=timed, max_rel_err=errs, shipped_max_rel_err=ship_err, trace_us=traces,
               command=command)
        print(f"{shape:5} {tokens:3} {floor_us:7.1f} {t_ship:8.1f} "
              + (f"{timed[best]:8.1f}   ({best}); all {timed}; err {errs[best]:.1e} (shipped {ship_err:.1e})"
                 if best else f"{'-':>8}"), flush=True)
        for scheme, trace in traces.items():
            print(f"      {scheme}: where the time goes, us from the first start (median / max over programs): "
                  + ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in trace.items()), flush=True)


if __name__ == "__main__":
    main()
