"""Declare a pattern that is not a preset, explain it, and check it against the float64 reference.

    python examples/custom_pattern.py            # also usable as: sparsedsl explain examples/custom_pattern.py

The pattern: two sink frames, a per-head persistent memory scored by importance with a
decaying bonus for blocks that stayed in memory, a 4-frame window where each query block
sees its own tile column two frames back plus the 4 best-matching other blocks, and a
causal current chunk.
"""
import torch

import sparsedsl as sd
from sparsedsl import reference
from sparsedsl.testing import chunk_tensors

pattern = sd.Pattern(
    layout=sd.VideoLayout(height=30, width=52, tile=(8, 8), chunk_frames=3),
    sink=sd.Sink(frames=2),
    persistent=sd.Persistent(capacity=48, shared_heads=False),
    window=sd.LocalWindow(frames=4, neighborhood=sd.Radius(t=2, h=4, w=0) | sd.TopK(k=4)),
    current=sd.Causal(),
    update=sd.Update(score=sd.stat.importance + 0.5 * sd.stat.previous - 0.01 * sd.stat.age),
    name="column-memory",
)


def check_small(steps: int = 4) -> None:
    """The same declaration on a tiny layout, checked step by step against the reference."""
    small = sd.Pattern(sd.VideoLayout(6, 10, (4, 4), 3), sink=pattern.sink,
                       persistent=sd.Persistent(4, shared_heads=False), window=pattern.window,
                       current=pattern.current, update=pattern.update, name="column-memory-small")
    schedule = sd.lower(small, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
    state = reference.new_state(schedule, batch=1)
    for step, (q, k, v) in enumerate(chunk_tensors(schedule, 1, seed=0, steps=steps)):
        out, _, block_mask = reference.attention(schedule, state, q, k, v)
        visits = block_mask.sum(-1)
        assert int(visits.max()) == schedule.shapes.max_visits_at(step)
        state = reference.commit(schedule, state, q, k, v)
        assert state.nbytes("float32") == schedule.shapes.kv_bytes(state.step * 3)
        print(f"step {step}: visits per query block {int(visits.min())}..{int(visits.max())}, "
              f"memory of head 0: {sorted(state.persistent[(0, 0)])}, output norm {out.norm():.3f}")
    print("small layout: schedule bound and KV bytes match the reference at every step")


if __name__ == "__main__":
    program = sd.compile(pattern, num_heads=12, num_kv_heads=4, head_dim=128, backend="reference")
    print(program.explain())
    print()
    check_small()
