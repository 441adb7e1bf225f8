"""Rectified flow in the convention of Wan and Self-Forcing, with x-prediction.

    x_t = (1 - t) * x0 + t * noise,   t in [0, 1]  (t = 1 is pure noise)
    velocity v = noise - x0

The network predicts the clean frames x0 (pixel space: the clean signal lies on a
low-dimensional manifold a narrow network can represent, the noise does not); the loss
is still written on the velocity, v_hat = (x_t - x0_hat) / t, i.e. an x0 error weighted
by 1 / t^2 (t clamped away from 0 so the weight stays bounded).

Timesteps in the configs are Self-Forcing's integers in (0, 1000]; `shifted` maps them
through Wan's time shift, which spends more of the schedule at high noise.
"""
from __future__ import annotations

import torch

MIN_LOSS_T = 0.05   # clamp of t in the velocity loss weight


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's time shift: t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def denoising_times(steps, shift: float) -> list[float]:
    """Self-Forcing's few-step list (e.g. [1000, 750, 500, 250]) as flow times in (0, 1]."""
    return [float(shifted(torch.tensor(s / 1000.0), shift)) for s in steps]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for t broadcast over the trailing (C, H, W) dims: t is [B] or [B, F]."""
    t = t.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    return (1 - t) * x0 + t * noise


def sample_times(shape, shift: float, generator=None, device="cpu") -> torch.Tensor:
    """Training times: logit-normal (mass in the middle), then shifted toward noise."""
    u = torch.randn(shape, generator=generator).to(device)
    return shifted(torch.sigmoid(u), shift)


def velocity_loss(x0_hat: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over elements of |v_hat - v|^2 = |x0_hat - x0|^2 / t^2 (t clamped), optionally
    masked by `weight` (broadcast like t: 1 where the loss counts)."""
    t = t.clamp(min=MIN_LOSS_T)
    t = t.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    err = ((x0_hat.float() - x0.float()) / t) ** 2
    if weight is None:
        return err.mean()
    w = weight.reshape(*weight.shape, *([1] * (x0.dim() - weight.dim()))).to(err.dtype)
    return (err * w).sum() / (w.expand_as(err).sum().clamp(min=1))


def euler_step(x_t: torch.Tensor, x0_hat: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from t to t_next, the velocity taken from
    the x0 prediction: v = (x_t - x0_hat) / t."""
    v = (x_t - x0_hat) / max(t, 1e-6)
    return x_t + (t_next - t) * v


def sampling_grid(num_steps: int, shift: float, include=()) -> list[float]:
    """Decreasing times from 1 to 0 for a many-step sampler: `num_steps` uniform steps
    shifted, merged with the times in `include` (so a trajectory passes exactly through
    the few-step student's times)."""
    base = shifted(torch.linspace(1.0, 0.0, num_steps + 1), shift).tolist()
    grid = sorted(set(round(x, 6) for x in base) | set(round(x, 6) for x in include), reverse=True)
    return grid
