"""Video layout: how latent tokens are grouped into blocks (the unit of sparsity).

A frame holds `height x width` tokens, cut into tiles of `th x tw`. Edge tiles
may be partial; each block is padded to `th * tw` slots. Inside a block the real
tokens come first (row-major over the tile's real extent) and the padding last,
so a block's real tokens are a *prefix*: kernels mask with `offset < n_valid`
instead of a per-token table.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import PatternError, require_int


@dataclass(frozen=True)
class VideoLayout:
    """Token grid of one latent frame, its block tiling, and the frames per AR chunk."""

    height: int
    width: int
    tile: tuple[int, int] = (8, 8)
    chunk_frames: int = 3

    def __post_init__(self) -> None:
        require_int("layout.height", self.height, 1, 4096)
        require_int("layout.width", self.width, 1, 4096)
        if not (isinstance(self.tile, tuple) and len(self.tile) == 2):
            raise PatternError("layout.tile", self.tile, "a tuple (th, tw) of two positive integers")
        require_int("layout.tile[0]", self.tile[0], 1, self.height)
        require_int("layout.tile[1]", self.tile[1], 1, self.width)
        require_int("layout.chunk_frames", self.chunk_frames, 1, 64)

    # --- sizes -----------------------------------------------------------------
    @property
    def th(self) -> int:
        return self.tile[0]

    @property
    def tw(self) -> int:
        return self.tile[1]

    @cached_property
    def tiles_h(self) -> int:
        """nh: block rows per frame."""
        return math.ceil(self.height / self.th)

    @cached_property
    def tiles_w(self) -> int:
        """nw: block columns per frame."""
        return math.ceil(self.width / self.tw)

    @cached_property
    def blocks_per_frame(self) -> int:
        return self.tiles_h * self.tiles_w

    @cached_property
    def block_tokens(self) -> int:
        """Slots per block, padding included."""
        return self.th * self.tw

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def padded_tokens_per_frame(self) -> int:
        return self.blocks_per_frame * self.block_tokens

    @property
    def has_padding(self) -> bool:
        return self.height % self.th != 0 or self.width % self.tw != 0

    @cached_property
    def chunk_blocks(self) -> int:
        """Query blocks of one AR step."""
        return self.chunk_frames * self.blocks_per_frame

    # --- block coordinates -------------------------------------------------------
    def block_index(self, frame: int, row: int, col: int) -> int:
        return (frame * self.tiles_h + row) * self.tiles_w + col

    def block_coords(self, block: int) -> tuple[int, int, int]:
        frame, rest = divmod(block, self.blocks_per_frame)
        row, col = divmod(rest, self.tiles_w)
        return frame, row, col

    def block_valid_tokens(self, row: int, col: int) -> int:
        """Real tokens of the tile at (row, col): th*tw except on the bottom/right edge."""
        rows = min(self.th, self.height - row * self.th)
        cols = min(self.tw, self.width - col * self.tw)
        return rows * cols

    @cached_property
    def frame_valid_tokens(self) -> tuple[int, ...]:
        """Real tokens of each block of a frame, in block order."""
        return tuple(self.block_valid_tokens(i, j)
                     for i in range(self.tiles_h) for j in range(self.tiles_w))

    # --- the token permutation -------------------------------------------------------
    def tile_major_index(self, frames: int) -> torch.Tensor:
        """For each tile-major slot of `frames` frames, the raster token index, or -1 for padding.

        Raster order is (frame, y, x); tile-major order is (frame, tile row, tile col,
        real tokens of the tile row-major, then padding).
        """
        require_int("frames", frames, 1)
        slots = []
        for i in range(self.tiles_h):
            for j in range(self.tiles_w):
                ys = range(i * self.th, min((i + 1) * self.th, self.height))
                xs = range(j * self.tw, min((j + 1) * self.tw, self.width))
                block = [y * self.width + x for y in ys for x in xs]
                slots.extend(block + [-1] * (self.block_tokens - len(block)))
        one_frame = torch.tensor(slots, dtype=torch.long)
        offsets = torch.arange(frames, dtype=torch.long)[:, None] * self.tokens_per_frame
        index = torch.where(one_frame[None, :] >= 0, one_frame[None, :] + offsets, -1)
        return index.reshape(-1)

    def to_tile_major(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """[..., frames*H*W, D] in raster order -> [..., frames*blocks*BT, D], padding zero-filled."""
        expected = frames * self.tokens_per_frame
        if x.shape[-2] != expected:
            raise ValueError(f"x.shape[-2] = {x.shape[-2]} but {frames} frames of "
                             f"{self.height}x{self.width} tokens need {expected}")
        slots, tokens = _permutation(self, frames, x.device)
        out = x.new_zeros(*x.shape[:-2], frames * self.padded_tokens_per_frame, x.shape[-1])
        return out.index_copy(-2, slots, x.index_select(-2, tokens))

    def from_tile_major(self, y: torch.Tensor, frames: int) -> torch.Tensor:
        """Inverse of `to_tile_major`: drops the padding slots."""
        if y.shape[-2] != frames * self.padded_tokens_per_frame:
            raise ValueError(f"y.shape[-2] = {y.shape[-2]} but {frames} frames need "
                             f"{frames * self.padded_tokens_per_frame} tile-major slots")
        return y.index_select(-2, _inverse_permutation(self, frames, y.device))

    def valid_token_mask(self, frames: int) -> torch.Tensor:
        """Bool [frames*blocks*BT]: True on real tokens of the tile-major layout."""
        return self.tile_major_index(frames) >= 0

    def __str__(self) -> str:
        return (f"VideoLayout({self.height}x{self.width} tokens, tile {self.th}x{self.tw} -> "
                f"{self.tiles_h}x{self.tiles_w} blocks/frame, {self.chunk_frames} frames/chunk)")


# The permutation as device index tensors, built once per (layout, frames, device): the model
# calls to/from_tile_major four times per layer and pass, and a boolean mask or a host tensor
# there would make every call wait for the GPU (a nonzero or a pageable copy).
@functools.lru_cache(maxsize=64)
def _permutation(layout: VideoLayout, frames: int, device: torch.device):
    """(tile-major slots holding real tokens, the raster token in each), long, on `device`."""
    index = layout.tile_major_index(frames)
    slots = (index >= 0).nonzero()[:, 0]
    return slots.to(device), index[slots].to(device)


@functools.lru_cache(maxsize=64)
def _inverse_permutation(layout: VideoLayout, frames: int, device: torch.device):
    """For each raster token, its tile-major slot, long, on `device`."""
    slots, tokens = _permutation(layout, frames, torch.device("cpu"))
    inverse = torch.empty(frames * layout.tokens_per_frame, dtype=torch.long)
    inverse[tokens] = slots
    return inverse.to(device)
