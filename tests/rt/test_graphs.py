"""Which batch layouts hold a CUDA graph (fastdllm_rt/graphs.py: CaptureSchedule), and - on a GPU - that a
runner evicting graphs keeps generating what the torch backend generates."""
import pytest
import torch

import fastdllm_rt
from fastdllm_rt.graphs import CaptureSchedule
from tests.helpers.checkpoints import TINY_IDS, make_checkpoint


def _step(schedule: CaptureSchedule, sig) -> str:
    """What the runner does for one forward of layout ``sig``: replay, capture (then replay) or run eagerly."""
    if schedule.get(sig) is not None:
        return "replay"
    if schedule.admit(sig):
        schedule.hold(sig, object())
        return "capture"
    return "eager"


def test_a_layout_is_captured_the_second_time_it_is_seen():
    s = CaptureSchedule(max_graphs=4)
    assert [_step(s, "sub") for _ in range(4)] == ["eager", "capture", "replay", "replay"]
    assert list(s.held) == ["sub"]


def test_one_off_layouts_take_no_graph_and_their_sightings_are_bounded():
    s = CaptureSchedule(max_graphs=4, max_sightings=8)
    assert {_step(s, ("tail", i)) for i in range(100)} == {"eager"}
    assert not s.held and len(s._sighted) == 8
    assert _step(s, ("tail", 99)) == "capture"           # a recent sighting is still remembered
    assert _step(s, ("tail", 0)) == "eager"              # an old one was forgotten


def test_a_later_call_gets_graphs_when_an_earlier_one_filled_the_budget():
    # a batch of 32 fills the budget; a later batch-1 call's full / sub / commit steps must still get graphs
    # (a budget that keeps whatever came first leaves every step of the later call eager)
    s = CaptureSchedule(max_graphs=32)
    for sig in range(40):
        _step(s, ("b32", sig))
        _step(s, ("b32", sig))
    assert len(s.held) == 32
    s.new_call()                     # the next call: the batch of 32's graphs were replayed one call ago
    assert {_step(s, ("b1", kind)) for _ in range(3) for kind in ("full", "sub", "commit")} == {"eager"}
    s.new_call()                     # the call after: they are stale, and the batch-1 layouts were seen before
    steps = [_step(s, ("b1", kind)) for _ in range(3) for kind in ("full", "sub", "commit")]
    assert steps == ["capture"] * 3 + ["replay"] * 6
    assert len(s.held) == 32 and all(("b1", k) in s.held for k in ("full", "sub", "commit"))
    assert ("b32", 3) in s.held and ("b32", 2) not in s.held    # the least recently replayed went first


def test_a_call_cycling_through_more_layouts_than_the_budget_does_not_recapture():
    # a block's steps pass through more layouts than the budget holds, again and again within one call: the
    # held graphs stay (the extra layouts run eagerly) - evicting the least recently used would recapture at
    # every step of the cycle
    s = CaptureSchedule(max_graphs=32)
    cycle = [("step", i) for i in range(34)]
    first = [_step(s, sig) for _ in range(8) for sig in cycle]
    assert first.count("capture") == 32 and first[-34:].count("replay") == 32
    s.new_call()                                         # the next call with the same layouts
    second = [_step(s, sig) for _ in range(8) for sig in cycle]
    assert second.count("capture") == 0 and second.count("eager") == 2 * 8


def test_a_graph_replayed_in_this_or_the_last_call_is_not_evicted():
    s = CaptureSchedule(max_graphs=2)
    for sig in ("a", "a", "b", "b"):
        _step(s, sig)
    assert [_step(s, "c") for _ in range(3)] == ["eager"] * 3     # a and b were replayed in this call
    s.new_call()
    _step(s, "a")
    assert _step(s, "c") == "eager"                      # b was replayed in the call before
    s.new_call()
    _step(s, "a")                                        # a replayed in every call: b is the stale one
    assert _step(s, "c") == "capture" and list(s.held) == ["a", "c"]


def test_a_lowered_budget_is_kept_from_the_next_capture_on():
    s = CaptureSchedule(max_graphs=4)
    for sig in "aabbccdd":
        _step(s, sig)
    s.max_graphs = 2
    s.new_call()
    s.new_call()                                         # a..d are stale now
    assert [_step(s, "e") for _ in range(2)] == ["eager", "capture"] and list(s.held) == ["d", "e"]


def test_a_batch_whose_rows_drift_apart_keeps_its_graphs_across_calls():
    # the same call twice: a core of layouts every few steps, and many that come and go (as a batch of 32
    # whose rows finish at different steps passes through): the second call recaptures nothing
    core = [("core", i) for i in range(30)]
    sequence = [sig for round_ in range(10) for sig in core + [("drift", round_, j) for j in range(6)]]
    s = CaptureSchedule(max_graphs=30)
    first = [_step(s, sig) for sig in sequence]
    s.new_call()
    second = [_step(s, sig) for sig in sequence]
    assert first.count("capture") == 30 and second.count("capture") == 0
    assert second.count("replay") == 300 and second.count("eager") == 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the schedule is tested above)")
def test_generations_stay_exact_while_graphs_are_evicted(tmp_path):
    folder = make_checkpoint(str(tmp_path), seed=3, layers=2, hidden=64, heads=4, kv_heads=2, inter=96)
    ref = fastdllm_rt.load(folder, backend="torch", device="cuda", dtype="fp32", **TINY_IDS)
    tri = fastdllm_rt.load(folder, backend="triton", device="cuda", dtype="fp32", **TINY_IDS)
    g = torch.Generator().manual_seed(4)
    # the first batch needs the most slots and the longest rows: the caches it pools serve the second as well
    batches = [[torch.randint(0, 500, (n,), generator=g).tolist() for n in lens] for lens in ((70, 9), (40,))]
    want = [ref.generate(p, max_new_tokens=48, use_block_cache=True) for p in batches]
    assert tri.generate(batches[0], max_new_tokens=48, use_block_cache=True).tokens == want[0].tokens
    caches = tri.pool.caches                             # pooled: the calls below reuse them and their runner
    (runner,) = tri.pool.runners.values()
    runner.schedule.max_graphs = 2                       # far fewer than the layouts these calls pass through,
    runner.schedule.keep_calls = 1                       # and any graph not replayed in this call may go
    captures = runner.captures
    for _ in range(2):
        for prompts, expect in zip(batches, want):
            got = tri.generate(prompts, max_new_tokens=48, use_block_cache=True)
            assert got.tokens == expect.tokens
    assert tri.pool.caches is caches and len(runner.graphs) <= 2
    assert runner.captures > captures and runner.replays > 0        # graphs were evicted, recaptured, replayed
