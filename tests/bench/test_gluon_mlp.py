"""bench/gluon_mlp.py's host-side bookkeeping (weight packing, stream-K pieces, the tile scramble) against brute
force, and its Gluon kernel compiled for Hopper on the CPU (no Gluon interpreter exists; the numerical check
against the PyTorch reference runs inside the script on the GPU, before every timing)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

# Only a Triton without Gluon's Hopper API (older than 3.5; CI installs 3.9) skips this file; the script itself is
# imported plainly, so an error in it fails here instead of skipping.
hopper = pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper",
                             reason="this Triton has no Gluon (3.5 or newer has; CI installs 3.9)")
if not hasattr(hopper, "warpgroup_mma_wait"):
    pytest.skip("this Triton's Gluon has no warpgroup_mma_wait (3.5 or newer has)", allow_module_level=True)
sys.path.insert(0, os.path.join(REPO, "bench"))
import gluon_mlp as gm  # noqa: E402

RELEASED = {"7B": (3584, 18944), "1.5B": (1536, 8960)}


@pytest.mark.parametrize("interleave, rotate", [(0, False), (5, False), (5, True)])
def test_pack_units_puts_each_unit_where_the_producer_reads_it(interleave, rotate):
    H, I, bk = 256, 384, 128
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(2 * I, H, generator=gen), torch.randn(H, I, generator=gen)
    packed_gu, packed_d = gm.pack_units(gate_up, down, bk, interleave, rotate)

    def gate_up_boxes(t, k):
        cols = slice(k * bk, k * bk + bk)
        return gate_up[t * 64:t * 64 + 64, cols], gate_up[I + t * 64:I + t * 64 + 64, cols]

    def down_boxes(t, k):
        cols = slice(k * bk, k * bk + bk)
        return down[t * 128:t * 128 + 64, cols], down[t * 128 + 64:t * 128 + 128, cols]

    for packed, ks, boxes in ((packed_gu, H // bk, gate_up_boxes), (packed_d, I // bk, down_boxes)):
        n = (packed_gu.shape[0] if packed is packed_gu else packed_d.shape[0]) // 128
        units = (2 * I // 128 if packed is packed_gu else H // 128) * ks
        per = -(-units // interleave) if interleave else units
        for u in range(units):
            t, k = divmod(u, ks)
            p, lo = u // per, (u // per) * per
            length = min(per, units - lo)
            r = ((p - lo) % ks) % length if rotate else 0              # _rotation: the walk starts at lo + r
            slot = ((u - lo - r) % length) * interleave + p if interleave else u    # the producer's j * G + pid
            assert slot < n
            first, second = boxes(t, k)
            assert torch.equal(packed[slot * 128:slot * 128 + 64], first)
            assert torch.equal(packed[slot * 128 + 64:slot * 128 + 128], second)


@pytest.mark.parametrize("shape", sorted(RELEASED))
@pytest.mark.parametrize("bk", [64, 128])
def test_stream_k_pieces_match_a_walk_over_the_shares(shape, bk):
    H, I = RELEASED[shape]
    G = 132
    for n_tiles, ks in ((I // 64, H // bk), (H // 128, I // bk)):
        n = n_tiles * ks
        per = -(-n // G)
        touched = {}                                     # tile -> programs whose share has one of its units
        segments = 0
        for p in range(G):
            tiles = sorted({u // ks for u in range(p * per, min(p * per + per, n))})
            segments = max(segments, len(tiles))
            for t in tiles:
                touched.setdefault(t, []).append(p)
        assert gm.max_segments(n_tiles, ks, G) == segments <= gm.MAX_SEGS.value
        most = max(len(ps) for ps in touched.values())
        assert gm.max_pieces(n_tiles, ks, G) == 1 << (most - 1).bit_length()
        for t, ps in touched.items():                   # what _pieces computes in the kernel
            assert ps == list(range((t * ks) // per, ((t + 1) * ks - 1) // per + 1))


@pytest.mark.parametrize("n", [12, 28, 140, 296])
def test_the_scramble_visits_every_tile_once(n):
    p = gm.scramble_step(n)
    assert sorted((t * p) % n for t in range(n)) == list(range(n)) and 0.5 * n < p < 0.75 * n


def test_the_kernel_compiles_for_hopper_with_warpgroup_mma_and_tma():
    code = ("import json, sys; sys.path.insert(0, 'bench'); import gluon_mlp as gm\n"
            "out = {}\n"
            "for name, kw in [('7B_32_interleaved_xtma', dict(H=3584, I=18944, tokens=32, x_tma=True, packed=2)),\n"
            "                 ('1.5B_8_rowmajor', dict(H=1536, I=8960, tokens=8))]:\n"
            "    ptx, shared = gm.compile_for_sm90(**kw)\n"
            "    mma = [line.split()[0] for line in ptx.splitlines() if 'wgmma.mma_async' in line]\n"
            "    out[name] = dict(shared=shared, wgmma=mma,\n"
            "                     tma=ptx.count('cp.async.bulk.tensor'), waits=ptx.count('wgmma.wait_group'))\n"
            "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    big, small = out["7B_32_interleaved_xtma"], out["1.5B_8_rowmajor"]
    # two boxes x (128 / 16) k-steps x two matmul phases; the tokens are the MMA's N
    assert big["wgmma"] == ["wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16"] * 32, big
    assert small["wgmma"] == ["wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16"] * 32, small
    assert big["tma"] > small["tma"] > 0 and big["waits"] >= 2, (big, small)   # + the activation tile by TMA
    assert max(big["shared"], small["shared"]) <= 227 * 1024
