"""Training clips from the procedural world, and the pixel conversions shared by all video data.

    clips = WorldClips(cfg)    # item i: world seed i (base_seed + i), cfg.video.frames frames
    item = clips[0]            # {"video": [F, C, H, W] in [-1, 1], "label", "seed", "start"}
    to_uint8(item["video"])    # uint8 [F, H, W, C], e.g. for a GIF

The dataset holds only its config and a few numbers, so DataLoader workers can pickle it;
every item is rendered on demand from its seed (models/world.py).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import Config
from .world import World, check_config

START_STREAM = 1   # the start offset's own random stream, apart from the scene's rng(seed)


def to_uint8(video: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """[..., C, H, W] in [-1, 1] (clamped) -> uint8 numpy [..., H, W, C]."""
    x = torch.as_tensor(video).detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, C] -> float32 tensor [..., C, H, W] in [-1, 1]; inverse of to_uint8."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1
    return x.movedim(-1, -3).contiguous()


def clip_start(seed: int, cfg: Config) -> int:
    """The clip's first frame, in [0, 4 * camera_period), fixed per seed: clips start at
    different points of the camera and sprite cycles, not all at frame 0."""
    rng = np.random.default_rng([START_STREAM, seed])
    return int(rng.integers(4 * cfg.world.camera_period))


# Worlds that no training stage draws (a stage with seed s trains on worlds from
# 1_000_003 * s on, a few hundred thousand of them): evaluation and the demo continue
# these, so a continuation is never of a world seen in training.
HELD_OUT_WORLDS = 2_000_000


class WorldClips(Dataset):
    """Item i: frames [start, start + cfg.video.frames) of world `base_seed + i`."""

    def __init__(self, cfg: Config, base_seed: int = 0, length: int = 10**9,
                 random_start: bool = True):
        check_config(cfg.video, cfg.world)
        if base_seed < 0 or length < 0:
            raise ValueError(f"WorldClips: base_seed = {base_seed} and length = {length} "
                             "must be >= 0")
        self.cfg, self.base_seed, self.length = cfg, base_seed, length
        self.random_start = random_start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"WorldClips index {i} out of range [0, {self.length})")
        seed = self.base_seed + i
        start = clip_start(seed, self.cfg) if self.random_start else 0
        world = World(seed, self.cfg.video, self.cfg.world)
        frames = np.stack([world.frame(t) for t in range(start, start + self.cfg.video.frames)])
        return {"video": from_uint8(frames), "label": torch.tensor(world.label, dtype=torch.int64),
                "seed": seed, "start": start}
