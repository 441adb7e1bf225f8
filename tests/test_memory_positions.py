"""attention.memory_positions = "realigned": a compiled pattern's sink and persistent blocks
are moved, at every chunk, to the frame just before the window (models/attention.py). The
pool's keys are checked against RoPE applied from scratch at that frame to the keys that
were committed (an independent reference: rope_angles on the unrotated keys), the window's
keys against their own frame, the key representatives against the mean of the moved keys;
and a rollout equals the absolute one until a block leaves the window."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsedsl as sd
from codegen.memory.rollout_cache import GROWTH_START_CHUNKS
from models.attention import PatternBackend, resolve_pattern
from models.config import ConfigError, load_config
from models.rope import apply_rope, rope_angles, time_shift_angles
from tests.test_model import random_model, run_rollout

CFG = load_config("tiny")
REALIGNED = dataclasses.replace(CFG, attention=dataclasses.replace(
    CFG.attention, memory_positions="realigned"))
# memory (a sink) and an unbounded window: the only kind of pattern whose pool grows along a
# rollout (the cache doubles it), so the realignment's bookkeeping must follow new slots
SINK_MOBA = sd.Pattern(sd.VideoLayout(4, 4, (2, 2), 3), sink=sd.Sink(1),
                       window=sd.LocalWindow(None, sd.TopK(k=2)), name="sink-moba")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 300), st.integers(-50, 300), st.sampled_from([12, 16, 24, 64]))
def test_a_time_shift_moves_rotated_keys_to_another_frame(frame, delta, head_dim):
    """RoPE's rotations compose: shifting keys rotated at `frame` by `delta` frames gives the
    keys rotated at `frame + delta` (time channels moved, rows and columns untouched)."""
    g = torch.Generator().manual_seed(frame * 7 + delta)
    k = torch.randn(2 * 3, head_dim, generator=g)
    cos, sin = rope_angles(torch.tensor([frame]), 2, 3, head_dim)
    want_cos, want_sin = rope_angles(torch.tensor([frame + delta]), 2, 3, head_dim)
    shift_cos, shift_sin = time_shift_angles(torch.full((6,), delta), head_dim)
    moved = apply_rope(apply_rope(k, cos, sin), shift_cos, shift_sin)
    torch.testing.assert_close(moved, apply_rope(k, want_cos, want_sin), rtol=1e-4, atol=1e-4)


def _committed_rollout(steps: int, seed: int = 0, pattern="sparse-forcing"):
    """A PatternCache (realigned) fed `steps` chunks of keys rotated at their own frames, the
    unrotated keys of every frame [B, H, frames, n, D], and the pool's slot count after each
    step."""
    backend = PatternBackend(REALIGNED, resolve_pattern(pattern, REALIGNED))
    # an unbounded window's pool is sized for max_frames up front; without it, it grows
    grows = backend.program.schedule.window.frames is None
    cache = backend.new_cache(2, "cpu", torch.float32, max_frames=None if grows else 3 * steps + 3)
    pool_sizes = []
    c, n, D, H = CFG.video.chunk_frames, CFG.tokens_per_frame, CFG.head_dim, CFG.model.heads
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, H, c * steps, n, D, generator=g)
    for step in range(steps):
        frames = torch.arange(step * c, (step + 1) * c)
        cos, sin = rope_angles(frames, CFG.tokens_h, CFG.tokens_w, D)
        k = apply_rope(raw[:, :, step * c:(step + 1) * c].reshape(2, H, c * n, D), cos, sin)
        q, v = torch.randn(k.shape, generator=g), torch.randn(k.shape, generator=g)
        for layer in range(cache.num_layers):
            cache.attend(layer, q, k, v)            # realigns the memory before the step reads it
            cache.commit(layer, q, k, v)
        pool_sizes.append(cache.cache.tables(0).slot_block.shape[2])
    for layer in range(cache.num_layers):
        cache.attend(layer, q, k, v)                # the next step's realignment
    return backend, cache, raw, pool_sizes


@pytest.mark.parametrize("steps, pattern", [(1, "sparse-forcing"), (3, "sparse-forcing"),
                                            (6, "sparse-forcing"),
                                            (GROWTH_START_CHUNKS + 3, SINK_MOBA)],
                         ids=["1", "3", "6", "grown-pool"])
def test_realigned_memory_sits_just_before_the_window(steps, pattern):
    backend, cache, raw, pool_sizes = _committed_rollout(steps, pattern=pattern)
    s, lay = backend.program.schedule, backend.layout
    D, nb = CFG.head_dim, s.blocks_per_frame
    start = s.window_frames_range(steps)[0]
    moved_blocks = 0
    for layer in range(cache.num_layers):
        tables = cache.cache.tables(layer)
        memory = cache.memory_slots(tables)
        for b in range(2):
            for h in range(CFG.model.heads):
                for slot in range(tables.slot_block.shape[2]):
                    block = int(tables.slot_block[b, h, slot])
                    if block < 0:
                        continue
                    frame, j = divmod(block, nb)
                    at = max(frame, start - 1) if bool(memory[b, h, slot]) else frame
                    moved_blocks += at != frame
                    cos, sin = rope_angles(torch.tensor([at]), CFG.tokens_h, CFG.tokens_w, D)
                    want = lay.to_tile_major(apply_rope(raw[b, h, frame][None, None], cos, sin), 1)
                    BT = lay.block_tokens
                    n_valid = int(tables.slot_valid[b, h, slot])
                    want = want[0, 0, j * BT:j * BT + n_valid]
                    got = tables.k_pool[b, h, slot, :n_valid, :D]
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(tables.k_rep[b, h, slot, :D], want.mean(0),
                                               rtol=1e-4, atol=1e-4)
    if pattern is SINK_MOBA:
        # the pool grew between realignments, and with the whole past in the window nothing
        # has left it: every key, old slot or new, is where it was committed
        assert pool_sizes[-1] > pool_sizes[0], pool_sizes
        assert moved_blocks == 0
        return
    # with 6 chunks of a 3-frame window some memory has been moved; with 1, nothing has left
    assert (moved_blocks > 0) == (steps > 2), moved_blocks


def test_realigned_rollout_equals_absolute_until_a_block_leaves_the_window():
    model = random_model(8)
    absolute = PatternBackend(CFG, resolve_pattern("sparse-forcing", CFG))
    realigned = PatternBackend(REALIGNED, resolve_pattern("sparse-forcing", REALIGNED))
    a, r = (run_rollout(model, backend, 18) for backend in (absolute, realigned))
    s = absolute.program.schedule
    # chunk t is generated at step t; memory is first moved once frames have left the window
    first_moved = next(t for t in range(6) if s.window_frames_range(t)[0] - 1 > 0)
    same = first_moved * CFG.video.chunk_frames
    torch.testing.assert_close(r[:, :same], a[:, :same], rtol=0, atol=0)
    assert not torch.allclose(r[:, same:], a[:, same:])
    assert "realigned" in realigned.describe() and "realigned" not in absolute.describe()


def test_memory_positions_must_be_a_known_mode():
    with pytest.raises(ConfigError, match="attention.memory_positions"):
        load_config("tiny", overrides={"attention.memory_positions": "relative"})
