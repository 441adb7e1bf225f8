import torch
from hypothesis import given, strategies as st

from sparsedsl import VideoLayout
from sparsedsl.testing import layouts


@given(layouts(), st.integers(1, 3))
def test_tile_major_round_trip(layout, frames):
    x = torch.randn(2, frames * layout.tokens_per_frame, 3)
    y = layout.to_tile_major(x, frames)
    assert y.shape == (2, frames * layout.blocks_per_frame * layout.block_tokens, 3)
    assert torch.equal(layout.from_tile_major(y, frames), x)


@given(layouts())
def test_blocks_hold_their_tiles_tokens_as_a_prefix(layout):
    index = layout.tile_major_index(1).reshape(layout.blocks_per_frame, layout.block_tokens)
    seen = []
    for block in range(layout.blocks_per_frame):
        _, i, j = layout.block_coords(block)
        n_valid = layout.block_valid_tokens(i, j)
        row = index[block]
        assert bool((row[:n_valid] >= 0).all()) and bool((row[n_valid:] == -1).all())
        for token in row[:n_valid].tolist():
            y, x = divmod(token, layout.width)
            assert (y // layout.th, x // layout.tw) == (i, j)  # token (y, x) is in tile (y//th, x//tw)
        seen += row[:n_valid].tolist()
    assert sorted(seen) == list(range(layout.tokens_per_frame))  # a permutation of the frame


@given(layouts())
def test_block_index_and_coords_are_inverse(layout):
    for block in range(3 * layout.blocks_per_frame):
        assert layout.block_index(*layout.block_coords(block)) == block


def test_self_forcing_geometry():
    layout = VideoLayout(30, 52, (8, 8), 3)
    assert (layout.tiles_h, layout.tiles_w, layout.blocks_per_frame) == (4, 7, 28)
    assert layout.block_valid_tokens(3, 6) == 6 * 4  # bottom-right tile: 6 rows x 4 cols
    assert layout.padded_tokens_per_frame - layout.tokens_per_frame == 232
