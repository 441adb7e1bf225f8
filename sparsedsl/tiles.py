"""Which tile shape wastes least for a frame size: `sparsedsl tiles 30x52`.

A block is one tile of one frame. Two paddings cost compute that attends nothing: the partial
tiles at the frame's bottom and right edges, and the generated kernels' own rounding of a
block up to a power of two of at least 16 tokens (the tensor-core tile). For Self-Forcing's
30 x 52 tokens, 8x8 tiles (the presets') leave 12.9% of the kernel's slots empty and 8x16
tiles 23.8%, while 16x4 tiles leave 6.25% with half of their 26 blocks whole (no masking
at all), and 15x4 tiles 6.25% with every block 60 real tokens in 64 slots.
What a tile shape means for the model (a `Radius` is counted in tiles, a persistent block holds
a tile) is a quality question this table does not answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import PatternError

MIN_KERNEL_BLOCK = 16     # the generated kernels' smallest block


def kernel_block_tokens(block_tokens: int) -> int:
    """Slots the generated kernels give a block: a power of two, at least 16 (the one place
    this rule lives: codegen's programs size their kernels with it)."""
    return max(MIN_KERNEL_BLOCK, 1 << max(0, (block_tokens - 1).bit_length()))


@dataclass(frozen=True)
class TileChoice:
    tile: tuple[int, int]
    blocks_per_frame: int
    padded_blocks: int           # blocks with fewer real tokens than kernel slots (masked)
    kernel_block: int            # slots per block in the kernels
    waste: float                 # empty slots / all slots of a frame

    @property
    def row(self) -> str:
        th, tw = self.tile
        return (f"{th}x{tw}".rjust(7) + f"{th * tw:>7}{self.kernel_block:>8}"
                f"{self.blocks_per_frame:>8}{self.padded_blocks:>8}{self.waste:>8.1%}")


def tile_choice(height: int, width: int, tile: tuple[int, int]) -> TileChoice:
    th, tw = tile
    rows, cols = math.ceil(height / th), math.ceil(width / tw)
    kb = kernel_block_tokens(th * tw)
    whole = (height // th) * (width // tw) if th * tw == kb else 0   # real tokens fill the slots
    return TileChoice((th, tw), rows * cols, rows * cols - whole, kb,
                      1 - height * width / (rows * cols * kb))


def rank_tiles(height: int, width: int, max_block: int = 128, min_blocks: int = 16) -> list[TileChoice]:
    """Every tile shape whose kernel block is at most `max_block` slots and that cuts a frame
    into at least `min_blocks` blocks (Top-K and the persistent set choose among blocks),
    least waste first; ties go to fewer padded blocks (whole blocks skip the masking), then
    to larger blocks (fewer kernel tiles), then to squarer tiles."""
    for name, value in (("height", height), ("width", width), ("max_block", max_block),
                        ("min_blocks", min_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PatternError(name, value, "an integer >= 1")
    choices = [tile_choice(height, width, (th, tw))
               for th in range(1, height + 1) for tw in range(1, width + 1)
               if kernel_block_tokens(th * tw) <= max_block]
    choices = [c for c in choices if c.blocks_per_frame >= min_blocks]
    return sorted(choices, key=lambda c: (round(c.waste, 9), c.padded_blocks, -c.tile[0] * c.tile[1],
                                          abs(math.log(c.tile[0] / c.tile[1]))))


def format_table(height: int, width: int, choices: list[TileChoice], top: int,
                 also: tuple[tuple[int, int], ...] = ((8, 8), (8, 16))) -> str:
    """The `top` choices, then the presets' tiles for comparison."""
    head = (f"frame {height}x{width} tokens ({height * width}); waste = empty kernel slots "
            "(edge tiles + rounding to the kernel block) / all slots\n"
            "   tile  tokens  kernel  blocks  padded   waste")
    lines = [head] + [c.row for c in choices[:top]]
    shown = {c.tile for c in choices[:top]}
    extra = [tile_choice(height, width, t) for t in also
             if t not in shown and t[0] <= height and t[1] <= width]
    if extra:
        lines += ["  (the presets' tiles)"] + [c.row for c in extra]
    return "\n".join(lines)
