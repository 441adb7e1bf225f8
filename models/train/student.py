"""Stage b: the causal few-step student, initialised from the teacher.

Causal Forcing's rule (MODEL.md): ODE pairs from a *bidirectional* teacher are ill-defined
for a causal student — two clips with the same past but different futures give the same
causal input different targets — so the student first becomes an autoregressive diffusion
model, and the ODE pairs come from that AR model, whose trajectories a causal student can
follow. Two phases in one run (steps count across both):

1. `ar_steps` of autoregressive diffusion with teacher forcing: the clip's clean copy and
   a noisy copy (one flow time per chunk) in one sequence under `teacher_forcing_mask`, so
   that noisy chunk i sees clean chunks < i and itself, as it will at inference.
2. at the switch, `ode_pairs` trajectories are sampled from that AR model (many Euler
   steps per chunk, the chunk's clean pass committed as at inference) with the state
   recorded at the student's few-step times, and saved in the run folder; then `steps` of
   causal ODE regression: chunk i noised to a recorded time, context the trajectory's own
   clean chunks, target its endpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..attention import DenseBackend, TeacherForcingAttention
from ..flow import add_noise, sample_times, velocity_loss
from ..sampling import ar_ode_rollout, generate, ode_grid
from .common import StageRun, Throughput, load_stage_weights, per_sample, require_unconditional
from .validation import continuation_scores

PAIRS_FILE = "ode_pairs.safetensors"
TIME, NOISE = 1, 2   # streams of one sample's random draws


def teacher_forced(model, run: StageRun, clean, noisy, t_noisy, label=None):
    """x0 predictions of the noisy copy given the clean copy as causal context."""
    cfg = run.cfg
    F_ = cfg.video.frames
    attend = teacher_forcing_attention(cfg)
    t = torch.cat([torch.zeros_like(t_noisy), t_noisy], dim=1)
    positions = torch.cat([torch.arange(F_), torch.arange(F_)])
    with run.autocast():
        out = model(torch.cat([clean, noisy], dim=1), t, attend, frame_positions=positions,
                    label=label)
    return out[:, F_:]


def teacher_forcing_attention(cfg) -> TeacherForcingAttention:
    return TeacherForcingAttention(cfg.video.frames, cfg.video.chunk_frames, cfg.tokens_per_frame)


def chunk_times(run, step, idx, shift):
    """One flow time per chunk, repeated over its frames: [b, F]."""
    cfg = run.cfg
    n = cfg.video.frames // cfg.video.chunk_frames
    t = per_sample(run, step, idx, lambda g: sample_times((n,), shift, g), TIME)
    return t.repeat_interleave(cfg.video.chunk_frames, dim=1)


def train_student(cfg, run_dir, teacher, info=None, progress: bool = True,
                  time_limit: Optional[float] = None, data: Optional[str] = None) -> Path:
    run = StageRun(cfg, "student", run_dir, info, progress, time_limit, data)
    require_unconditional(cfg, "student")
    s = run.scfg
    total = s.ar_steps + s.steps
    model = load_stage_weights(cfg, teacher, "teacher", run.device)
    opt = run.optimizer(model, s.lr)
    objects = {"model": model, "optim": opt}
    start = run.resume(objects)
    speed = Throughput()
    bar = run.bar(start, total, "student")
    if start < s.ar_steps:   # phase 1: AR diffusion with teacher forcing
        for step, batch in zip(range(start, s.ar_steps), run.clips(start, s.ar_steps)):
            x0 = batch["video"]
            idx = run.local_indices(step)
            t = chunk_times(run, step, idx, cfg.flow.shift)
            noise = per_sample(run, step, idx, lambda g: torch.randn(x0.shape[1:], generator=g),
                               NOISE)
            x0_hat = teacher_forced(model, run, x0, add_noise(x0, noise, t), t)
            loss = velocity_loss(x0_hat, x0, t)
            _finish_step(run, bar, speed, model, opt, objects, step, loss, "ar_loss", total)
    if start < total and s.steps:   # phase 2: causal ODE regression
        video, traj, times = ode_pairs(run, model)
        P = video.shape[0]
        c = cfg.video.chunk_frames
        for step in range(max(start, s.ar_steps), total):
            idx = run.local_indices(step)
            pick = torch.tensor([i % P for i in idx])
            clean = run.to_device(video[pick]).float()
            n_chunks = cfg.video.frames // c
            k = per_sample(run, step, idx, lambda g: torch.randint(len(times), (n_chunks,), generator=g),
                           TIME)
            k = k.repeat_interleave(c, dim=1).cpu()                                   # [b, F]
            noisy = traj[pick[:, None], torch.arange(cfg.video.frames)[None], k]      # [b, F, C, H, W]
            t = run.to_device(torch.tensor(times)[k])
            x0_hat = teacher_forced(model, run, clean, run.to_device(noisy).float(), t)
            loss = torch.mean((x0_hat.float() - clean) ** 2)
            _finish_step(run, bar, speed, model, opt, objects, step, loss, "ode_loss", total)
    bar.close()
    return run.export(model, steps_done=total)


def _finish_step(run, bar, speed, model, opt, objects, step, loss, name, total):
    s = run.scfg
    run.set_lr(opt, step, s.lr)
    grad_norm = run.sync_and_step(model, opt, loss)
    speed.add(s.batch)
    done = step + 1
    if done % s.log_every == 0 or done == total:
        run.log(done, **{name: loss.item(), "grad_norm": grad_norm})
        bar.set_postfix(**{name: f"{loss.item():.4f}", "clips_per_s": f"{speed.rate():.1f}"})
    bar.update(1)
    if run.snapshot(model, done) is not None:   # and how that snapshot continues clips
        run.log(done, **continuation_scores(model, DenseBackend(run.cfg), run))
    if (s.sample_every and done % s.sample_every == 0) or done == total:
        write_student_samples(run, model, done)
    # the switch between the phases is always a checkpoint: the ODE pairs are drawn from
    # exactly the phase-1 weights, also after a resume
    run.checkpoint(done, total, objects, always=done == s.ar_steps,
                   on_stop=lambda: write_student_samples(run, model, done))


def ode_pairs(run: StageRun, model):
    """(video [P, F, C, H, W], trajectory [P, F, K, C, H, W], times [K]) of the AR model,
    generated once at the phase switch and kept in the run folder (fp16)."""
    cfg, s = run.cfg, run.scfg
    path = run.run_dir / PAIRS_FILE
    grid, times = ode_grid(cfg)
    if path.is_file():
        saved = load_file(str(path))
        return saved["video"], saved["trajectory"], times
    v = cfg.video
    videos, trajs = [], []
    backend = DenseBackend(cfg, cache_frames=v.frames)   # the whole horizon: block-causal
    model.eval()
    for lo in tqdm(range(0, s.ode_pairs, s.batch), desc="ODE pairs", disable=not run.progress):
        n = min(s.batch, s.ode_pairs - lo)
        noise = torch.stack([torch.randn(v.frames, v.channels, v.height, v.width,
                                         generator=run.generator(-1, lo + i)) for i in range(n)])
        cache = backend.new_cache(n, run.device, run.compute_dtype)
        video, traj = ar_ode_rollout(model, cache, noise.to(run.device), grid, times,
                                     autocast=run.autocast())
        videos.append(video.half().cpu())
        trajs.append(traj.half().cpu())
    model.train()
    video, traj = torch.cat(videos), torch.cat(trajs)
    if run.main:
        tmp = path.with_suffix(".tmp")
        save_file({"video": video.contiguous(), "trajectory": traj.contiguous()}, str(tmp))
        tmp.replace(path)
    return video, traj, times


def write_student_samples(run: StageRun, model, step: int, n: int = 4):
    cfg = run.cfg
    model.eval()
    video = generate(model, DenseBackend(cfg), cfg, n, cfg.video.frames,
                     torch.Generator().manual_seed(step), run.device, run.compute_dtype,
                     autocast=run.autocast())
    model.train()
    return run.write_samples(step, video)
