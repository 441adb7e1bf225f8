"""Chunk-by-chunk generation through a chunk cache: Self-Forcing's inference loop, which is
also the self-forcing stage's training rollout.

    video = rollout(model, cache, noise, frames=21, times=[t1000, t750, t500, t250])

Per chunk: start from noise; at each denoising time predict x0 with the cache read only,
then re-noise the prediction to the next time with fresh noise (the few-step sampler of
DMD-distilled models); the last prediction is the chunk. A clean pass at t = 0 then
writes the chunk's K/V into the cache, layer by layer (no gradient).

Training (`exit_steps` given): chunk i stops at its denoising step `exit_steps[i]`, and
only that step carries gradient; the steps before it and every clean pass run without —
Self-Forcing's recipe, which keeps memory to one step per chunk. A chunk whose entry is
None runs all its steps without gradient (the chunks of a long rollout outside the window
that the loss sees: Self-Forcing++).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from .attention import ChunkCache


def rollout(model, cache: ChunkCache, noise: Callable[[int, int], torch.Tensor], frames: int,
            times: Sequence[float], label: Optional[torch.Tensor] = None,
            context: Optional[torch.Tensor] = None, exit_steps: Optional[Sequence[Optional[int]]] = None,
            on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Generate `frames` frames (a whole number of chunks). `noise(chunk, step)` returns the
    noise [B, c, C, H, W] of that chunk's denoising step (step 0: the start). Returns the
    video [B, frames, C, H, W]; with `exit_steps` the chunks carry gradient (those whose
    entry is not None)."""
    c = model.cfg.video.chunk_frames
    if frames % c:
        raise ValueError(f"frames = {frames}: expected a multiple of chunk_frames = {c}")
    chunks = []
    for i in range(frames // c):
        start = cache.frame_start
        exit_step = None if exit_steps is None else exit_steps[i]
        last = len(times) - 1 if exit_step is None else int(exit_step)
        x = noise(i, 0)
        B = x.shape[0]
        for j in range(last + 1):
            carries_grad = exit_step is not None and j == last
            with contextlib.nullcontext() if carries_grad else torch.no_grad():
                t = torch.full((B, c), times[j], device=x.device)
                x0 = model(x, t, cache.reader(), frame_start=start, label=label, context=context)
            if j < last:
                tn = times[j + 1]
                x = (1 - tn) * x0.detach() + tn * noise(i, j + 1)
        with torch.no_grad():   # the clean pass: K/V of the finished chunk enter the cache
            zero = torch.zeros(B, c, device=x0.device)
            model(x0.detach().to(x.dtype), zero, cache.writer(), frame_start=start, label=label,
                  context=context)
        chunks.append(x0)
        if on_chunk is not None:
            on_chunk(i, x0)
    return torch.cat(chunks, dim=1)


def gaussian_noise(shape, generator: Optional[torch.Generator] = None, device="cpu",
                   dtype=torch.float32) -> Callable[[int, int], torch.Tensor]:
    """A `noise(chunk, step)` drawing fresh noise of `shape` ([B, c, C, H, W]) from one generator."""
    def draw(chunk: int, step: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return draw


@torch.no_grad()
def prefill(model, cache: ChunkCache, frames: torch.Tensor, label=None, context=None) -> None:
    """Commit known clean frames [B, P, C, H, W] (P a whole number of chunks) to the cache,
    chunk by chunk, exactly as a generated chunk's clean pass would: the prefix a
    continuation starts from."""
    c = model.cfg.video.chunk_frames
    B, P = frames.shape[:2]
    if P % c:
        raise ValueError(f"prefix of {P} frames: expected a multiple of chunk_frames = {c}")
    for i in range(P // c):
        zero = torch.zeros(B, c, device=frames.device)
        model(frames[:, i * c:(i + 1) * c], zero, cache.writer(), frame_start=cache.frame_start,
              label=label, context=context)
