"""The streaming kernels' loops are software-pipelined when compiled for Hopper - the property their speed rests on
and that a change to a loop body can silently remove (tests/helpers/sm90_pipelining.py). Compiled on the CPU for
sm_90 in a subprocess without the interpreter, from launches captured through the kernels' own wrappers at the
7B's decode (and one scoring) shapes."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def launches() -> dict:
    """Every case's launches, compiled in one subprocess (one torch import): case -> list of reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.helpers.sm90_pipelining"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    out = {}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
            out.setdefault(report.pop("case"), []).append(report)
    return out


@pytest.mark.parametrize("case", ["linear_gate_up_8", "linear_gate_up_32", "linear_down_8", "linear_down_32"])
def test_decode_linear_streams_its_weight_through_pipelined_copies(launches, case):
    (launch,) = launches[case]
    assert launch["kernel"] == "fused_linear_kernel" and launch["num_stages"] >= 2, launch
    assert launch["async_copies"] > 0 and launch["cp_async_ptx"] > 0, launch


@pytest.mark.parametrize("case", ["qkv_rope_7B_8", "qkv_rope_7B_32", "qkv_rope_1.5B_8", "qkv_rope_1.5B_32"])
def test_qkv_projection_with_rope_epilogue_streams_its_weight_through_pipelined_copies(launches, case):
    (launch,) = launches[case]
    assert launch["kernel"] == "qkv_rope_kernel" and launch["num_stages"] >= 2, launch
    assert launch["async_copies"] > 0 and launch["cp_async_ptx"] > 0, launch


def test_swapped_operands_put_the_weight_tile_on_the_warpgroup_mma(launches):
    # the point of swap_ab (kernels/linear/kernel.py): with the weight tile as the left operand (>= 64 rows)
    # Hopper's wgmma reads it from shared memory; tokens as the left operand (8-32 rows) leave mma.sync
    (swapped,), (unswapped,) = launches["linear_down_32_swapped"], launches["linear_down_32_unswapped"]
    assert swapped["wgmma_ptx"] > 0 and swapped["async_copies"] > 0, swapped
    assert unswapped["wgmma_ptx"] == 0 and unswapped["mma_sync_ptx"] > 0, unswapped


def test_the_check_sees_a_loop_left_unpipelined(launches):
    (launch,) = launches["linear_gate_up_8_one_stage"]
    assert launch["async_copies"] == 0 and launch["cp_async_ptx"] == 0, launch


@pytest.mark.parametrize("case", ["decode_attention_32", "decode_attention_8"])
def test_decode_attention_streams_keys_through_pipelined_copies(launches, case):
    split, merge = launches[case]
    assert split["kernel"] == "decode_attention_fwd_kernel" and merge["kernel"] == "decode_attention_combine_kernel"
    assert split["async_copies"] > 0 and split["cp_async_ptx"] > 0, split


def test_prefill_attention_streams_keys_through_pipelined_copies(launches):
    (launch,) = launches["prefill_attention"]
    assert launch["kernel"] == "prefill_attention_fwd_kernel" and launch["async_copies"] > 0, launch
