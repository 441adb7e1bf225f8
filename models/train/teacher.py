"""Stage a: the bidirectional flow-matching teacher on clips of the training horizon.

One flow time per clip (the teacher is later the real score of DMD, which noises a whole
generated video at one level); x-prediction with the velocity loss (models/flow.py).
The exported weights are the EMA's when the config keeps one.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from ..attention import SequenceAttention
from ..flow import add_noise, sample_times, velocity_loss
from ..sampling import sample_clip
from .common import StageRun, Throughput, load_stage_weights, per_sample

LABEL_DROPOUT = 0.1   # classifier-free guidance needs the unconditional model too
TIME, NOISE, LABEL = 1, 2, 3   # streams of one sample's random draws


def train_teacher(cfg, run_dir, info=None, progress: bool = True,
                  time_limit: Optional[float] = None, data: Optional[str] = None,
                  init: Optional[str] = None) -> Path:
    """`init`: a weights file (or run folder) the model and its EMA start from, with a fresh
    optimiser: how a teacher grows over several short GPU leases when its checkpoint (with
    the optimiser, 6x the weights) cannot travel between them. A run folder that already has
    a checkpoint resumes from it instead."""
    run = StageRun(cfg, "teacher", run_dir, info, progress, time_limit, data)
    s = run.scfg
    model = run.new_model()
    if init is not None:
        model.load_state_dict(load_stage_weights(cfg, init, "teacher", run.device).state_dict())
    opt = run.optimizer(model, s.lr)
    objects = {"model": model, "optim": opt}
    ema = None
    if s.ema:
        ema = copy.deepcopy(model).requires_grad_(False)
        objects["ema"] = ema
    start = run.resume(objects)
    attend = SequenceAttention(None, cfg.tokens_per_frame)
    F_ = cfg.video.frames
    speed = Throughput()
    bar = run.bar(start, s.steps, "teacher")
    for step, batch in zip(range(start, s.steps), run.clips(start, s.steps)):
        x0 = batch["video"]
        idx = run.local_indices(step)
        t = per_sample(run, step, idx, lambda g: sample_times((1,), cfg.flow.shift, g),
                       TIME).expand(-1, F_)
        noise = per_sample(run, step, idx, lambda g: torch.randn(x0.shape[1:], generator=g), NOISE)
        label = None
        if cfg.model.num_classes:
            drop = per_sample(run, step, idx, lambda g: torch.rand((), generator=g) < LABEL_DROPOUT,
                              LABEL)
            label = torch.where(drop, cfg.model.num_classes, batch["label"])
        with run.autocast():
            x0_hat = model(add_noise(x0, noise, t), t, attend, label=label)
        loss = velocity_loss(x0_hat, x0, t)
        run.set_lr(opt, step, s.lr)
        grad_norm = run.sync_and_step(model, opt, loss)
        if ema is not None:
            run.update_ema(ema, model, s.ema, step)
        speed.add(s.batch)
        done = step + 1
        if done % s.log_every == 0 or done == s.steps:
            run.log(done, loss=loss.item(), grad_norm=grad_norm)
            bar.set_postfix(loss=f"{loss.item():.4f}", clips_per_s=f"{speed.rate():.1f}")
        bar.update(1)
        if (s.sample_every and done % s.sample_every == 0) or done == s.steps:
            write_teacher_samples(run, ema or model, done)
        run.checkpoint(done, s.steps, objects,
                       on_stop=lambda: write_teacher_samples(run, ema or model, done))
    bar.close()
    return run.export(ema or model)


def write_teacher_samples(run: StageRun, model, step: int, n: int = 4):
    cfg = run.cfg
    g = torch.Generator().manual_seed(step)
    v = cfg.video
    noise = torch.randn(n, v.frames, v.channels, v.height, v.width, generator=g).to(run.device)
    model.eval()
    video = sample_clip(model, cfg, noise, autocast=run.autocast())
    model.train()
    return run.write_samples(step, video)
