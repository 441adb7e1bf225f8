"""`sparsedsl tiles`: the waste of a tile shape equals what the layout itself says (real tokens
per block, VideoLayout.frame_valid_tokens) against the kernels' slots, and the ranking puts
the least waste first."""
import pytest
from hypothesis import given, strategies as st

import sparsedsl as sd
from sparsedsl.cli import main
from sparsedsl.errors import PatternError
from sparsedsl.tiles import kernel_block_tokens, rank_tiles, tile_choice


@given(st.integers(1, 40), st.integers(1, 60), st.integers(1, 16), st.integers(1, 16))
def test_waste_and_padded_blocks_agree_with_the_layout(height, width, th, tw):
    th, tw = min(th, height), min(tw, width)
    choice = tile_choice(height, width, (th, tw))
    valid = sd.VideoLayout(height, width, (th, tw), 1).frame_valid_tokens
    kb = kernel_block_tokens(th * tw)
    assert kb >= max(16, th * tw) and kb & (kb - 1) == 0 and kb < 2 * max(16, th * tw)
    assert choice.blocks_per_frame == len(valid) and choice.kernel_block == kb
    assert choice.padded_blocks == sum(n < kb for n in valid)
    assert choice.waste == pytest.approx(1 - sum(valid) / (len(valid) * kb))


def test_ranking_at_self_forcing_geometry():
    ranked = rank_tiles(30, 52)
    assert ranked[0].tile == (16, 4) and ranked[0].waste == pytest.approx(0.0625)
    wastes = [c.waste for c in ranked]
    assert wastes == sorted(wastes)
    assert all(c.kernel_block <= 128 and c.blocks_per_frame >= 16 for c in ranked)
    eight = next(c for c in ranked if c.tile == (8, 8))
    assert eight.waste == pytest.approx(1 - 1560 / (28 * 64)) and eight.padded_blocks == 10


def test_cli_prints_the_table_and_refuses_bad_frames(capsys):
    assert main(["tiles", "30x52", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "16x4" in out and "8x8" in out and "12.9%" in out
    assert main(["tiles", "30by52"]) == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
    assert main(["tiles", "4x4", "--min-blocks", "100"]) == 2
    assert "--min-blocks" in capsys.readouterr().err
    with pytest.raises(PatternError, match="height"):
        rank_tiles(0, 5)
