"""Generation far past the training horizon: load weights, roll out N frames under any
attention backend, measure it, and write what people look at.

    model, cfg = load_generator("runs/small/self-forcing/weights.safetensors")
    result = generate(model, cfg, pattern="sparse-forcing", frames=240, prefix_frames=3,
                      world_seed=0)
    write_outputs(result, "out/generate")     # generated.gif / .mp4 (truth | generated), stats.json

    sparse-forcing generate WEIGHTS --pattern sparse-forcing --frames 240 --prefix 3

The generation continues a prefix of clean frames (prefilled into the cache exactly as a
generated chunk's clean pass would be: `models.sampling.continue_video`) taken from the
procedural world (`render(world_seed, 0, P)`, whose true continuation
`render(world_seed, P, N)` exists to any length) or from the first clip of a folder of the
user's videos; with P = 0 it starts from noise and has no truth. The batch's samples all
continue the same prefix (one truth, B continuations drawn from one seeded CPU generator,
so the samples do not depend on the device).

Measured: the latency of every chunk (4 denoising steps + the clean pass; on CUDA the clock
is read after a synchronize), the time to the first chunk (prefill included: what a viewer
waits for), frames per second over the generated frames of all the batch's samples (prefill
excluded, reported on its own; at batch 1 the stream's rate), peak memory (`torch.cuda.max_memory_allocated` on a GPU; on CPU the process's peak
RSS, which covers its whole life, model loading included) and the cache's bytes after
every chunk: a bounded backend's stay constant once its window has filled, whatever N.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .attention import DenseBackend, make_backend
from .checkpoint import CheckpointError, import_weights
from .config import Config, ConfigError, from_dict, load_config
from .data import from_uint8, to_uint8
from .dit import CausalDiT
from .rollout import prefill
from .sampling import continue_video
from .video_files import VideoFileError, VideoFolder
from .world import render

DEFAULT_FRAMES = 240
GIF_WIDTH = 128            # each column of the GIF/MP4 is upscaled to about this many pixels


class GenerateError(ValueError):
    """A generation argument that cannot be used; the message names the argument."""


# =========================================================================================
# loading
# =========================================================================================
def load_generator(weights: Union[str, Path], config: Union[None, str, Path, Config] = None,
                   device="cpu") -> tuple[CausalDiT, Config]:
    """(model in eval mode on `device`, its config) from an exported `.safetensors` file (the
    config is read from its metadata; with `config` given, a file of another architecture
    is refused naming the first differing field) or a run folder (its `weights.safetensors`,
    else its last checkpoint; the config from `config`, else the folder's config.json)."""
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"{weights}: no such weights file or run folder")
    cfg = load_config(config) if isinstance(config, (str, Path)) else config
    if path.is_dir() and (path / "weights.safetensors").is_file():
        path = path / "weights.safetensors"
    if path.is_dir():
        from .train.common import load_stage_weights
        if cfg is None:
            saved = path / "config.json"
            if not saved.is_file():
                raise CheckpointError(f"{path}: a run folder without config.json or "
                                      "weights.safetensors; pass --config")
            try:
                cfg = from_dict(json.loads(saved.read_text()), source=str(saved))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{saved}: corrupt: not valid JSON ({e})") from None
        model = load_stage_weights(cfg, path, "self_forcing", "cpu")
    else:
        state, cfg_dict, _ = import_weights(path, cfg)
        if cfg is None:
            cfg = from_dict(cfg_dict, source=str(path))
        model = CausalDiT(cfg)
        model.load_state_dict(state)
    return model.to(device).eval(), cfg


def resolve_device(device, cfg: Config) -> torch.device:
    """"auto" (or None: the config's device) -> CUDA when present, else CPU."""
    name = cfg.device if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# =========================================================================================
# generation
# =========================================================================================
@dataclass
class GenerationResult:
    """One generation run: the frames (uint8 [.., H, W, 3]) and what it cost."""
    video: np.ndarray                   # generated, uint8 [B, N, H, W, 3]
    samples: torch.Tensor               # the same, float32 [B, N, C, H, W] as generated (CPU)
    truth: Optional[np.ndarray]         # the true continuation, uint8 [M, H, W, 3] (M <= N), or None
    prefix: Optional[np.ndarray]        # the prefilled frames, uint8 [P, H, W, 3], or None
    chunk_latencies_s: list             # per chunk: denoising steps + clean pass
    time_to_first_chunk_s: float        # from the start of the prefill to the first chunk
    frames_per_s: float                 # batch x frames / generation time (prefill excluded)
    steady_frames_per_s: Optional[float]  # the same without the first chunk (warm-up, JIT)
    prefill_s: float
    total_s: float                      # prefill + generation
    peak_memory_bytes: int
    peak_memory_method: str             # "cuda max_memory_allocated" | "peak RSS"
    cache_bytes: list                   # cache.nbytes() after each chunk
    cache_bounded: Optional[bool]       # the backend holds a fixed amount whatever N (None: unknown)
    backend: str                        # the backend's description
    pattern: str                        # its short name
    config: str
    device: str
    batch: int
    frames: int                         # N (after rounding up to whole chunks)
    prefix_frames: int
    chunk_frames: int
    horizon_frames: int                 # the training horizon (cfg.video.frames)
    seed: int
    source: str                         # "noise" | "world seed S" | "video FILE"
    notes: list = field(default_factory=list)
    memory: list = field(default_factory=list)   # a pattern's MemorySnapshot after each chunk (layer 0)
    revisits: list = field(default_factory=list)  # (sprite, left, back) of a world's returns in range

    @property
    def horizon_multiple(self) -> float:
        return self.frames / self.horizon_frames

    @property
    def cache_constant_from_chunk(self) -> int:
        """The first chunk from which the cache's bytes never change again."""
        return constant_from(self.cache_bytes)

    def stats(self) -> dict:
        """Every number of the run, JSON-able (stats.json)."""
        lat = self.chunk_latencies_s
        return {
            "config": self.config, "pattern": self.pattern, "backend": self.backend,
            "device": self.device, "source": self.source, "seed": self.seed,
            "batch": self.batch, "frames": self.frames, "prefix_frames": self.prefix_frames,
            "chunk_frames": self.chunk_frames, "chunks": len(lat),
            "horizon_frames": self.horizon_frames,
            "horizon_multiple": round(self.horizon_multiple, 3),
            "frames_per_s": self.frames_per_s, "steady_frames_per_s": self.steady_frames_per_s,
            "time_to_first_chunk_s": self.time_to_first_chunk_s, "prefill_s": self.prefill_s,
            "total_s": self.total_s,
            "chunk_latency_median_s": statistics.median(lat),
            "chunk_latency_max_s": max(lat), "chunk_latencies_s": lat,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_method": self.peak_memory_method,
            "cache_bytes_first": self.cache_bytes[0], "cache_bytes_last": self.cache_bytes[-1],
            "cache_bytes_max": max(self.cache_bytes),
            "cache_constant_from_chunk": self.cache_constant_from_chunk,
            "cache_bounded": self.cache_bounded,
            "cache_bytes": self.cache_bytes,
            "truth_frames": 0 if self.truth is None else len(self.truth),
            "revisits": [list(r) for r in self.revisits],
            "revisit_memory": revisit_memory(self) if self.memory else [],
            "notes": self.notes,
        }


def constant_from(values: Sequence) -> int:
    """The smallest i such that values[i:] are all equal (len - 1 for a growing list)."""
    i = len(values) - 1
    while i > 0 and values[i - 1] == values[-1]:
        i -= 1
    return i


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise GenerateError(f"{name} = {value!r}: expected an integer >= {minimum}")
    return int(value)


def _display(x: torch.Tensor) -> np.ndarray:
    """[..., C, H, W] in [-1, 1] -> uint8 [..., H, W, 3] (gray repeated, latents: first 3)."""
    C = x.shape[-3]
    if C == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    elif C != 3:
        x = x[..., :3, :, :]
    return to_uint8(x)


def _backend(cfg: Config, pattern, cache_frames: Optional[int], device, dtype):
    """A backend from 'dense', a preset name, a .py file, a Pattern or a backend object."""
    if hasattr(pattern, "new_cache"):          # already a backend (DenseBackend, PatternBackend)
        if cache_frames is not None:
            raise GenerateError("cache_frames: give it with pattern='dense', not with a backend")
        return pattern
    if pattern is None:
        pattern = cfg.attention.pattern
    if isinstance(pattern, (str, Path)) and str(pattern) == "dense":
        if cache_frames is not None:
            _check_int("cache_frames", cache_frames, cfg.video.chunk_frames)
        return DenseBackend(cfg, cache_frames=cache_frames)
    if cache_frames is not None:
        raise GenerateError(f"cache_frames = {cache_frames}: only the 'dense' backend has a "
                            f"rolling cache of a chosen length, not pattern {pattern!r}")
    from sparsedsl import presets
    from sparsedsl.cli import CliError
    if isinstance(pattern, (str, Path)):
        spec = str(pattern)
        if spec not in presets.PRESETS and not spec.endswith(".py"):
            raise GenerateError(f"pattern = {spec!r}: expected 'dense', a sparsedsl preset ("
                                + ", ".join(presets.PRESETS) + ") or a .py file defining `pattern`")
    try:
        return make_backend(cfg, pattern, device=device, dtype=dtype)
    except CliError as e:            # the user's pattern file: missing, no `pattern`, fails
        raise GenerateError(f"pattern: {e}") from None


def _name(backend) -> str:
    return getattr(backend, "name", type(backend).__name__)


def _bounded(backend) -> Optional[bool]:
    """Whether the backend's cache holds a fixed amount whatever the length: a rolling dense
    cache does (it may not fill in a short run); a pattern does when its window is bounded
    (an unbounded one's pool is allocated for all the frames of the run)."""
    if isinstance(backend, DenseBackend):
        return True
    schedule = getattr(getattr(backend, "program", None), "schedule", None)
    return None if schedule is None else schedule.window.frames is not None


def _world_prefix(cfg: Config, world_seed: int, P: int, N: int):
    try:
        prefix, _ = render(world_seed, 0, P, cfg.video, cfg.world)
        truth, _ = render(world_seed, P, N, cfg.video, cfg.world)
    except ValueError as e:          # a config the world cannot render
        raise GenerateError(f"world_seed = {world_seed}: {e}") from None
    return from_uint8(prefix), prefix, truth


def _folder_prefix(cfg: Config, folder, P: int, N: int):
    """The first clip (P frames) of the folder's first video, and the frames after it in the
    same file (up to N, whole clips: the truth; possibly shorter, or empty)."""
    video = dataclasses.replace(cfg.video, frames=P)
    clips = VideoFolder(folder, dataclasses.replace(cfg, video=video), stride=P)
    first, _ = clips.windows[0]
    index = {w: i for i, w in enumerate(clips.windows)}
    prefix = clips[0]["video"]
    after = []
    while sum(len(a) for a in after) < N and (first, (len(after) + 1) * P) in index:
        after.append(clips[index[(first, (len(after) + 1) * P)]]["video"])
    truth = to_uint8(torch.cat(after)[:N]) if after else None
    return prefix, to_uint8(prefix), truth, first


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)   # bytes on macOS, KiB elsewhere


@torch.no_grad()
def generate(model, cfg: Config, pattern="dense", frames: int = DEFAULT_FRAMES,
             prefix_frames: int = 0, seed: int = 0, world_seed: Optional[int] = None,
             video_folder: Union[None, str, Path] = None, batch: int = 1, device=None,
             progress: bool = True, cache_frames: Optional[int] = None) -> GenerationResult:
    """Generate `frames` frames (rounded up to whole chunks, with a note) after a prefix of
    `prefix_frames` clean frames from world `world_seed` or from the first clip of
    `video_folder` (neither, with prefix_frames = 0: from noise), under `pattern`: "dense"
    (the config's rolling cache, or `cache_frames` frames), a sparsedsl preset name, a .py
    file defining `pattern`, a `sparsedsl.Pattern` (re-laid out at the model's geometry) or
    a backend object. `device` None: the model's."""
    c = cfg.video.chunk_frames
    frames = _check_int("frames", frames, 1)
    P = _check_int("prefix_frames", prefix_frames, 0)
    seed = _check_int("seed", seed, 0)
    batch = _check_int("batch", batch, 1)
    notes = []
    if P % c:
        raise GenerateError(f"prefix_frames = {P}: expected a multiple of chunk_frames = {c} "
                            "(the prefix is committed to the cache a chunk at a time)")
    if frames % c:
        rounded = -(-frames // c) * c
        notes.append(f"frames = {frames} rounded up to {rounded}, a multiple of "
                     f"chunk_frames = {c}")
        print(f"note: {notes[-1]}", file=sys.stderr)
        frames = rounded
    if world_seed is not None and video_folder is not None:
        raise GenerateError("world_seed and video_folder: give one prefix source, not both")
    if P and world_seed is None and video_folder is None:
        raise GenerateError(f"prefix_frames = {P}: needs a source of frames (world_seed or "
                            "video_folder); prefix_frames = 0 generates from noise")
    if not P and video_folder is not None:
        raise GenerateError(f"video_folder = {str(video_folder)!r}: needs prefix_frames >= "
                            f"{c} (one chunk) to continue the video")
    if world_seed is not None:
        _check_int("world_seed", world_seed, 0)

    device = next(model.parameters()).device if device is None else torch.device(device)
    cuda = device.type == "cuda"
    bf16 = cuda and cfg.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None
    backend = _backend(cfg, pattern, cache_frames, device, dtype)

    # the prefix (shared by the batch) and the true continuation
    prefix_u8 = truth = None
    source = "noise"
    prefix = torch.zeros(batch, 0, cfg.video.channels, cfg.video.height, cfg.video.width)
    if P and world_seed is not None:
        clean, prefix_u8, truth = _world_prefix(cfg, world_seed, P, frames)
        source = f"world seed {world_seed}"
    elif P:
        clean, prefix_u8, truth, file = _folder_prefix(cfg, video_folder, P, frames)
        source = f"video {file}"
        if truth is None or len(truth) < frames:
            notes.append(f"{file} holds {0 if truth is None else len(truth)} of the {frames} "
                         "frames after the prefix: the truth is shown as far as it goes")
    if P:
        prefix = clean[None].expand(batch, -1, -1, -1, -1)
    prefix = prefix.to(device)

    generator = torch.Generator().manual_seed(seed)   # CPU: the same noise on every device
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    chunks = frames // c
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=chunks, desc=f"generate ({_name(backend)})", unit="chunk",
                   dynamic_ncols=True, file=sys.stderr)
    latencies, cache_bytes, memory = [], [], []

    sync()
    t0 = time.perf_counter()
    cache = backend.new_cache(batch, device, dtype, max_frames=P + frames)
    if P:
        with autocast or contextlib.nullcontext():
            prefill(model, cache, prefix.to(dtype))
    sync()
    t_prefill = time.perf_counter()
    last = [t_prefill]

    def on_chunk(i: int, x0: torch.Tensor) -> None:
        sync()
        now = time.perf_counter()
        latencies.append(now - last[0])
        last[0] = now
        cache_bytes.append(int(cache.nbytes()))
        if hasattr(cache, "cache") and hasattr(cache.cache, "snapshot"):   # a pattern's memory
            memory.append(cache.cache.snapshot(0))
        if bar is not None:
            bar.set_postfix(ms=f"{1e3 * latencies[-1]:.1f}", cache=_human(cache_bytes[-1]),
                            refresh=False)
            bar.update(1)

    try:
        samples = continue_video(model, backend, cfg, prefix[:, :0], frames, generator,
                                 dtype=dtype, autocast=autocast, on_chunk=on_chunk, cache=cache)
    finally:
        if bar is not None:
            bar.close()
    sync()
    t_end = time.perf_counter()
    if cuda:
        peak, method = int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    else:
        peak, method = _peak_rss_bytes(), "peak RSS"

    gen_s = sum(latencies)
    steady = batch * (frames - c) / sum(latencies[1:]) if len(latencies) > 1 else None
    samples = samples.float().cpu()
    return GenerationResult(
        video=_display(samples), samples=samples, truth=truth, prefix=prefix_u8,
        chunk_latencies_s=latencies, time_to_first_chunk_s=latencies[0] + (t_prefill - t0),
        frames_per_s=batch * frames / gen_s, steady_frames_per_s=steady, prefill_s=t_prefill - t0,
        total_s=t_end - t0, peak_memory_bytes=peak, peak_memory_method=method,
        cache_bytes=cache_bytes, cache_bounded=_bounded(backend), backend=backend.describe(),
        pattern=_name(backend),
        config=cfg.name, device=str(device), batch=batch, frames=frames, prefix_frames=P,
        chunk_frames=c, horizon_frames=cfg.video.frames, seed=seed, source=source,
        notes=notes, memory=memory,
        revisits=_world_revisits(cfg, world_seed, P, frames) if P and world_seed is not None else [])


def _world_revisits(cfg: Config, world_seed: int, P: int, N: int) -> list:
    """(sprite, left, back) for every sprite of the world that leaves the view and comes back
    in a generated frame (back >= P): the world's metadata only, no pixels."""
    from .world import revisits
    found = revisits(world_seed, 0, P + N, cfg.video, cfg.world)
    return sorted((sprite, left, back) for sprite, pairs in found.items()
                  for left, back in pairs if back >= P)


def revisit_memory(result: "GenerationResult") -> list[dict]:
    """Where the last frame that showed each returning sprite was, in the memory that the
    chunk bringing it back attended to: "sink", "window", "persistent" (with how many of
    its blocks were kept, mean over KV heads) or "dropped". Needs a pattern's memory."""
    c, P = result.chunk_frames, result.prefix_frames
    rows = []
    for sprite, left, back in result.revisits:
        chunk = (back - P) // c
        if chunk < 1 or chunk > len(result.memory):   # the memory before chunk 0 is the prefill's
            continue
        snap, last_seen = result.memory[chunk - 1], left - 1
        counts = snap.frame_counts(0)
        rows.append({"sprite": sprite, "left": left, "back": back, "last_seen_frame": last_seen,
                     "picture_x": chunk - 1, "where": snap.place(last_seen, counts),
                     "blocks_kept": round(counts.get(last_seen, 0.0), 2)})
    return rows


# =========================================================================================
# outputs
# =========================================================================================
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"   # pragma: no cover


def summary(result: GenerationResult) -> str:
    """A few lines for people: speed, latency, memory, cache."""
    s = result.stats()
    start = ("from noise" if not result.prefix_frames else
             f"after a {result.prefix_frames}-frame prefix ({result.source})")
    steady = (f" (steady {s['steady_frames_per_s']:.1f} after the first chunk)"
              if s["steady_frames_per_s"] else "")
    const = s["cache_constant_from_chunk"]
    growth = (f"constant from chunk {const + 1} of {s['chunks']}" if const < s["chunks"] - 1
              else "still changing at the last chunk")
    if result.cache_bounded is False:
        growth += ("; unbounded window: the pool is allocated for all "
                   f"{result.prefix_frames + result.frames} frames and grows with N")
    lines = [
        (f"generated {result.frames} frames x {result.batch} ({result.horizon_multiple:.1f}x "
         f"the {result.horizon_frames}-frame training horizon) {start} on {result.device}"),
        f"  backend       {result.backend}",
        f"  frames/s      {result.frames_per_s:.1f}{steady}; prefill {result.prefill_s:.3f} s",
        f"  first chunk   after {result.time_to_first_chunk_s:.3f} s",
        (f"  chunk latency median {1e3 * s['chunk_latency_median_s']:.1f} ms, max "
         f"{1e3 * s['chunk_latency_max_s']:.1f} ms over {s['chunks']} chunks"),
        f"  peak memory   {_human(result.peak_memory_bytes)} ({result.peak_memory_method})",
        (f"  cache         {_human(s['cache_bytes_first'])} after chunk 1, "
         f"{_human(s['cache_bytes_last'])} after chunk {s['chunks']} ({growth})"),
    ]
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def psnr_by_horizon(result: GenerationResult) -> list[tuple[float, float]]:
    """[(horizon multiple, mean PSNR dB)] of sample 0 against the truth over each window of
    one training horizon (1x = the first `horizon_frames` generated frames, 2x the next...);
    [] without a truth. Identical frames (inf dB) count as 100 dB."""
    from .metrics import psnr_per_frame
    if result.truth is None or not len(result.truth):
        return []
    n = min(len(result.truth), result.video.shape[1])
    psnr = np.minimum(psnr_per_frame(result.video[0, :n], result.truth[:n]), 100.0)
    h = result.horizon_frames
    return [((i + min(h, n - i)) / h, float(psnr[i:i + h].mean())) for i in range(0, n, h)]


def _columns(result: GenerationResult) -> tuple[list, list]:
    """(videos, labels) of the GIF/MP4: truth | generated sample(s), each preceded by the
    prefix when there is one."""
    def with_prefix(v):
        return v if result.prefix is None else np.concatenate([result.prefix, v])
    videos, labels = [], []
    if result.truth is not None:
        videos.append(with_prefix(result.truth))
        labels.append("truth")
    for b, v in enumerate(result.video):
        videos.append(with_prefix(v))
        labels.append("generated" if len(result.video) == 1 else f"sample {b}")
    return videos, labels


def write_outputs(result: GenerationResult, out_dir: Union[str, Path], fps: float = 8,
                  quiet: bool = False) -> list[Path]:
    """stats.json, generated.gif and (where imageio-ffmpeg is installed) generated.mp4 in
    `out_dir`, and memory.png for a pattern with memory; prints the summary and, when there
    is a truth, PSNR per training horizon. Returns the paths written."""
    from . import media
    from .checkpoint import atomic_path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    stats = out / "stats.json"
    with atomic_path(stats) as tmp:
        tmp.write_text(json.dumps(result.stats(), indent=1) + "\n")
    written.append(stats)
    videos, labels = _columns(result)
    scale = max(1, GIF_WIDTH // max(videos[0].shape[1:3]))
    written.append(media.write_gif(out / "generated.gif", videos, fps=fps, scale=scale,
                                   labels=labels))
    skipped = None
    try:
        written.append(media.write_mp4(out / "generated.mp4", videos, fps=fps, scale=scale,
                                       labels=labels))
    except (RuntimeError, OSError) as e:
        skipped = f"note: no MP4 written ({e})"
    if result.memory:    # a pattern's persistent memory over the run, as explain --rollout draws it
        from codegen.memory.memory_picture import draw_memory
        returns = revisit_memory(result)   # ring the last frame that showed a returning sprite
        marks = [(r["picture_x"], r["last_seen_frame"], f"sprite {r['sprite']} back at {r['back']}")
                 for r in returns]
        written.append(draw_memory(result.memory, out / "memory.png", marks=marks,
                                   title=f"{result.pattern}: persistent memory while generating "
                                         f"{result.frames} frames ({result.source})"
                                         + ("; o = last frame showing a sprite that comes back, "
                                            "at the chunk it returns in" if marks else "")))
    if not quiet:
        print(summary(result))
        by_horizon = psnr_by_horizon(result)
        if by_horizon:
            print("  PSNR vs the truth, per training horizon: " + ", ".join(
                f"{m:.1f}x {db:.1f} dB" for m, db in by_horizon))
        if skipped:
            print(skipped)
        print("wrote " + ", ".join(str(p) for p in written))
    return written


# =========================================================================================
# command line: `sparse-forcing generate`
# =========================================================================================
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `generate` subcommand to `sparse-forcing`'s subparsers (models/cli.py)."""
    p = subparsers.add_parser(
        "generate", help="generate frames far past the training horizon from trained weights",
        description="Load weights and generate --frames frames under any attention backend, "
                    "continuing a prefix of real frames (the procedural world, or your own "
                    "video) or from noise; writes a GIF/MP4 with the true continuation beside "
                    "it, stats.json, and prints frames/s, latency and memory.")
    p.add_argument("weights", help="an exported .safetensors file or a run folder")
    p.add_argument("--config", default=None,
                   help="a bundled config or .toml file; checked against the weights (default: "
                        "the config stored with the weights)")
    p.add_argument("--pattern", default=None,
                   help="'dense' (rolling KV cache), a sparsedsl preset or a .py file defining "
                        "`pattern` (default: the config's attention.pattern)")
    p.add_argument("--cache-frames", type=int, default=None, metavar="N",
                   help="dense only: the rolling cache's length in frames (default: the config's)")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help=f"frames to generate (default {DEFAULT_FRAMES}; rounded up to whole chunks)")
    p.add_argument("--prefix", type=int, default=None, metavar="P",
                   help="clean frames to continue, a multiple of chunk_frames (default: one "
                        "chunk); 0 generates from noise")
    p.add_argument("--world-seed", type=int, default=None,
                   help="the procedural world the prefix and the truth come from (default 0)")
    p.add_argument("--video-folder", default=None, metavar="DIR",
                   help="continue the first clip of your own videos (.npy/.npz/.mp4) instead")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch", type=int, default=1, help="continuations of the same prefix")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: the config's)")
    p.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    p.add_argument("--fps", type=float, default=8, help="GIF/MP4 frame rate (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args) -> int:
    """Run `sparse-forcing generate`; user errors print one line and return 2."""
    from sparsedsl.cli import CliError
    try:
        model, cfg = load_generator(args.weights, args.config, device="cpu")
        device = resolve_device(args.device, cfg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GenerateError(f"device = {args.device or cfg.device!r}: no CUDA device here")
        model.to(device)
        prefix = cfg.video.chunk_frames if args.prefix is None else args.prefix
        world_seed = args.world_seed
        if world_seed is None and args.video_folder is None and prefix:
            world_seed = 0
        result = generate(model, cfg, pattern=args.pattern, frames=args.frames,
                          prefix_frames=prefix, seed=args.seed, world_seed=world_seed,
                          video_folder=args.video_folder, batch=args.batch, device=device,
                          progress=not args.no_progress, cache_frames=args.cache_frames)
        write_outputs(result, args.out, fps=args.fps)
    except (GenerateError, ConfigError, CheckpointError, VideoFileError, FileNotFoundError,
            CliError, ImportError) as e:     # ImportError: an .mp4 video without imageio-ffmpeg
        print(f"sparse-forcing: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m models.generate generate WEIGHTS ...`: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="sparse-forcing")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
