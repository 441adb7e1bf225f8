"""`program.to_block_mask`: the exported FlexAttention BlockMask computes the program's attention.

Eager `flex_attention` evaluates only the BlockMask's `mask_mod` (it ignores the block lists), so
these CPU tests check the token-level mask (visited blocks and padding); the block lists are
checked against the visits directly, and the compiled kernel (which reads both) on a tiny case.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention.flex_attention import AuxRequest, create_mask, flex_attention

import sparsedsl as sd
from sparsedsl import reference
from sparsedsl.testing import chunk_tensors, layouts, patterns, schedules

from codegen.attention.tables import tables_from_reference
from codegen.check import program_block_mask
from codegen.program import PBSAProgram

# eager Flex is the point here (it is what evaluates only the mask_mod)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _chunks(schedule, batch, seed, steps, dtype):
    """Tile-major (q, k, v) per step; the padding slots hold finite garbage (not zeros), which
    both sides must ignore."""
    lay = schedule.layout
    pad = ~lay.valid_token_mask(lay.chunk_frames)[None, None, :, None]
    return [tuple((x + 3.0 * pad).to(dtype) for x in c)
            for c in chunk_tensors(schedule, batch, seed, steps)]


def _flex(q, K, V, mask):
    out, aux = flex_attention(q, K, V, block_mask=mask, enable_gqa=True,
                              return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _check_step(layout, out, lse, flex_out, flex_lse, atol):
    """Real query rows: Flex == the program (or reference); padded rows: 0 and -inf in both."""
    real = layout.valid_token_mask(layout.chunk_frames)
    torch.testing.assert_close(flex_out[:, :, real], out[:, :, real], rtol=atol, atol=atol)
    torch.testing.assert_close(flex_lse[:, :, real], lse[:, :, real].to(flex_lse.dtype),
                               rtol=atol, atol=atol)
    assert bool((flex_out[:, :, ~real] == 0).all()) and bool((out[:, :, ~real] == 0).all())
    assert bool((flex_lse[:, :, ~real] == float("-inf")).all())
    assert bool((lse[:, :, ~real] == float("-inf")).all())


def _rollout(schedule, steps, seed, batch=1, dtype=torch.float32, atol=2e-5):
    """A RolloutCache rollout: at every step eager Flex on the exported mask == program.attention,
    and the mask's block lists == the program's visits (+ the chunk by the current rule)."""
    program = PBSAProgram(schedule, backend="torch")
    cache = program.new_cache(batch=batch, num_layers=1, dtype=dtype)
    ks, vs = [], []
    for step, (q, k, v) in enumerate(_chunks(schedule, batch, seed, steps, dtype)):
        tables = cache.tables(0)
        out, lse, (slots, count) = program.attention(q, k, v, tables, return_visits=True)
        mask = program.to_block_mask(q, tables)
        want = program_block_mask(program, program.visited_blocks(slots, count, tables), step,
                                  batch, schedule.num_heads)
        assert torch.equal(mask.to_dense().bool(), want)
        ks.append(k)
        vs.append(v)
        K, V = torch.cat(ks, dim=2), torch.cat(vs, dim=2)  # the global key order: all frames so far
        assert mask.seq_lengths == (q.shape[2], K.shape[2])
        _check_step(schedule.layout, out, lse, *_flex(q, K, V, mask), atol=atol)
        cache.commit(0, q, k, v)
    return program, mask, q, K, V, out


# 7x6 tokens in 4x4 tiles: partial edge tiles on both sides (16, 8, 12, 6 real tokens)
LAYOUT = sd.VideoLayout(7, 6, (4, 4), 2)
PATTERNS = {
    "sparse-forcing": lambda: sd.presets.get("sparse-forcing", layout=LAYOUT, capacity=3,
                                             window_frames=2),
    "sink-window": lambda: sd.presets.get("sink-window", layout=LAYOUT, frames=2),
    "sliding-tile": lambda: sd.presets.get("sliding-tile", layout=LAYOUT, t=2, h=0, w=1),
    "moba": lambda: sd.presets.get("moba", layout=LAYOUT, k=3),
    "dense-causal": lambda: sd.presets.get("dense-causal", layout=LAYOUT),
    "causal-chunk": lambda: sd.Pattern(LAYOUT, sink=sd.Sink(1),
                                       window=sd.LocalWindow(2, sd.Radius(1, 0, 0) | sd.TopK(1)),
                                       current=sd.Causal()),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_eager_flex_matches_program_on_presets(name):
    schedule = sd.lower(PATTERNS[name](), num_heads=4, num_kv_heads=2, head_dim=8,
                        dtype="float32")
    _rollout(schedule, steps=4, seed=1, batch=2)


@settings(max_examples=10)
@given(schedules(pattern=layouts(max_side=6, max_chunk_frames=2).flatmap(
           lambda lay: patterns(layout=lay)), max_heads=2, head_dim=4),
       st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_eager_flex_matches_program_hypothesis(schedule, seed, steps):
    _rollout(schedule, steps, seed)


@settings(max_examples=8)
@given(schedules(pattern=layouts(max_side=6, max_chunk_frames=2).flatmap(
           lambda lay: patterns(layout=lay)), max_heads=2, head_dim=4),
       st.integers(0, 2**31 - 1))
def test_eager_flex_float64_matches_reference(schedule, seed):
    """Float64 Flex on the exported mask == the float64 reference's attention on the same block
    set (the program's kernels stop at float32; this pins the token mask in float64)."""
    program = PBSAProgram(schedule, backend="torch")
    state = reference.new_state(schedule, 1)
    ks, vs = [], []
    for step, (q, k, v) in enumerate(_chunks(schedule, 1, seed, 3, torch.float64)):
        tables = tables_from_reference(program, state, torch.float32, "cpu", seed=step)
        mask = program.to_block_mask(q.float(), tables)
        want, want_lse = reference.masked_attention(schedule, state, q, k, v,
                                                    mask.to_dense().bool())
        ks.append(k)
        vs.append(v)
        got, got_lse = _flex(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), mask)
        _check_step(schedule.layout, want, want_lse, got, got_lse, atol=1e-12)
        state = reference.commit(schedule, state, q, k, v)


def test_mask_mod_is_the_token_mask():
    """The mask_mod alone (what eager Flex evaluates) is the visited blocks expanded to tokens,
    without padding keys and without padded query rows."""
    layout = sd.VideoLayout(5, 7, (2, 3), 2)
    pattern = sd.presets.get("sparse-forcing", layout=layout, capacity=2, window_frames=2)
    schedule = sd.lower(pattern, num_heads=2, head_dim=4, dtype="float32")
    program = PBSAProgram(schedule, backend="torch")
    state = reference.new_state(schedule, 1)
    for step, (q, k, v) in enumerate(chunk_tensors(schedule, 1, seed=5, steps=3)):
        tables = tables_from_reference(program, state, torch.float32, "cpu", seed=step)
        mask = program.to_block_mask(q.float(), tables)
        blocks = mask.to_dense().bool()
        assert torch.equal(blocks, reference.allowed_blocks(schedule, state, q))
        tokens = create_mask(mask.mask_mod, 1, 2, *mask.seq_lengths, device="cpu")
        q_real = layout.valid_token_mask(layout.chunk_frames)[None, None, :, None]
        assert torch.equal(tokens, reference.token_mask(schedule, blocks) & q_real)
        state = reference.commit(schedule, state, q, k, v)


def test_full_blocks_are_the_unpadded_visited_pairs():
    """Full blocks (no mask_mod in the compiled kernel) are visited pairs of two whole tiles;
    partial ones are every other visited pair; both lists hold ascending block ids."""
    layout = sd.VideoLayout(6, 6, (4, 4), 1)  # tiles of 16, 8, 8, 4 real tokens
    pattern = sd.presets.get("sink-window", layout=layout)
    schedule = sd.lower(pattern, num_heads=1, head_dim=4, dtype="float32")
    program = PBSAProgram(schedule, backend="torch")
    state = reference.new_state(schedule, 1)
    for step, (q, k, v) in enumerate(chunk_tensors(schedule, 1, seed=0, steps=3)):
        tables = tables_from_reference(program, state, torch.float32, "cpu", seed=step)
        mask = program.to_block_mask(q.float(), tables)
        allowed = reference.allowed_blocks(schedule, state, q)[0, 0]
        whole = torch.tensor([n == 16 for n in layout.frame_valid_tokens] * (step + 1))
        for qb in range(layout.chunk_blocks):
            full = allowed[qb] & whole & bool(whole[qb])
            n, nf = int(mask.kv_num_blocks[0, 0, qb]), int(mask.full_kv_num_blocks[0, 0, qb])
            assert mask.full_kv_indices[0, 0, qb, :nf].tolist() == full.nonzero()[:, 0].tolist()
            assert mask.kv_indices[0, 0, qb, :n].tolist() == (allowed[qb] & ~full).nonzero()[:, 0].tolist()
        state = reference.commit(schedule, state, q, k, v)


def test_eager_flex_is_not_dense_attention():
    """The old export (block lists, no mask_mod) made eager Flex compute dense attention over
    every frame so far. Now a sparse step differs from dense attention as the program does."""
    layout = sd.VideoLayout(7, 6, (4, 4), 2)
    pattern = sd.presets.get("sparse-forcing", layout=layout, capacity=2, window_frames=2)
    schedule = sd.lower(pattern, num_heads=2, head_dim=8, dtype="float32")
    program, mask, q, K, V, out = _rollout(schedule, steps=4, seed=2)
    assert not bool(mask.to_dense().all())
    real = layout.valid_token_mask(layout.chunk_frames)
    dense = flex_attention(q, K, V)  # no mask at all
    err = (dense[:, :, real] - out[:, :, real]).norm() / out[:, :, real].norm()
    assert err > 0.1, f"sparse step indistinguishable from dense attention ({err:.2e})"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_flex_matches_program():
    """torch.compile(flex_attention) (Inductor's CPU kernel: ~40 s on 2 cores, cold) reads the
    block lists, skips the mask_mod on full blocks, and computes the program's attention."""
    layout = sd.VideoLayout(7, 6, (4, 4), 2)
    pattern = sd.presets.get("sparse-forcing", layout=layout, capacity=2, window_frames=2)
    schedule = sd.lower(pattern, num_heads=2, head_dim=16, dtype="float32")
    program = PBSAProgram(schedule, backend="torch")
    cache = program.new_cache(batch=1, num_layers=1, dtype=torch.float32)
    # dynamic=False: with dynamic key lengths torch 2.13's CPU Flex template fails to compile
    compiled = torch.compile(flex_attention, dynamic=False)
    real = layout.valid_token_mask(layout.chunk_frames)
    ks, vs = [], []
    for q, k, v in _chunks(schedule, 1, 4, 3, torch.float32):
        tables = cache.tables(0)
        out, _ = program.attention(q, k, v, tables)
        mask = program.to_block_mask(q, tables)
        ks.append(k)
        vs.append(v)
        # (Inductor's CPU Flex returns no log-sum-exp yet: the output only)
        got = compiled(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), block_mask=mask)
        torch.testing.assert_close(got[:, :, real], out[:, :, real], rtol=2e-5, atol=2e-5)
        assert bool((got[:, :, ~real] == 0).all())
        cache.commit(0, q, k, v)


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tile_grid", [(16, 16), (12, 20)], ids=["whole-tiles", "padded-tiles"])
def test_compiled_flex_on_cuda_matches_the_generated_kernels(tile_grid):
    """On a GPU: the exported BlockMask under compiled Flex (block lists, full blocks and the
    mask_mod) equals `program.attention` on the generated Triton kernels, along a rollout,
    with 64-token blocks, whole and padded (12x20 tokens in 8x8 tiles)."""
    layout = sd.VideoLayout(*tile_grid, (8, 8), 2)
    pattern = sd.presets.get("sparse-forcing", layout=layout, capacity=3, window_frames=2)
    schedule = sd.lower(pattern, num_heads=2, head_dim=64, dtype="bfloat16")
    program = PBSAProgram(schedule, backend="triton")
    cache = program.new_cache(batch=1, num_layers=1, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(flex_attention, dynamic=False)
    real = layout.valid_token_mask(layout.chunk_frames).cuda()
    ks, vs = [], []
    for q, k, v in _chunks(schedule, 1, 5, 5, torch.bfloat16):
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        tables = cache.tables(0)
        out, _ = program.attention(q, k, v, tables)
        mask = program.to_block_mask(q, tables)
        ks.append(k)
        vs.append(v)
        # Flex's CUDA kernel tiles must divide the mask's blocks (its default is 128 rows)
        bq, bk = mask.BLOCK_SIZE
        got = compiled(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), block_mask=mask,
                       kernel_options={"BLOCK_M": bq, "BLOCK_N": bk})
        torch.testing.assert_close(got[:, :, real].float(), out[:, :, real].float(),
                                   rtol=2e-2, atol=2e-2)
        cache.commit(0, q, k, v)
