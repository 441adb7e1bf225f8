"""Independent checks that pin three things nothing else pinned (each was once mutated and
survived the whole suite):

* the cost model (sparsedsl/shapes.py): FLOPs and KV bytes recounted from the reference's
  own block masks and cache, not from the sympy formulas;
* the graph's causality check (sparsedsl/graph.py): a planted visit from the future must be
  reported, so the check is shown able to fail;
* the meaning of `age` (DESIGN: age = (t+1)*c - 1 - f after chunk t is committed): pinned on
  hand-computed rollouts, through the float64 reference and through the torch RolloutCache.
"""
import pytest
import sympy
import torch

import sparsedsl as sd
from sparsedsl import graph as sdgraph
from sparsedsl import reference
from sparsedsl.explain import explain
from sparsedsl.layout import VideoLayout
from sparsedsl.schedule import dtype_bytes
from sparsedsl.testing import chunk_tensors
from sparsedsl.update import age

from codegen.program import PBSAProgram


# ---------------------------------------------------------------------------------------
# 1. cost model: FLOPs and KV bytes from the visited blocks
# ---------------------------------------------------------------------------------------
def _cost_patterns():
    lay = VideoLayout(4, 6, (2, 3), 2)            # 4 blocks of 6 tokens per frame
    odd = VideoLayout(5, 5, (2, 3), 1)            # partial edge tiles: padded blocks
    return {
        "sink-persistent-topk": sd.Pattern(lay, sink=sd.Sink(1), persistent=sd.Persistent(3),
                                           window=sd.LocalWindow(2, sd.Radius(1, 1, 1) | sd.TopK(k=2)),
                                           update=sd.Update(), name="a"),
        "dense-causal": sd.Pattern(lay, name="b"),
        "window-causal-current": sd.Pattern(odd, sink=sd.Sink(2), window=sd.LocalWindow(2, sd.Radius(1, 0, 1)),
                                            current=sd.Causal(), name="c"),
        "topk-only": sd.Pattern(lay, window=sd.LocalWindow(3, sd.TopK(k=3)), name="d"),
    }


STEPS = 6


@pytest.mark.parametrize("name", list(_cost_patterns()))
def test_flops_and_kv_bytes_match_an_independent_count(name):
    """FLOPs: shapes.py documents `flops_per_block_visit` as 4 * BT^2 * D per head (QK^T and PV,
    2 FLOPs per multiply-add, padding slots included), and `flops(T)` as the forward of all
    heads, one layer, one video, over the steps that generate T frames. Count the visited
    (query block, key block) pairs of every head in the reference's block mask instead.
    KV bytes: count the blocks the reference's cache holds after T frames, times K and V of
    BT x D in the dtype, over every KV head."""
    schedule = sd.lower(_cost_patterns()[name], num_heads=4, num_kv_heads=2, head_dim=8,
                        dtype="bfloat16")
    s = schedule.shapes
    lay = schedule.layout
    bt, d, c = lay.block_tokens, schedule.head_dim, lay.chunk_frames
    per_pair = 4 * bt * bt * d                    # one query block x one key block, one head
    per_block_bytes = 2 * bt * d * dtype_bytes(schedule.dtype)
    state = reference.new_state(schedule, 1)
    flops = dense_flops = 0
    for step, (q, k, v) in enumerate(chunk_tensors(schedule, 1, seed=11, steps=STEPS)):
        mask = reference.allowed_blocks(schedule, state, q)       # [1, H, chunk_blocks, keys]
        pairs = int(mask.sum())
        assert pairs * per_pair == s.total_visits_at(step) * s.flops_per_block_visit * s.num_heads
        assert int(mask[0].sum(-1).max()) == s.max_visits_at(step)
        flops += pairs * per_pair
        # block-causal dense attention: every block of every earlier frame and the whole chunk
        dense_flops += schedule.num_heads * lay.chunk_blocks * (step + 1) * lay.chunk_blocks * per_pair
        state = reference.commit(schedule, state, q, k, v)
        frames = (step + 1) * c
        assert s.flops(frames) == flops, f"FLOPs to generate {frames} frames"
        assert s.flops(frames, dense=True) == dense_flops
        held = sum(len(state.kv[(0, g)]) for g in range(schedule.num_kv_heads))
        assert s.kv_bytes(frames) == held * per_block_bytes, f"KV bytes after {frames} frames"
        assert s.kv_bytes(frames) == state.nbytes(schedule.dtype)
        assert s.kv_bytes(frames, dense=True) == frames * lay.blocks_per_frame * schedule.num_kv_heads \
            * per_block_bytes
    steady = s.steady_state_flops_per_step()
    if steady is not None:                        # bounded patterns: the last step is steady
        assert steady == pairs * per_pair
    # a horizon that is not a whole number of chunks still runs the whole last chunk
    if c > 1:
        assert s.flops(STEPS * c - 1) == flops


def test_flops_constant_follows_the_documented_convention():
    schedule = sd.lower(sd.presets.get("sparse-forcing"), num_heads=2, head_dim=16)
    bt = schedule.layout.block_tokens
    assert schedule.shapes.flops_per_block_visit == 4 * bt * bt * 16
    assert schedule.shapes.bytes_per_block == 2 * bt * 16 * dtype_bytes(schedule.dtype)


# ---------------------------------------------------------------------------------------
# 2. causality: the check must be able to fail
# ---------------------------------------------------------------------------------------
def _plant(monkeypatch, at_step, query_block, key_of):
    """Make `possible_segments` claim one extra window block `key_of(step, schedule)`."""
    real = sdgraph.possible_segments

    def planted(schedule, step, qb):
        segments = real(schedule, step, qb)
        if step == at_step and qb == query_block:
            segments = dict(segments)
            segments["window"] = set(segments["window"]) | {key_of(step, schedule)}
        return segments

    monkeypatch.setattr(sdgraph, "possible_segments", planted)


def _small(current=sd.Dense()):
    return sd.lower(sd.Pattern(VideoLayout(4, 6, (2, 3), 2), sink=sd.Sink(1),
                               persistent=sd.Persistent(3),
                               window=sd.LocalWindow(2, sd.Radius(1, 1, 1) | sd.TopK(k=2)),
                               current=current, update=sd.Update()),
                    num_heads=2, head_dim=4)


@pytest.mark.parametrize("current", [sd.Dense(), sd.Causal()])
def test_causality_check_passes_real_schedules(current):
    _, report = sdgraph.block_graph(_small(current))
    assert report.causal and report.ok, report.problems


def test_causality_check_rejects_a_block_from_a_later_chunk(monkeypatch):
    schedule = _small()
    cb = schedule.layout.chunk_blocks
    # at step 1, query block 0 "may attend" the first block of chunk 2 (the future)
    _plant(monkeypatch, 1, 0, lambda step, s: (step + 1) * cb)
    _, report = sdgraph.block_graph(schedule, steps=3)
    assert not report.causal and not report.ok
    assert any("from the future" in p for p in report.problems)
    assert "causal (nothing from the future): NO" in explain(schedule, {"t": 6})


def test_causality_check_rejects_a_later_frame_of_the_chunk_when_current_is_causal(monkeypatch):
    nb = VideoLayout(4, 6, (2, 3), 2).blocks_per_frame
    # at step 1, query block 0 (frame 2) "may attend" block nb of its own chunk (frame 3)
    key = lambda step, s: step * s.layout.chunk_blocks + nb
    _plant(monkeypatch, 1, 0, key)
    _, report = sdgraph.block_graph(_small(sd.Causal()), steps=3)
    assert not report.causal
    assert any("from the future" in p for p in report.problems)
    # the same edge is legal when the current chunk is dense
    _, report = sdgraph.block_graph(_small(sd.Dense()), steps=3)
    assert report.causal, report.problems


# ---------------------------------------------------------------------------------------
# 3. age, on hand-computed rollouts
# ---------------------------------------------------------------------------------------
# Layout: 1 block per frame (one 2x2 tile), chunks of c = 2 frames, no sink, a 2-frame window,
# capacity 1. Committing chunk t (t >= 1) evicts frames 2t-2 and 2t-1 (blocks = frames), and
# age = (t+1)*c - 1 - f = 2t + 1 - f. So at t = 1 the candidates are frame 0 (age 3) and frame 1
# (age 2); at t = 2: the kept block, frame 2 (age 3) and frame 3 (age 2); and so on.
C_FRAMES = 2


def _age_program(score):
    pattern = sd.Pattern(VideoLayout(2, 2, (2, 2), C_FRAMES), persistent=sd.Persistent(1),
                         window=sd.LocalWindow(2, sd.Radius(1, 0, 0)), update=sd.Update(score),
                         name="age")
    schedule = sd.lower(pattern, num_heads=1, head_dim=4, dtype="float32")
    return PBSAProgram(schedule, backend="torch")


def _age(step, frame):
    return (step + 1) * C_FRAMES - 1 - frame


# score -> {step: (block kept after committing chunk `step`, its score)}
AGE_CASES = {
    # keep the oldest: frame 0 forever; its score is its age 2t + 1
    "age": (age, {1: (0, 3.0), 2: (0, 5.0), 3: (0, 7.0), 4: (0, 9.0)}),
    # keep the youngest evicted: frame 2t - 1, whose age is always 2
    "-age": (-age, {1: (1, -2.0), 2: (3, -2.0), 3: (5, -2.0), 4: (7, -2.0)}),
    # prefer age exactly 3: frame 2t - 2 (age 3) wins over the older kept block (age 5, 7, ...)
    # and over frame 2t - 1 (age 2); an off-by-one age keeps a different block at once
    "-(age-3)^2": (-(age - 3) ** 2, {1: (0, 0.0), 2: (2, 0.0), 3: (4, 0.0), 4: (6, 0.0)}),
}


def test_age_formula_by_hand():
    assert [_age(1, f) for f in (0, 1)] == [3, 2]
    assert [_age(2, f) for f in (0, 2, 3)] == [5, 3, 2]


@pytest.mark.parametrize("name", list(AGE_CASES))
def test_age_in_the_reference_and_the_rollout_cache(name):
    score, expected = AGE_CASES[name]
    program = _age_program(score)
    schedule = program.schedule
    assert schedule.capacity == 1 and schedule.blocks_per_frame == 1
    cache = program.new_cache(1, 1, "cpu", torch.float32)
    state = reference.new_state(schedule, 1)
    chunks = [tuple(x.float().double() for x in c) for c in chunk_tensors(schedule, 1, 5, 5)]
    for step, (q, k, v) in enumerate(chunks):
        state = reference.commit(schedule, state, q, k, v)
        cache.commit(0, q.float(), k.float(), v.float())
        got_ref = state.persistent[(0, 0)]
        got_cache = cache.persistent_sets(0)[(0, 0)]
        if step == 0:               # nothing has left the window yet
            assert got_ref == {} and got_cache == {}
            continue
        block, value = expected[step]
        assert got_ref == {block: pytest.approx(value, abs=1e-12)}, f"reference, step {step}"
        assert set(got_cache) == {block}, f"rollout cache, step {step}: {got_cache}"
        assert got_cache[block] == pytest.approx(value, abs=1e-6), f"rollout cache, step {step}"
        assert value == float(sympy.sympify(score).subs(age, _age(step, block)))


# ---------------------------------------------------------------------------------------
# 4. exact ties go to the lower block index (update.py: "ties to the lower block index")
# ---------------------------------------------------------------------------------------
# Two blocks per frame (two 2x2 tiles), c = 2, a 2-frame window, score -age: the blocks of one
# frame tie *exactly* (the same age, exactly representable). Committing chunk t (t >= 1) evicts
# frames 2t-2 (blocks 4t-4, 4t-3; age 3) and 2t-1 (blocks 4t-2, 4t-1; age 2); older kept blocks
# have age >= 4. Capacity 1 keeps 4t-2 (not its twin 4t-1); capacity 3 keeps 4t-2, 4t-1 and
# 4t-4 (not its twin 4t-3).
TIE_CASES = {1: lambda t: {4 * t - 2: -2.0},
             3: lambda t: {4 * t - 2: -2.0, 4 * t - 1: -2.0, 4 * t - 4: -3.0}}


@pytest.mark.parametrize("capacity", list(TIE_CASES))
def test_exact_ties_go_to_the_lower_block_index(capacity):
    pattern = sd.Pattern(VideoLayout(2, 4, (2, 2), 2), persistent=sd.Persistent(capacity),
                         window=sd.LocalWindow(2, sd.Radius(1, 1, 1)), update=sd.Update(-age),
                         name="ties")
    schedule = sd.lower(pattern, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32")
    assert schedule.blocks_per_frame == 2
    program = PBSAProgram(schedule, backend="torch")
    cache = program.new_cache(1, 1, "cpu", torch.float32)
    state = reference.new_state(schedule, 1)
    for step, (q, k, v) in enumerate(chunk_tensors(schedule, 1, 3, 5)):
        q, k, v = (x.float() for x in (q, k, v))
        state = reference.commit(schedule, state, q.double(), k.double(), v.double())
        cache.commit(0, q, k, v)
        want = TIE_CASES[capacity](step) if step else {}
        assert state.persistent[(0, 0)] == want, f"reference, step {step}"
        assert cache.persistent_sets(0)[(0, 0)] == want, f"rollout cache, step {step}"
