"""Held-out world continuations, scored while a stage trains.

At every snapshot (`snapshot_every`) the few-step generator continues the first two chunks of
a few held-out world clips to the end of the training horizon, through the stage's attention
backend, and the scores go into the run's history next to the losses: PSNR and SSIM against
the true continuation, and roughness (0.20 for the world's frames, about 1.4 for white noise).
High PSNR alone favours blur (a mean prediction that drops the sprites scores well); a
roughness climbing past 0.3 is the per-patch noise DMD can teach (docs/training.md). Two
sprite scores say what PSNR does not: `val_vivid`, the generated frames' share of
sprite-coloured pixels over the truth's (1 when the generator keeps drawing as many sprites,
0 when it loses them), and `val_sprites`, the share of the true sprites' pixels drawn in their
colour where the world has them (`metrics.sprite_visibility`). Together they say which
snapshot to keep without another GPU call. The continuation goes on for a second horizon,
where `val_vivid_far` is the same sprite-pixel ratio: whether the generator still draws
sprites once the window has rolled past the given frames (a rolling window's failure).
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import from_uint8, to_uint8
from ..metrics import psnr_per_frame, sprite_visibility, ssim_per_frame, vivid_fraction
from ..sampling import continue_video
from ..world import render

VALIDATION_SEEDS = tuple(range(900_000, 900_008))   # far from the training clips' seeds
PREFIX_CHUNKS = 2
FAR_HORIZON = 2          # the continuation runs to 2x the horizon; val_vivid_far scores the 2nd


def roughness(video: torch.Tensor) -> float:
    """Mean neighbour-pixel difference over the mean deviation from each clip's mean: about
    0.2 for the world's frames, about 1.4 for white noise."""
    v = video.float()
    diff = ((v[..., 1:, :] - v[..., :-1, :]).abs().mean() + (v[..., 1:] - v[..., :-1]).abs().mean()) / 2
    spread = (v - v.mean(dim=tuple(range(1, v.dim())), keepdim=True)).abs().mean()
    return float(diff / spread.clamp(min=1e-8))


@torch.no_grad()
def continuation_scores(model, backend, run, seeds=VALIDATION_SEEDS) -> dict[str, float]:
    """{'val_psnr', 'val_ssim', 'val_roughness', 'val_vivid', 'val_sprites', 'val_vivid_far'}
    of `model` continuing held-out world clips (the first PREFIX_CHUNKS chunks given, the rest
    of the horizon scored, and the horizon after it for val_vivid_far)."""
    cfg = run.cfg
    v = cfg.video
    P = PREFIX_CHUNKS * v.chunk_frames
    N, far = v.frames - P, FAR_HORIZON * v.frames
    rendered = [render(seed, 0, far, v, cfg.world) for seed in seeds]
    prefix = torch.stack([from_uint8(f[:P]) for f, _ in rendered]).to(run.device)
    was_training = model.training
    model.eval()
    continued = continue_video(model, backend, cfg, prefix, far - P,
                               torch.Generator().manual_seed(0), run.compute_dtype,
                               autocast=run.autocast())
    model.train(was_training)
    generated = continued[:, :N]
    gen = [to_uint8(g) for g in generated.cpu()]
    gen_far = [to_uint8(g) for g in continued[:, N:].cpu()]      # frames [horizon, far)
    truth_far = [f[v.frames:] for f, _ in rendered]
    rendered = [(f[:v.frames], m[:v.frames]) for f, m in rendered]
    clips = [frames for frames, _ in rendered]
    psnr = np.concatenate([psnr_per_frame(g, c[P:]) for g, c in zip(gen, clips)])
    ssim = np.concatenate([ssim_per_frame(g, c[P:]) for g, c in zip(gen, clips)])
    shown = np.concatenate([sprite_visibility(g, meta[P:], cfg) for g, (_, meta) in zip(gen, rendered)])
    return {"val_psnr": float(np.mean(np.minimum(psnr, 100.0))), "val_ssim": float(np.mean(ssim)),
            "val_roughness": roughness(generated),
            "val_vivid": vivid_ratio(gen, [c[P:] for c in clips]),
            "val_sprites": float(np.nanmean(shown)) if np.isfinite(shown).any() else 0.0,
            "val_vivid_far": vivid_ratio(gen_far, truth_far)}


def vivid_ratio(generated, truth) -> float:
    """The generated frames' share of sprite-coloured pixels over the truth's."""
    gen = np.mean([vivid_fraction(g).mean() for g in generated])
    true = np.mean([vivid_fraction(t).mean() for t in truth])
    return float(gen / max(true, 1e-9))
