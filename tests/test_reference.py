"""The float64 reference against plain torch attention and against properties of the definition."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sparsedsl as sd
from sparsedsl import reference
from sparsedsl.testing import chunk_tensors, rollouts


def _sdpa_on_mask(schedule, chunks, step, block_mask):
    """Softmax attention over every key written so far, restricted to the explicit mask."""
    lay = schedule.layout
    group = schedule.num_heads // schedule.num_kv_heads
    q = chunks[step][0]
    K = torch.cat([c[1] for c in chunks[:step + 1]], dim=2).repeat_interleave(group, dim=1)
    V = torch.cat([c[2] for c in chunks[:step + 1]], dim=2).repeat_interleave(group, dim=1)
    key_valid = lay.valid_token_mask((step + 1) * lay.chunk_frames)
    bt = lay.block_tokens
    mask = block_mask.repeat_interleave(bt, -2).repeat_interleave(bt, -1) & key_valid
    q_valid = lay.valid_token_mask(lay.chunk_frames)
    mask = mask | ~q_valid[:, None]  # padded query rows: anything finite, compared separately
    out = F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
    return out, q_valid


@given(rollouts())
def test_reference_equals_torch_softmax_on_the_explicit_mask(case):
    schedule = case.schedule
    state = reference.new_state(schedule, case.batch)
    for step, (q, k, v) in enumerate(case.chunks):
        out, lse, block_mask = reference.attention(schedule, state, q, k, v)
        want, q_valid = _sdpa_on_mask(schedule, case.chunks, step, block_mask)
        torch.testing.assert_close(out[:, :, q_valid], want[:, :, q_valid], rtol=1e-10, atol=1e-10)
        assert bool((out[:, :, ~q_valid] == 0).all())
        assert bool(torch.isneginf(lse[:, :, ~q_valid]).all())
        assert bool(torch.isfinite(lse[:, :, q_valid]).all())
        state = reference.commit(schedule, state, q, k, v)


@settings(max_examples=10)
@given(rollouts(steps=2, max_batch=1))
def test_padding_tokens_are_never_attended(case):
    schedule = case.schedule
    lay = schedule.layout
    pad = ~lay.valid_token_mask(lay.chunk_frames)
    poisoned = []
    for q, k, v in case.chunks:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pad] = float("nan")
        v2[:, :, pad] = 1e30
        poisoned.append((q, k2, v2))
    clean_state = reference.new_state(schedule, case.batch)
    dirty_state = reference.new_state(schedule, case.batch)
    for (q, k, v), (_, k2, v2) in zip(case.chunks, poisoned):
        want, _, _ = reference.attention(schedule, clean_state, q, k, v)
        got, _, _ = reference.attention(schedule, dirty_state, q, k2, v2)
        assert torch.equal(got, want)
        clean_state = reference.commit(schedule, clean_state, q, k, v)
        dirty_state = reference.commit(schedule, dirty_state, q, k2, v2)


def test_topk_ties_go_to_the_lower_block_index():
    layout = sd.VideoLayout(4, 4, (2, 2), 1)  # 4 blocks per frame
    pattern = sd.Pattern(layout, window=sd.LocalWindow(None, sd.TopK(k=3)))
    schedule = sd.lower(pattern, num_heads=1, head_dim=4, dtype="float32")
    state = reference.new_state(schedule, 1)
    ones = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    for _ in range(3):  # every representative is equal: all scores tie
        state = reference.commit(schedule, state, ones, ones, ones)
    mask = reference.allowed_blocks(schedule, state, ones)
    window = mask[0, 0, :, :12]
    assert window.sum(-1).tolist() == [3, 3, 3, 3]
    assert bool(window[:, :3].all()), "ties must pick blocks 0, 1, 2"


@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_update_keeps_the_top_scores(seed, capacity):
    """score = -age keeps the youngest candidates, and among equal ages the lower block index."""
    layout = sd.VideoLayout(4, 4, (2, 2), 1)
    pattern = sd.Pattern(layout, persistent=sd.Persistent(capacity, shared_heads=False),
                         window=sd.LocalWindow(1, sd.All()), update=sd.Update(score=-sd.stat.age))
    schedule = sd.lower(pattern, num_heads=2, num_kv_heads=2, head_dim=4, dtype="float32")
    chunks = chunk_tensors(schedule, 1, seed, steps=4)
    state = reference.new_state(schedule, 1)
    for q, k, v in chunks:
        state = reference.commit(schedule, state, q, k, v)
    # After 4 commits frames 0..2 have left the 1-frame window; the youngest is frame 2.
    candidates = sorted(range(12), key=lambda b: (-(b // 4), b))
    for g in range(2):
        assert sorted(state.persistent[(0, g)]) == sorted(candidates[:capacity])
