"""3D rotary position embedding over (frame, row, col), Wan's split of the head dimension.

The head dim D is cut into a time part of D - 4*(D//6) channels and row / column parts of
2*(D//6) each; each part rotates its channel pairs by position x frequency. Keys enter
the cache already rotated (Self-Forcing; docs/design.md), so a cached block keeps the
position of its own frame. Attention scores then depend only on position differences.

`time_rope = "absolute"`: a frame's time position is its index in the video. A pattern's
memory (sink and persistent blocks) can instead be moved to the frame just before its window
at every chunk (`attention.memory_positions = "realigned"`, models/attention.py), with
`time_shift_angles`; docs/model.md says which was chosen, and the measurement.
"""
from __future__ import annotations

import torch


def split_dims(head_dim: int) -> tuple[int, int, int]:
    d6 = head_dim // 6
    return head_dim - 4 * d6, 2 * d6, 2 * d6


def _freqs(dim: int, theta: float) -> torch.Tensor:
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / max(dim, 1))


def rope_angles(frames: torch.Tensor, rows: int, cols: int, head_dim: int,
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(frames) * rows * cols, head_dim // 2] for the raster tokens of `frames`
    (a 1-D tensor of frame positions)."""
    dt, dh, dw = split_dims(head_dim)
    # computed on the CPU in float64 (positions far past the horizon keep their precision)
    cpu = dict(dtype=torch.float64, device="cpu")
    f = frames.to(**cpu)[:, None, None].expand(-1, rows, cols).reshape(-1)
    y = torch.arange(rows, **cpu)[None, :, None].expand(len(frames), rows, cols).reshape(-1)
    x = torch.arange(cols, **cpu)[None, None, :].expand(len(frames), rows, cols).reshape(-1)
    angles = torch.cat([f[:, None] * _freqs(dt, theta), y[:, None] * _freqs(dh, theta),
                        x[:, None] * _freqs(dw, theta)], dim=1)
    return angles.cos().float(), angles.sin().float()


def time_shift_angles(delta_frames: torch.Tensor, head_dim: int,
                      theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [*delta.shape, head_dim // 2] that move already-rotated keys by
    `delta_frames` frames in time (rows and columns untouched: angle 0): RoPE's rotations
    compose, so apply_rope(apply_rope(k, at f), shift d) == apply_rope(k, at f + d)."""
    dt, dh, dw = split_dims(head_dim)
    d = delta_frames.to(torch.float64)[..., None]          # on its own device: no host sync
    angles = torch.cat([d * _freqs(dt, theta).to(d.device),
                        d.new_zeros(*d.shape[:-1], (dh + dw) // 2)], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [..., N, D] by the angles of each token (in fp32)."""
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.to(dtype)
