"""The generators committed under checkpoints/ load with the small config and continue a
held-out world, under the pattern each was trained with, better than copying the last true
frame, with the world's texture (an untrained model gives flat frames)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import HELD_OUT_WORLDS
from models.generate import generate, load_generator
from models.metrics import psnr_per_frame
from models.train.validation import roughness

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = [("small-sparse-forcing.safetensors", "sparse-forcing"), ("small-dense.safetensors", "dense")]


def _texture(frames: np.ndarray) -> float:
    return roughness(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float())


@pytest.mark.slow
@pytest.mark.parametrize("name,pattern", SHIPPED)
def test_shipped_generator_continues_an_unseen_world(name, pattern):
    model, cfg = load_generator(CHECKPOINTS / name, "small")
    assert cfg.name == "small"
    result = generate(model, cfg, pattern, frames=6, prefix_frames=3, world_seed=HELD_OUT_WORLDS,
                      progress=False)
    video, truth = result.video[0], result.truth
    assert video.shape == truth.shape == (6, cfg.video.height, cfg.video.width, 3)
    copy_last = np.broadcast_to(result.prefix[-1], truth.shape)
    assert psnr_per_frame(video, truth).mean() > psnr_per_frame(copy_last, truth).mean() + 0.3
    assert abs(_texture(video) / _texture(truth) - 1) < 0.3
