"""The lowering against the definition: visits, bounds, FLOPs and KV bytes over random rollouts."""
import torch
from hypothesis import given

from sparsedsl import reference
from sparsedsl.testing import rollouts


def _check_step(schedule, state, block_mask, step):
    lay = schedule.layout
    group = schedule.num_heads // schedule.num_kv_heads
    n_keys = (step + 1) * lay.chunk_blocks
    counts = []
    for b in range(state.batch):
        for h in range(schedule.num_heads):
            g = h // group
            per_head_total = 0
            for qb in range(lay.chunk_blocks):
                allowed = set(torch.nonzero(block_mask[b, h, qb]).flatten().tolist())
                if schedule.window.split.mode != "intersection":
                    # union (or static only): every static window block is attended
                    static = set(schedule.static_window_blocks(step, qb))
                    assert static <= allowed, "a static window block is not attended"
                candidates = set(schedule.topk_candidates(step, qb))
                picks = sorted(allowed & candidates)
                # the reference's dynamic picks are candidates of the schedule, as many as it says
                assert len(picks) == schedule.topk_count(step, qb)
                visits = schedule.visits(step, qb, sorted(state.persistent[(b, g)]), picks)
                assert len(visits) == len(set(visits)), "a block is visited twice"
                assert set(visits) == allowed
                fq = step * lay.chunk_frames + qb // lay.blocks_per_frame
                for kb in visits:
                    assert kb < n_keys, "a visit from the future"
                    if schedule.current == "causal":
                        assert lay.block_coords(kb)[0] <= fq
                counts.append(len(visits))
                per_head_total += len(visits)
            assert per_head_total == schedule.shapes.total_visits_at(step)
    bound = schedule.shapes.max_visits_at(step)
    assert max(counts) <= bound
    assert max(counts) == bound, "the sympy bound is attained by every rollout"


@given(rollouts())
def test_schedule_visits_equal_reference_mask(case):
    schedule = case.schedule
    state = reference.new_state(schedule, case.batch)
    for step, (q, k, v) in enumerate(case.chunks):
        block_mask = reference.allowed_blocks(schedule, state, q)
        _check_step(schedule, state, block_mask, step)
        state = reference.commit(schedule, state, q, k, v)
        frames = state.step * schedule.chunk_frames
        assert state.nbytes(schedule.dtype) == schedule.shapes.kv_bytes(frames) * case.batch


@given(rollouts())
def test_persistent_memory_invariants(case):
    schedule = case.schedule
    nb = schedule.blocks_per_frame
    state = reference.new_state(schedule, case.batch)
    for q, k, v in case.chunks:
        before = {key: set(p) for key, p in state.persistent.items()}
        state = reference.commit(schedule, state, q, k, v)
        w_start, w_end = schedule.window_frames_range(state.step)
        for (b, g), memory in state.persistent.items():
            assert len(memory) <= schedule.capacity
            for kb in memory:
                frame = kb // nb
                assert schedule.sink_frames <= frame < w_start, "memory overlaps sink or window"
                assert kb in state.kv[(b, g)], "a persistent block lost its K/V"
            evicted = set(range(*[f * nb for f in schedule.evicted_frames(state.step - 1)]))
            assert set(memory) <= before[(b, g)] | evicted
            if schedule.update is not None and schedule.update.shared_heads:
                assert memory == state.persistent[(b, 0)]
