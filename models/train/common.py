"""What every training stage shares: a `StageRun` owns the run folder, the device and the
processes, the optimiser steps, checkpoints, logs, curves and sample GIFs.

Exact resume. Everything random in step s is drawn from generators derived from
(seed, stage, s, sample index) (`checkpoint.sample_generator`), and clips are a pure
function of their index, so a step depends only on the weights and optimiser state
saved before it: a run killed at any moment and resumed from its last checkpoint ends
with exactly the weights of an uninterrupted run. For the same reason the result does
not depend on how many processes share the global batch (up to float summation order).

Processes. Under `torchrun` every rank takes a contiguous slice of each global batch;
gradients are averaged with one all_reduce per parameter (what DistributedDataParallel
does, done by hand because the self-forcing step runs the generator many times before
its one backward, which DDP's hooks do not allow). gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint as ckpt
from .. import media
from ..config import Config, ConfigError, StageConfig
from ..data import WorldClips, to_uint8
from ..video_files import VideoFolder
from ..distributed import DistInfo, barrier, init_distributed, is_main, shard_batch
from ..dit import CausalDiT
from . import profiling
from .snapshots import snapshot_path

STAGE_CODES = {"teacher": 1, "student": 2, "self_forcing": 3}


def default_run_dir(cfg: Config, stage: str, pattern: Optional[str] = None) -> Path:
    tag = stage if not pattern or pattern == "dense" else f"{stage}-{Path(str(pattern)).stem}"
    return Path("runs") / cfg.name / tag


def resolve_device(cfg: Config, info: DistInfo) -> torch.device:
    if info.device is not None and info.device.type == "cuda":
        return info.device
    if cfg.device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(cfg.device)


class StageRun:
    """One stage's run: folder, device, processes, progress, checkpoints, pictures."""

    def __init__(self, cfg: Config, stage: str, run_dir, info: Optional[DistInfo] = None,
                 progress: bool = True, time_limit: Optional[float] = None,
                 data: Optional[str] = None):
        self.cfg, self.stage = cfg, stage
        self.data = data      # a folder of the user's videos instead of the procedural world
        # stop at a checkpoint once `time_limit` minutes have passed (resume continues)
        self.deadline = None if time_limit is None else time.monotonic() + 60 * time_limit
        self.started = time.monotonic()
        self.scfg: StageConfig = getattr(cfg, stage)
        self.run_dir = Path(run_dir)
        self.info = info or init_distributed(cfg.device)
        self.device = resolve_device(cfg, self.info)
        self.main = is_main(self.info)
        self.progress = progress and self.main
        self.history: dict[str, list] = {}
        self.stage_code = STAGE_CODES[stage]
        if self.scfg.batch % self.info.world_size:
            raise ValueError(f"{stage}.batch = {self.scfg.batch} is not divisible by the "
                             f"{self.info.world_size} processes: each takes an equal share")
        if self.main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # --- numerics -------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast on CUDA with fp32 master weights (Causal Forcing: BF16 weights can
        collapse in distillation); plain fp32 on CPU."""
        if self.device.type == "cuda" and self.cfg.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.device.type == "cuda" and self.cfg.precision == "bf16":
            return torch.bfloat16
        return torch.float32

    def generator(self, step: int, index: int, *purpose: int) -> torch.Generator:
        """The CPU generator of sample `index` of global step `step` (index -1: the step's
        shared draws, e.g. the exit steps of a rollout); `purpose` keeps the streams of
        different draws of one sample apart."""
        return ckpt.sample_generator(self.scfg.seed, self.stage_code, step, index, *purpose)

    def local_indices(self, step: int) -> list[int]:
        """Global sample indices of this rank's share of step `step`'s batch."""
        B = self.scfg.batch
        return shard_batch(list(range(step * B, (step + 1) * B)), self.info)

    def new_model(self) -> CausalDiT:
        """A freshly initialised model, the same in every process and every run of this
        seed (its initialisation draws from a generator keyed by the stage seed, not from
        torch's global one)."""
        init_seed = self.generator(-2, -2).initial_seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return CausalDiT(self.cfg).to(self.device)

    def optimizer(self, model, lr: float, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas,
                                 weight_decay=self.scfg.weight_decay)

    def set_lr(self, opt, step: int, lr: float) -> None:
        """Linear warm-up, then constant (a function of the step alone, so resume is exact)."""
        scale = min(1.0, (step + 1) / self.scfg.warmup) if self.scfg.warmup else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * scale

    def sync_and_step(self, model, opt, loss: torch.Tensor) -> torch.Tensor:
        """backward, average gradients over the processes, clip, step; the grad norm as a
        0-dim tensor. Read it (float()) only when logging: reading it waits for the GPU to
        finish the step, and a wait at every step keeps the host from preparing the next
        one while the GPU computes (the student loop ran at a third of its benchmark)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.average_gradients(model)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.scfg.grad_clip or math.inf)
        opt.step()
        return norm.detach()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the run's device without waiting for the GPU: a plain copy from
        pageable memory synchronises the stream; from pinned memory it is queued."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def average_gradients(self, model) -> None:
        if self.info.world_size == 1:
            return
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.info.world_size

    @staticmethod
    @torch.no_grad()
    def update_ema(ema, model, decay: float, step: int) -> None:
        """EMA with a warm-up ((1 + s) / (10 + s) caps the decay early), so that a short
        run's average is not dominated by the initial weights."""
        decay = min(decay, (1 + step) / (10 + step))
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    # --- data -----------------------------------------------------------------------------
    def clips(self, start_step: int, steps: int) -> Iterator[dict]:
        """This rank's share of every global batch from `start_step` on (a DataLoader with
        worker processes over the procedural world)."""
        if self.data is None:
            dataset = WorldClips(self.cfg, base_seed=1_000_003 * self.scfg.seed)
        else:
            dataset = _Cycled(VideoFolder(self.data, self.cfg))
        batches = [self.local_indices(s) for s in range(start_step, steps)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                             num_workers=self.scfg.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=False)
        for batch in loader:
            yield {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                   for k, v in batch.items()}

    # --- checkpoints ----------------------------------------------------------------------
    def resume(self, state_objects: dict) -> int:
        """Load the last checkpoint of this run into `state_objects` (name -> module or
        optimizer); returns the step to continue from (0 for a new run)."""
        if ckpt.latest_step(self.run_dir) is None:
            return 0
        state, meta = ckpt.load_checkpoint(self.run_dir, cfg=self.cfg, map_location=self.device)
        if meta.get("stage") != self.stage:
            raise ckpt.CheckpointError(f"{self.run_dir}: holds a {meta.get('stage')!r} run, not "
                                       f"{self.stage!r}; use another --run-dir")
        for name, obj in state_objects.items():
            obj.load_state_dict(state[name])
        self.resumed_at = int(meta["step"])
        self.history = {k: [tuple(x) for x in v] for k, v in meta.get("history", {}).items()}
        if self.progress:
            print(f"resuming {self.stage} from step {meta['step']} ({self.run_dir})", flush=True)
        return int(meta["step"])

    def save(self, step: int, state_objects: dict, extra: Optional[dict] = None) -> None:
        if self.main:
            state = {name: obj.state_dict() for name, obj in state_objects.items()}
            meta = {"stage": self.stage, "history": self.history, **(extra or {})}
            ckpt.save_checkpoint(self.run_dir, step, state, meta, self.cfg)
        barrier(self.info)

    def checkpoint(self, done: int, total: int, objects: dict, extra: Optional[dict] = None,
                   always: bool = False, on_stop=None) -> None:
        """Save every `checkpoint_every` steps and at the end; past the time limit, save and
        raise `TimeLimitReached` (every process agrees, so none waits on the others). Every
        stage calls it once at the end of each step (`train --profile` counts steps here)."""
        profiling.tick(self.device)
        late = self.deadline is not None and time.monotonic() > self.deadline
        if self.info.world_size > 1:
            flag = torch.tensor([float(late)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        if always or late or done % self.scfg.checkpoint_every == 0 or done == total:
            self.save(done, objects, extra)
            self.plot()
        if late and done < total:
            if on_stop is not None:
                on_stop()   # e.g. sample GIFs of the weights reached
            raise TimeLimitReached(self.stage, done, total, self.run_dir)

    def summary(self, steps_done: int) -> dict:
        """Wall time and throughput of this process's part of the run (summary.json)."""
        wall = time.monotonic() - self.started
        steps = steps_done - getattr(self, "resumed_at", 0)
        out = {"stage": self.stage, "config": self.cfg.name, "steps": steps_done,
               "steps_this_run": steps, "wall_s": round(wall, 1),
               "clips_per_s": round(steps * self.scfg.batch / max(wall, 1e-9), 2),
               "device": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                          else "cpu"), "processes": self.info.world_size}
        if self.device.type == "cuda":
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return out

    def export(self, model, name: str = "weights", steps_done: Optional[int] = None) -> Path:
        """The finished stage's weights as one small bf16 safetensors file."""
        path = self.run_dir / f"{name}.safetensors"
        if self.main:
            summary = self.summary(steps_done if steps_done is not None else self.scfg.steps)
            with ckpt.atomic_path(self.run_dir / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=1))
            print(" ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
            ckpt.export_weights(path, model.state_dict(), self.cfg,
                                meta={"stage": self.stage})
        barrier(self.info)
        return path

    # --- logs and pictures ----------------------------------------------------------------
    def bar(self, start: int, total: int, desc: str):
        return tqdm(total=total, initial=start, desc=desc, disable=not self.progress,
                    dynamic_ncols=True, unit="step")

    def log(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.history.setdefault(k, []).append((step, float(v)))

    def plot(self) -> None:
        """loss.png, and history.json beside it: the curves in a file small enough to keep
        when the checkpoints (with their optimiser state) are not."""
        if self.main and self.history:
            media.plot_curves(self.run_dir / "loss.png", self.history,
                              title=f"{self.cfg.name} {self.stage}")
            with ckpt.atomic_path(self.run_dir / "history.json") as tmp:
                tmp.write_text(json.dumps(self.history))

    def snapshot(self, model, done: int) -> Optional[Path]:
        """Every `snapshot_every` steps, the weights reached (bf16, in snapshots/): a stage
        whose late steps may be worse than its early ones (DMD) keeps every candidate, for
        choosing by evaluation afterwards."""
        every = self.scfg.snapshot_every
        if not (self.main and every and done % every == 0):
            return None
        path = snapshot_path(self.run_dir, done)
        path.parent.mkdir(exist_ok=True)
        return ckpt.export_weights(path, model.state_dict(), self.cfg,
                                   meta={"stage": self.stage, "step": done})

    def write_samples(self, step: int, videos: torch.Tensor, truth: Optional[torch.Tensor] = None,
                      tag: str = "") -> Optional[Path]:
        """A GIF of generated clips (side by side, the true clip first when given)."""
        if not self.main:
            return None
        cols = [to_uint8(v) for v in videos.float().cpu()]
        labels = [f"sample {i}" for i in range(len(cols))]
        if truth is not None:
            cols = [to_uint8(truth.float().cpu())] + cols
            labels = ["truth"] + labels
        path = self.run_dir / "samples" / f"{tag}step-{step:07d}.gif"
        media.write_gif(path, cols, fps=8, scale=2, labels=labels)
        return path


class _Cycled(torch.utils.data.Dataset):
    """A finite dataset indexed by ever-growing sample indices (epochs wrap around)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, i: int) -> dict:
        return self.dataset[i % len(self.dataset)]


def per_sample(run: StageRun, step: int, indices: list[int], draw, *purpose: int) -> torch.Tensor:
    """Stack `draw(generator)` over the samples of a batch, each from its own generator
    (keyed by step, sample and `purpose`), and move the result to the run's device."""
    return run.to_device(torch.stack([draw(run.generator(step, i, *purpose)) for i in indices]))


class TimeLimitReached(Exception):
    """A stage stopped at a checkpoint because its --time-limit ran out; rerun to resume."""

    def __init__(self, stage: str, step: int, total: int, run_dir: Path):
        self.stage, self.step, self.total, self.run_dir = stage, step, total, run_dir
        super().__init__(f"{stage}: time limit reached at step {step} of {total}; checkpoint "
                         f"saved in {run_dir}; run the same command to continue")


class Throughput:
    """Clips per second over the last log interval."""

    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.n / max(now - self.t0, 1e-9)
        self.t0, self.n = now, 0
        return r


def require_unconditional(cfg: Config, stage: str) -> None:
    """Label conditioning reaches the model and the teacher stage; the causal stages do not
    draw labels yet, so a conditional config is refused there rather than run unconditioned."""
    if cfg.model.num_classes:
        raise ConfigError("config", "model.num_classes", cfg.model.num_classes,
                          f"0 for the {stage} stage (label conditioning is implemented in the "
                          "model and the teacher stage only so far)")


EXPORTED_STATE = ("ema", "generator", "model")   # what a stage's weights are, by preference


def export_run(cfg: Config, run_dir, out=None) -> Path:
    """Export the weights of a run's last checkpoint (a stage stopped by --time-limit, or
    an earlier step of a finished one): the EMA when the run keeps one, else the generator
    (self-forcing) or the model."""
    run_dir = Path(run_dir)
    state, meta = ckpt.load_checkpoint(run_dir, cfg=cfg)
    key = next(k for k in EXPORTED_STATE if k in state)
    path = Path(out) if out else run_dir / "weights.safetensors"
    ckpt.export_weights(path, state[key], cfg, meta={"stage": meta.get("stage"),
                                                       "step": meta["step"], "state": key})
    return path


def load_stage_weights(cfg: Config, source, stage_hint: str, device) -> CausalDiT:
    """A model with the weights of a finished stage: a run folder (its exported
    `<name>.safetensors`, else its last checkpoint) or a .safetensors file."""
    path = Path(source)
    model = CausalDiT(cfg)
    if path.is_dir():
        if (path / "weights.safetensors").is_file():
            path = path / "weights.safetensors"
        else:
            state, _ = ckpt.load_checkpoint(path, cfg=cfg)
            model.load_state_dict(state[next(k for k in EXPORTED_STATE if k in state)])
            return model.to(device)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such {stage_hint} run folder or weights file; "
                                f"train it first (`sparse-forcing train {stage_hint} ...`) or pass "
                                f"--{stage_hint.replace('_', '-')} PATH")
    weights, _, _ = ckpt.import_weights(path, cfg)
    model.load_state_dict(weights)
    return model.to(device)
