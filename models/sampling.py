"""Samplers: many-step Euler for the bidirectional teacher and the AR diffusion model (with
the trajectory recorded for ODE distillation), and the few-step AR generator.

    video = sample_clip(teacher, cfg, noise)                          # bidirectional, whole clip
    video, traj = ar_ode_rollout(model, cache, noise, frames, grid, record_times)
    video = generate(model, backend, cfg, batch, frames, generator)    # few-step, any backend
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .attention import SequenceAttention
from .config import Config
from .flow import denoising_times, euler_step, sampling_grid
from .rollout import gaussian_noise, prefill, rollout


@torch.no_grad()
def sample_clip(model, cfg: Config, noise: torch.Tensor, steps: Optional[int] = None,
                label: Optional[torch.Tensor] = None, autocast=None) -> torch.Tensor:
    """Bidirectional many-step Euler sampling of whole clips from `noise` [B, F, C, H, W]."""
    grid = sampling_grid(steps or cfg.flow.sample_steps, cfg.flow.shift)
    attend = SequenceAttention(None, cfg.tokens_per_frame)
    x = noise
    B, Fr = x.shape[:2]
    for t, tn in zip(grid[:-1], grid[1:]):
        with autocast or torch.autocast("cpu", enabled=False):
            x0 = model(x, torch.full((B, Fr), t, device=x.device), attend, label=label).float()
        x = euler_step(x, x0, t, tn)
    return x


@torch.no_grad()
def ar_ode_rollout(model, cache, noise: torch.Tensor, grid: Sequence[float],
                   record_times: Sequence[float], label=None, autocast=None):
    """Chunk-by-chunk many-step Euler sampling with the AR diffusion model (clean context
    from the cache), recording each chunk's state at `record_times` (members of `grid`).

    Returns (video [B, F, C, H, W], recorded [B, F, K, C, H, W])."""
    c = model.cfg.video.chunk_frames
    B, Fr = noise.shape[:2]
    videos, records = [], []
    for i in range(Fr // c):
        start = cache.frame_start
        x = noise[:, i * c:(i + 1) * c]
        rec = {}
        for t, tn in zip(grid[:-1], grid[1:]):
            if any(abs(t - r) < 1e-6 for r in record_times):
                rec[round(t, 6)] = x
            with autocast or torch.autocast("cpu", enabled=False):
                x0 = model(x, torch.full((B, c), t, device=x.device), cache.reader(),
                           frame_start=start, label=label).float()
            x = euler_step(x, x0, t, tn)
        with autocast or torch.autocast("cpu", enabled=False):
            model(x.to(noise.dtype), torch.zeros(B, c, device=x.device), cache.writer(),
                  frame_start=start, label=label)
        videos.append(x)
        records.append(torch.stack([rec[round(r, 6)] for r in record_times], dim=2))
    return torch.cat(videos, dim=1), torch.cat(records, dim=1)


def ode_grid(cfg: Config) -> tuple[list[float], list[float]]:
    """(the many-step grid, the student's few-step times), the latter on the grid."""
    times = denoising_times(cfg.flow.denoising_steps, cfg.flow.shift)
    return sampling_grid(cfg.flow.sample_steps, cfg.flow.shift, include=times), times


@torch.no_grad()
def generate(model, backend, cfg: Config, batch: int, frames: int,
             generator: Optional[torch.Generator] = None, device="cpu", dtype=torch.float32,
             label=None, autocast=None, on_chunk=None) -> torch.Tensor:
    """Few-step AR generation of `frames` frames from noise under `backend` (dense or a
    pattern): `continue_video` with an empty prefix."""
    v = cfg.video
    empty = torch.empty(batch, 0, v.channels, v.height, v.width, device=device)
    return continue_video(model, backend, cfg, empty, frames, generator, dtype, autocast,
                          on_chunk, label=label)


@torch.no_grad()
def continue_video(model, backend, cfg: Config, prefix: torch.Tensor, frames: int,
                   generator: Optional[torch.Generator] = None, dtype=torch.float32,
                   autocast=None, on_chunk=None, cache=None, label=None) -> torch.Tensor:
    """Generate `frames` frames after `prefix` [B, P, C, H, W] (clean frames in [-1, 1], P a
    whole number of chunks; P = 0 generates from noise). Returns the continuation only,
    [B, frames, C, H, W]. Pass `cache` to inspect it afterwards (bytes, memory)."""
    B, P = prefix.shape[:2]
    device = prefix.device
    if cache is None:
        cache = backend.new_cache(B, device, dtype, max_frames=P + frames)
    shape = (B, cfg.video.chunk_frames, cfg.video.channels, cfg.video.height, cfg.video.width)
    times = denoising_times(cfg.flow.denoising_steps, cfg.flow.shift)
    with autocast or torch.autocast("cpu", enabled=False):
        if P:
            prefill(model, cache, prefix.to(dtype), label=label)
        return rollout(model, cache, gaussian_noise(shape, generator, device), frames, times,
                       label=label, on_chunk=on_chunk).float()
