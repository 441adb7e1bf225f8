"""Stage c: self-forcing with DMD, the attention pattern and its memory in the loop.

Per step (one generator update):
1. the generator (initialised from the student) rolls out the whole horizon chunk by chunk
   through the pattern's cache, exactly as at inference — 4 denoising steps, Top-K
   selection and the persistent-memory update after each clean pass; chunk i stops at a
   random denoising step (the same for the whole batch, drawn per step) and only that
   step carries gradient; the cache is written without gradient (models/rollout.py);
2. `fake_updates` updates of the fake score (initialised from the teacher) with the flow
   loss on the detached rollout, fresh times and noise each;
3. the DMD update of the generator: noise the rollout to a random time, take the real
   score (the frozen teacher) and the fake score's x0 predictions, and step along
   (fake - real) / mean|x0 - real| (DMD's normalised gradient), through the rollout.
The teacher is bidirectional, so both scores see the whole generated clip at once.

Long rollouts (`rollout_frames` past the training horizon, Self-Forcing++): the generator
rolls out `rollout_frames` frames, the cache rolling or its memory updating as at inference
far past the horizon, and steps 2-3 see one window of the horizon's length, chunk-aligned
and drawn per step; only the window's chunks carry gradient. The teacher and the fake
score never see more frames than the teacher was trained on, and the generator learns to
continue from a cache that has already forgotten the start — what a rollout past the
horizon meets at inference and a horizon-long rollout never shows it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from ..attention import SequenceAttention, make_backend
from ..flow import add_noise, denoising_times, sample_times, shifted, velocity_loss
from ..rollout import rollout
from ..sampling import generate
from .common import StageRun, Throughput, load_stage_weights, per_sample, require_unconditional
from .validation import continuation_scores, roughness

DMD_T_RANGE = (0.02, 0.98)   # Self-Forcing's min/max DMD timestep (of 1000)
# streams of one sample's random draws (models/train/common.per_sample)
FAKE_TIME, FAKE_NOISE, DMD_TIME, DMD_NOISE = 1, 2, 3, 4


def dmd_times(run, step, idx):
    """Uniform in DMD_T_RANGE, then time-shifted as Self-Forcing does: unshifted, most draws
    fall at low noise, where (fake - real) is the two denoisers' disagreement on the
    noise itself, and the normalised gradient taught the generator per-patch noise (the
    first GPU runs, docs/training.md)."""
    lo, hi = DMD_T_RANGE
    return shifted(per_sample(run, step, idx,
                              lambda g: lo + (hi - lo) * torch.rand((1,), generator=g),
                              DMD_TIME), run.cfg.flow.shift)


class SelfForcingStep:
    """The models, optimisers and one training step of stage c (also timed by
    bench/model_step.py)."""

    def __init__(self, run: StageRun, backend, generator, real, fake):
        s = run.scfg
        self.run, self.backend = run, backend
        self.generator, self.real, self.fake = generator, real, fake
        # Self-Forcing: AdamW with beta1 = 0 for both the generator and the critic
        self.gen_opt = run.optimizer(generator, s.lr, betas=(0.0, 0.999))
        self.fake_lr = s.fake_lr or s.lr
        self.fake_opt = run.optimizer(fake, self.fake_lr, betas=(0.0, 0.999))
        self.horizon = run.cfg.video.frames            # what the teacher was trained on
        self.frames = s.rollout_frames or self.horizon
        self.times = denoising_times(run.cfg.flow.denoising_steps, run.cfg.flow.shift)
        self.whole = SequenceAttention(None, run.cfg.tokens_per_frame)
        # Self-Forcing keeps an EMA of the generator: DMD at this scale swings between
        # drawing sprites and blur every ~10 steps (docs/training.md), and the average of
        # those swings is the generator to keep, not whichever side a snapshot lands on
        self.ema = copy.deepcopy(generator).requires_grad_(False) if s.ema else None

    def window_first_chunk(self, step: int) -> int:
        """The first chunk of the window the scores see: 0 for a horizon-long rollout, else
        drawn uniformly per step (the same for every process)."""
        c = self.run.cfg.video.chunk_frames
        starts = (self.frames - self.horizon) // c + 1
        if starts == 1:
            return 0
        return int(torch.randint(starts, (1,), generator=self.run.generator(step, -2)))

    def state_objects(self) -> dict:
        objects = {"generator": self.generator, "fake": self.fake, "gen_optim": self.gen_opt,
                   "fake_optim": self.fake_opt}
        if self.ema is not None:
            objects["ema"] = self.ema
        return objects

    @property
    def weights(self):
        """The generator to score, sample and export: its EMA when the config keeps one."""
        return self.ema if self.ema is not None else self.generator

    def __call__(self, step: int) -> dict:
        run, cfg, s = self.run, self.run.cfg, self.run.scfg
        v, frames, times = cfg.video, self.frames, self.times
        c = v.chunk_frames
        idx = run.local_indices(step)
        # 1. the rollout, gradient through one random denoising step per chunk of the window
        exits = torch.randint(len(times), (frames // c,), generator=run.generator(step, -1)).tolist()
        first = self.window_first_chunk(step)
        window = range(first, first + self.horizon // c)
        exits = [e if i in window else None for i, e in enumerate(exits)]
        noises = per_sample(run, step, idx, lambda g: torch.randn(
            frames // c, len(times), c, v.channels, v.height, v.width, generator=g))
        cache = self.backend.new_cache(len(idx), run.device, run.compute_dtype, max_frames=frames)
        with run.autocast():
            video = rollout(self.generator, cache, lambda i, j: noises[:, i, j], frames, times,
                            exit_steps=exits).float()
        video = video[:, window.start * c:window.stop * c]
        frames = self.horizon
        cache_bytes = cache.nbytes()
        del cache
        # 2. the fake score follows the generator's current distribution
        x0 = video.detach()
        for u in range(s.fake_updates):
            t = per_sample(run, step, idx, lambda g: sample_times((1,), cfg.flow.shift, g),
                           FAKE_TIME, u).expand(-1, frames)
            eps = per_sample(run, step, idx, lambda g: torch.randn(x0.shape[1:], generator=g),
                             FAKE_NOISE, u)
            with run.autocast():
                pred = self.fake(add_noise(x0, eps, t), t, self.whole)
            fake_loss = velocity_loss(pred, x0, t)
            run.set_lr(self.fake_opt, step, self.fake_lr)
            run.sync_and_step(self.fake, self.fake_opt, fake_loss)
        # 3. DMD: move the rollout along fake - real at a random noise level
        t = dmd_times(run, step, idx).expand(-1, frames)
        eps = per_sample(run, step, idx, lambda g: torch.randn(x0.shape[1:], generator=g), DMD_NOISE)
        with torch.no_grad(), run.autocast():
            x_t = add_noise(x0, eps, t)
            real_x0 = self.real(x_t, t, self.whole).float()
            fake_x0 = self.fake(x_t, t, self.whole).float()
        norm = (x0 - real_x0).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-6)
        grad = (fake_x0 - real_x0) / norm
        dmd_loss = 0.5 * torch.mean((video - (x0 - grad)) ** 2)
        run.set_lr(self.gen_opt, step, s.lr)
        grad_norm = run.sync_and_step(self.generator, self.gen_opt, dmd_loss)
        if self.ema is not None:
            run.update_ema(self.ema, self.generator, s.ema, step)
        return {"dmd_loss": dmd_loss.item(), "fake_loss": fake_loss.item(),
                "grad_norm": float(grad_norm), "cache_mib": cache_bytes / 2**20,
                "roughness": roughness(x0)}


def train_self_forcing(cfg, run_dir, teacher, student, pattern: Optional[str] = None,
                       info=None, progress: bool = True, time_limit: Optional[float] = None) -> Path:
    run = StageRun(cfg, "self_forcing", run_dir, info, progress, time_limit)
    require_unconditional(cfg, "self-forcing")
    s = run.scfg
    pattern = pattern or cfg.attention.pattern
    backend = make_backend(cfg, pattern, device=run.device, dtype=run.compute_dtype)
    generator = load_stage_weights(cfg, student, "student", run.device)
    real = load_stage_weights(cfg, teacher, "teacher", run.device).requires_grad_(False).eval()
    fake = copy.deepcopy(real).requires_grad_(True).train()
    train_step = SelfForcingStep(run, backend, generator, real, fake)
    objects = train_step.state_objects()
    start = run.resume(objects)
    speed = Throughput()
    bar = run.bar(start, s.steps, f"self-forcing [{backend.name}]")
    if run.progress:
        print(f"attention in the loop: {backend.describe()}", flush=True)
    for step in range(start, s.steps):
        metrics = train_step(step)
        speed.add(s.batch)
        done = step + 1
        if done % s.log_every == 0 or done == s.steps:
            run.log(done, **metrics)
            bar.set_postfix(dmd=f"{metrics['dmd_loss']:.4f}", fake=f"{metrics['fake_loss']:.4f}",
                            clips_per_s=f"{speed.rate():.2f}")
        bar.update(1)
        kept = train_step.weights
        if run.snapshot(kept, done) is not None:   # and how that snapshot continues clips
            run.log(done, **continuation_scores(kept, backend, run))
        if (s.sample_every and done % s.sample_every == 0) or done == s.steps:
            write_rollout_samples(run, kept, backend, done)
        run.checkpoint(done, s.steps, objects, extra={"pattern": str(pattern)},
                       on_stop=lambda: write_rollout_samples(run, kept, backend, done))
    bar.close()
    return run.export(train_step.weights)


def write_rollout_samples(run: StageRun, model, backend, step: int, n: int = 4,
                          horizons: int = 2):
    """GIFs of few-step rollouts past the training horizon (`horizons` x)."""
    cfg = run.cfg
    model.eval()
    video = generate(model, backend, cfg, n, cfg.video.frames * horizons,
                     torch.Generator().manual_seed(step), run.device, run.compute_dtype,
                     autocast=run.autocast())
    model.train()
    return run.write_samples(step, video)
