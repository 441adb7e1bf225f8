"""End-to-end decoding at the paper's scale: frames/s, chunk latency, peak memory, KV cache.

    sparsedsl bench decode                       # = PYTHONPATH=. python bench/decode.py
    sparsedsl bench decode --compile --out docs/benchmarks.md
    PYTHONPATH=. python bench/decode.py --tiny   # CPU smoke test (tiny config, seconds)

What runs: the `wan-1.3b` config (Wan2.1-T2V-1.3B's shapes: 30 blocks of dim 1536, 12 heads
x 128, FFN 8960, 1.42 B parameters) with random weights (AdaLN-zero's zero gates and head
randomised too, so that frames and cached K/V are not all zero), built directly on the GPU
and cast to bf16 (no autocast: bf16 weights, as inference runs), batch 1, a random text context of
512 x 4096 for the cross-attention. It generates each horizon of --frames (default 21, 84
and 240 latent frames) from noise with the Self-Forcing protocol, through
`models.rollout.rollout` itself: 3-frame chunks of 1560 tokens per frame (4680 query
tokens), per chunk 4 denoising passes that read the KV cache and one clean pass at t = 0
that attends and commits the chunk's K/V, every pass the whole model (30 layers:
self-attention, cross-attention, FFN). Under torch.no_grad (not inference_mode: the
pattern caches' trusted tables read tensor version counters).

Patterns (--patterns, default `dense,sparse-forcing`):
  dense           the fastest dense baseline built here: Self-Forcing's rolling cache of
                  `attention.cache_frames` = 21 frames (the chunk's slots included) as one
                  preallocated ring buffer per layer, token-major [B, 21 x 1560, H, D], so
                  that the frames a chunk sees are one contiguous prefix: each pass copies
                  only the chunk's K/V into its slots and calls SDPA once, with no
                  concatenation and no re-copy at the commit. Same result as
                  models.attention.DenseBackend (tests/test_bench_decode.py checks it).
                  The SDPA kernel: --sdpa best (default) checks Flash and cuDNN against
                  float32 attention on the warm ring, times each on a steady-state
                  chunk and keeps the faster for the whole run (the
                  cross-attention's SDPA included, for every pattern); the header names it.
  dense-cat       models.attention.DenseBackend as the model uses it (torch.cat of cache
                  and chunk each pass), for reference.
  sparse-forcing  the preset at the config's geometry (sink 1 frame, 6-frame window with
                  Radius(1,1,1) | TopK(25%), 64 persistent blocks, 8 x 8 tiles) compiled by
                  sparsedsl (Triton kernels, PBSA) and run through its RolloutCache; any
                  other preset name or a .py file defining `pattern` works too.

Measured per (pattern, horizon), after one untimed warm-up rollout per pattern (long
enough for its cache to reach its steady state, so every kernel is compiled and the
allocator warm; the horizon's first chunk is then timed like the others):
  frames/s        horizon / wall time of the whole rollout (cache creation included;
                  CUDA synchronised), and the speedup over `dense` (or `dense-cat`);
  chunk latency   median over the chunks and the last chunk's (the sparse pattern's cost
                  grows, then saturates once its window and memory are full; the dense
                  window saturates at 21 frames);
  peak memory     torch.cuda.max_memory_allocated over the rollout after
                  reset_peak_memory_stats: the whole process (weights 2.84 GB, context,
                  activations, cache);
  peak KV         the largest cache.nbytes() after any chunk. `dense`: its buffer, 21
                  frames (Self-Forcing's allocation, as in bench/memory.py); the sparse
                  RolloutCache's pool does not hold the chunk (the kernels read it from
                  the k/v arguments), so the KV saving is also given against the 18 frames
                  the dense cache keeps between chunks ("vs kept"), the stricter number;
  attention       after the rollout (steady state), one more chunk's 5 passes reading
                  the cache (no commit), median of 3, and the same passes with attention
                  replaced by returning v (bench/model_step.py's trick): the difference is
                  the attention time of a chunk and its share. The commit (the sparse
                  memory update) is outside both; the dense ring's copy of the chunk's
                  K/V into its slots is inside its attention.
Prints one markdown table (device, date, exact command, compile and SDPA settings);
--out FILE appends it, --json FILE writes every number (per-chunk latencies and KV bytes).

torch.compile: --compile runs the blocks' halves around the attention call through
torch.compile (models.dit.compile_blocks; dynamic shapes); the attention itself stays
eager for every pattern (SDPA, or the Triton kernels). CUDA graphs: not used. A pass is
4680 tokens through 30 layers, ~100 ms of GPU work against a few ms of kernel launches
that run ahead of it, so the host is not the bottleneck; and the caches change shape or host-side
step integers from chunk to chunk (the dense prefix grows up to 21 frames, the pattern's
commit takes per-step counts), which a captured graph would have to freeze.

Run time on one H200: an estimate, not yet measured (this script has not run on a GPU).
A pass is about 12 TFLOP of matmuls (30 layers x 4680 tokens) plus, for dense at 21 frames,
28 TFLOP of attention: ~0.1 s, so ~0.5 s a dense chunk. The defaults are 115 chunks a
pattern (7 + 28 + 80), ~1 min dense and less sparse; with the warm-ups (SDPA choice, one
rollout per pattern, the Triton kernels' first compilation), the attention probes (6 x 8
chunks) and start-up, about 4-5 minutes in all; --compile adds the Inductor compilation
(1-3 minutes). If a run would not fit in ~9 minutes, split the horizons across calls, each
appending to the same file: `--frames 21,84 --out F` then `--frames 240 --out F` (each
call rebuilds the model and warms up again; rows compare only within one table).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `models` from this checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.attention import ChunkCache, DenseBackend, make_backend  # noqa: E402
from models.config import Config, ConfigError, load_config  # noqa: E402
from models.dit import CausalDiT, compile_blocks, count_parameters  # noqa: E402
from models.flow import denoising_times  # noqa: E402
from models.generate import _human, constant_from  # noqa: E402
from models.rollout import rollout  # noqa: E402

DENSE_NAMES = ("dense", "dense-cat")
PROBE_REPEATS = 3                    # timed probe chunks per variant (median)
SDPA_CANDIDATES = ("flash", "cudnn")  # what --sdpa best chooses between


class BenchError(ValueError):
    """A bad option: main prints it on one line and exits 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line naming the option (no usage block)."""

    def error(self, message):
        raise BenchError(message)


# =========================================================================================
# the fastest dense baseline: a ring buffer, one SDPA call per layer and pass
# =========================================================================================
class RingDenseCache(ChunkCache):
    """Self-Forcing's rolling cache of `cache_frames` frames (the chunk's slots included),
    preallocated per layer as [B, cache_frames * tokens, H, D]. Frame f lives in slot
    f mod cache_frames, so the frames a chunk sees are always one prefix of the buffer: the
    first chunks a growing prefix, then the whole buffer, whose other slots hold exactly
    the `cache_frames - chunk_frames` frames before the chunk. SDPA ignores key order, so
    this computes what models.attention.DenseCache computes, without its copies."""

    def __init__(self, cfg: Config, batch: int, device, dtype):
        m, n = cfg.model, cfg.tokens_per_frame
        self.num_layers, self.chunk_frames = m.layers, cfg.video.chunk_frames
        self.cache_frames, self.tokens_per_frame = cfg.attention.cache_frames, n
        # token-major: a prefix of slots is one block of memory, its transpose SDPA's [B, H, N, D]
        shape = (batch, self.cache_frames * n, m.heads, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(m.layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(m.layers)]
        self.frame_start = 0
        self._committed = 0

    def _slots(self) -> tuple[int, int]:
        """(first token slot of the current chunk, tokens the chunk sees: a prefix)."""
        n = self.tokens_per_frame
        first = (self.frame_start % self.cache_frames) * n
        return first, min(self.frame_start + self.chunk_frames, self.cache_frames) * n

    def _write(self, layer: int, k, v) -> int:
        first, seen = self._slots()
        self.k[layer][:, first:first + k.shape[2]].copy_(k.transpose(1, 2))
        self.v[layer][:, first:first + v.shape[2]].copy_(v.transpose(1, 2))
        return seen

    def attend(self, layer, q, k, v):
        # the chunk's slots hold frames the window has left: overwriting them each pass
        # changes nothing a chunk may see
        seen = self._write(layer, k, v)
        keys = self.k[layer][:, :seen].transpose(1, 2)
        values = self.v[layer][:, :seen].transpose(1, 2)
        return F.scaled_dot_product_attention(q, keys, values)

    def _advance(self) -> None:
        self._committed += 1
        if self._committed == self.num_layers:   # the step ends with the last layer
            self.frame_start += self.chunk_frames
            self._committed = 0

    def commit(self, layer, q, k, v) -> None:
        self._write(layer, k, v)
        self._advance()

    def writer(self):
        """The clean pass: its attend already wrote the chunk's K/V; only count the layer."""
        def attend_and_commit(layer, q, k, v):
            out = self.attend(layer, q, k, v)
            self._advance()
            return out
        return attend_and_commit

    def nbytes(self) -> int:
        """The buffers, chunk slots included (Self-Forcing's 21-frame allocation)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def kept_nbytes(self) -> int:
        """The frames kept between chunks (the chunk's slots excluded), at the moment."""
        kept = min(self.frame_start, self.cache_frames - self.chunk_frames)
        return self.nbytes() * kept // self.cache_frames


class RingDenseBackend:
    name = "dense"

    def __init__(self, cfg: Config):
        a, c = cfg.attention, cfg.video.chunk_frames
        if a.sink_frames or a.cache_frames % c:
            raise BenchError(f"--patterns: 'dense' (the ring cache) needs attention.sink_frames = 0 "
                             f"and cache_frames a multiple of {c}; this config has "
                             f"{a.sink_frames} and {a.cache_frames}: use 'dense-cat'")
        self.cfg = cfg

    def new_cache(self, batch: int, device, dtype, max_frames: int | None = None):
        return RingDenseCache(self.cfg, batch, device, dtype)

    def describe(self) -> str:
        return (f"dense SDPA over a rolling {self.cfg.attention.cache_frames}-frame ring "
                "buffer (one SDPA call per layer and pass)")


# =========================================================================================
# options
# =========================================================================================
def parse_frames(text: str, chunk: int) -> list[int]:
    try:
        frames = [int(f) for f in text.split(",")]
    except ValueError:
        raise BenchError(f"--frames: {text!r} is not a comma-separated list of integers") from None
    for f in frames:
        if f < chunk or f % chunk:
            raise BenchError(f"--frames: {f} is not a positive multiple of the "
                             f"{chunk}-frame chunk")
    return frames


def parse_patterns(text: str) -> list[str]:
    from sparsedsl import presets
    names = [p.strip() for p in text.split(",")]
    for name in names:
        if name not in DENSE_NAMES and name not in presets.PRESETS and not (
                name.endswith(".py") and Path(name).is_file()):
            raise BenchError(f"--patterns: {name!r} is not one of {', '.join(DENSE_NAMES)}, a "
                             f"sparsedsl preset ({', '.join(presets.PRESETS)}) or a .py file")
    if len(set(names)) != len(names):
        raise BenchError(f"--patterns: {text!r} names a pattern twice")
    return names


def parse_args(argv) -> argparse.Namespace:
    p = _OneLineParser(prog="decode.py", description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="dense,sparse-forcing",
                   help="comma-separated: dense, dense-cat, a sparsedsl preset or a .py file")
    p.add_argument("--frames", default=None,
                   help="latent frames per horizon, comma-separated (default 21,84,240; --tiny 9,12)")
    p.add_argument("--layers", type=int, default=None, help="override the config's layer count")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks' halves around attention (models.dit.compile_blocks)")
    p.add_argument("--sdpa", default="best", choices=("best", "auto", "flash", "cudnn", "efficient", "math"),
                   help="SDPA kernel (best: time flash and cudnn, keep the faster; auto: PyTorch's pick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny config")
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        raise BenchError(f"--layers: {args.layers} is not an integer >= 1")
    return args


# =========================================================================================
# the model and its inputs
# =========================================================================================
def build_model(cfg: Config, device: torch.device, dtype: torch.dtype, seed: int) -> CausalDiT:
    """Random weights, made on `device` (a 1.42 B-parameter init on the CPU takes minutes)."""
    torch.manual_seed(seed)
    with device:
        model = CausalDiT(cfg)
        # AdaLN-zero starts every block as the identity and the head at zero: the frames, and
        # so the K/V every clean pass caches, would all be zero; random gates and head instead
        with torch.no_grad():
            for blk in model.blocks:
                blk.modulation.normal_(0, cfg.model.dim ** -0.5)
            torch.nn.init.normal_(model.time_project[1].weight, std=0.02)
            torch.nn.init.xavier_uniform_(model.head.weight)
    return model.to(dtype).eval().requires_grad_(False)


def text_context(cfg: Config, device, dtype, seed: int) -> torch.Tensor | None:
    m = cfg.model
    if not m.text_tokens:
        return None
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randn(1, m.text_tokens, m.text_dim, generator=g, device=device, dtype=dtype)


def noise_source(cfg: Config, device, dtype, seed: int) -> Callable[[int, int], torch.Tensor]:
    """rollout's `noise(chunk, step)`, drawn on the device (no host copy in the timed loop)."""
    v = cfg.video
    shape = (1, v.chunk_frames, v.channels, v.height, v.width)
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda chunk, step: torch.randn(shape, generator=g, device=device, dtype=dtype)


def make_pattern_backend(cfg: Config, name: str, device, dtype):
    if name == "dense":
        return RingDenseBackend(cfg)
    if name == "dense-cat":
        return DenseBackend(cfg)
    return make_backend(cfg, name, device=device, dtype=dtype)


def steady_frames(cfg: Config, backend, longest: int) -> int:
    """Frames after which the backend's cache stops changing (its warm-up length), capped
    at the longest horizon."""
    c = cfg.video.chunk_frames
    frames = cfg.attention.cache_frames
    schedule = getattr(getattr(backend, "program", None), "schedule", None)
    if schedule is not None:
        from codegen.memory.cache_plan import steady_frames as pattern_steady
        frames = pattern_steady(schedule) or frames
    return min(-(-frames // c) * c, longest)


# =========================================================================================
# measuring
# =========================================================================================
@dataclass
class Run:
    """One (pattern, horizon)."""
    pattern: str
    backend: str
    frames: int
    total_s: float
    chunk_latencies_s: list
    kv_bytes: list                       # cache.nbytes() after each chunk
    kv_kept_bytes: int | None            # dense ring: the frames kept between chunks, at peak
    peak_memory_bytes: int | None        # None on the CPU
    probe_s: float                       # one steady chunk's 5 passes, reading the cache
    probe_no_attention_s: float          # the same with attention returning v

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.total_s

    @property
    def kv_peak(self) -> int:
        return max(self.kv_bytes)

    @property
    def attention_s(self) -> float:
        return self.probe_s - self.probe_no_attention_s

    @property
    def attention_share(self) -> float:
        return self.attention_s / self.probe_s

    def record(self) -> dict:
        return {**asdict(self), "frames_per_s": self.frames_per_s, "kv_peak_bytes": self.kv_peak,
                "kv_constant_from_chunk": constant_from(self.kv_bytes),
                "chunk_latency_median_s": statistics.median(self.chunk_latencies_s),
                "chunk_latency_last_s": self.chunk_latencies_s[-1],
                "attention_s": self.attention_s, "attention_share": self.attention_share}


class Bench:
    """The model, its inputs and the clock, shared by every pattern and horizon."""

    def __init__(self, cfg: Config, model, context, device, dtype, seed: int):
        self.cfg, self.model, self.context = cfg, model, context
        self.device, self.dtype = device, dtype
        self.noise = noise_source(cfg, device, dtype, seed)
        self.times = denoising_times(cfg.flow.denoising_steps, cfg.flow.shift)
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def rollout(self, backend, frames: int, on_chunk=None):
        cache = backend.new_cache(1, self.device, self.dtype, max_frames=frames)
        rollout(self.model, cache, self.noise, frames, self.times, context=self.context,
                on_chunk=None if on_chunk is None else lambda i, x0: on_chunk(cache))
        return cache

    @torch.no_grad()
    def probe_chunk(self, attend, frame_start: int) -> float:
        """Seconds of one chunk's 4 denoising passes + the clean pass, all through `attend`
        (no commit): rollout's loop for the chunk at `frame_start`."""
        c, ctx = self.cfg.video.chunk_frames, self.context
        self.sync()
        t0 = time.perf_counter()
        x = self.noise(0, 0)
        for j, t in enumerate(self.times):
            x0 = self.model(x, torch.full((1, c), t, device=self.device), attend,
                            frame_start=frame_start, context=ctx)
            if j + 1 < len(self.times):
                tn = self.times[j + 1]
                x = (1 - tn) * x0 + tn * self.noise(0, j + 1)
        self.model(x0, torch.zeros(1, c, device=self.device), attend, frame_start=frame_start,
                   context=ctx)
        self.sync()
        return time.perf_counter() - t0

    def probe(self, attend, frame_start: int, repeats: int) -> float:
        self.probe_chunk(attend, frame_start)     # warm-up: RoPE tables of a new position
        return statistics.median(self.probe_chunk(attend, frame_start) for _ in range(repeats))

    def attention_probe(self, cache: ChunkCache, repeats: int) -> tuple[float, float]:
        """(chunk with attention, the same chunk with attention returning v), at the
        cache's current (steady) state."""
        start = cache.frame_start
        return (self.probe(cache.reader(), start, repeats),
                self.probe(lambda layer, q, k, v: v, start, repeats))

    def measure(self, name: str, backend, frames: int, repeats: int) -> Run:
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        latencies, kv, kept = [], [], []
        self.sync()
        t0 = time.perf_counter()
        last = [t0]

        def on_chunk(cache):
            self.sync()
            now = time.perf_counter()
            latencies.append(now - last[0])
            last[0] = now
            kv.append(int(cache.nbytes()))
            if hasattr(cache, "kept_nbytes"):
                kept.append(int(cache.kept_nbytes()))

        cache = self.rollout(backend, frames, on_chunk)
        self.sync()
        total = time.perf_counter() - t0
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None
        probe, probe_v = self.attention_probe(cache, repeats)
        del cache
        return Run(name, backend.describe(), frames, total, latencies, kv,
                   max(kept) if kept else None, peak, probe, probe_v)


def sdpa_context(name: str):
    if name in ("best", "auto"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
               "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    return sdpa_kernel(getattr(SDPBackend, kernels[name]))


@torch.no_grad()
def sdpa_agrees(cache: RingDenseCache, name: str, rows: int = 64) -> bool:
    """Whether SDPA kernel `name` attends a random chunk to the (warm) ring cache of layer 0
    as float32 attention does, on the first `rows` queries: a fast kernel that mishandles
    the ring's strided keys must not become the baseline."""
    k0 = cache.k[0]
    g = torch.Generator(device=k0.device).manual_seed(0)
    B, _, H, D = k0.shape
    q, k, v = (torch.randn(B, H, cache.chunk_frames * cache.tokens_per_frame, D, generator=g,
                           device=k0.device, dtype=k0.dtype) for _ in range(3))
    with sdpa_context(name):
        out = cache.attend(0, q, k, v)[:, :, :rows].float()    # writes only the chunk's slots
    seen = cache._slots()[1]
    keys, values = (t[0][:, :seen].transpose(1, 2).float() for t in (cache.k, cache.v))
    ref = F.scaled_dot_product_attention(q[:, :, :rows].float(), keys, values)
    tol = 1e-5 if k0.dtype == torch.float32 else 2e-2
    return torch.allclose(out, ref, atol=tol, rtol=tol)


def pick_sdpa(bench: Bench, choice: str, longest: int) -> tuple[str, str]:
    """(the SDPA kernel to use, what the header says about it). `best` on a GPU: warm a
    dense ring cache to its steady state; for each candidate, check it against float32
    attention (sdpa_agrees), then time a probe chunk under it."""
    if choice != "best" or not bench.cuda:
        return ("auto" if choice == "best" else choice), f"SDPA {choice if choice != 'best' else 'auto'}"
    backend = RingDenseBackend(bench.cfg)
    cache = bench.rollout(backend, steady_frames(bench.cfg, backend, longest))
    timed = {}
    for name in SDPA_CANDIDATES:
        try:
            if not sdpa_agrees(cache, name):
                print(f"note: SDPA {name} left out: its output differs from float32 attention",
                      file=sys.stderr)
                continue
            with sdpa_context(name):
                timed[name] = bench.probe(cache.reader(), cache.frame_start, PROBE_REPEATS)
        except RuntimeError as e:          # not available for these shapes or this build
            print(f"note: SDPA {name} unavailable ({str(e).splitlines()[0]})", file=sys.stderr)
    del cache
    if not timed:
        return "auto", "SDPA auto (neither flash nor cudnn ran)"
    best = min(timed, key=timed.get)
    return best, f"SDPA {best} (best of " + ", ".join(
        f"{k} {1e3 * v:.0f} ms" for k, v in timed.items()) + " per dense chunk)"


# =========================================================================================
# the table
# =========================================================================================
def _ms(s: float) -> str:
    return f"{1e3 * s:.1f} ms" if s < 1 else f"{s:.2f} s"


def _baseline(rows: list[Run], frames: int) -> Run | None:
    for name in DENSE_NAMES:
        for r in rows:
            if r.pattern == name and r.frames == frames:
                return r
    return None


def _kv_saving(r: Run, base: Run | None) -> str:
    if base is None or r is base:
        return "—"
    text = f"{1 - r.kv_peak / base.kv_peak:.0%}"
    if base.kv_kept_bytes:
        text += f" ({1 - r.kv_peak / base.kv_kept_bytes:.0%} vs kept)"
    return text


COLUMNS = ("pattern", "frames", "frames/s", "speedup", "chunk median", "last chunk",
           "attention / chunk (share)", "peak memory", "peak KV", "KV saving")


def table(rows: list[Run], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(rows, key=lambda r: r.frames):    # stable: pattern order within a horizon
        base = _baseline(rows, r.frames)
        speedup = "—" if base is None else f"{r.frames_per_s / base.frames_per_s:.2f}x"
        peak = "—" if r.peak_memory_bytes is None else _human(r.peak_memory_bytes)
        cells = (r.pattern, str(r.frames), f"{r.frames_per_s:.2f}", speedup,
                 _ms(statistics.median(r.chunk_latencies_s)), _ms(r.chunk_latencies_s[-1]),
                 f"{_ms(r.attention_s)} ({r.attention_share:.0%})", peak, _human(r.kv_peak),
                 _kv_saving(r, base))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_line(cfg: Config, params: int, dtype, device_name: str, settings: list[str]) -> str:
    m, v = cfg.model, cfg.video
    text = f", cross-attention to {m.text_tokens} text tokens" if m.text_tokens else ""
    command = shlex.join(["python", "bench/decode.py"] + sys.argv[1:])
    size = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e3:.0f} K"
    return (f"Decoding from noise, `{cfg.name}` config ({m.layers} layers, {size} "
            f"parameters, random weights, {str(dtype).replace('torch.', '')}), batch 1, "
            f"{v.chunk_frames}-frame chunks x {cfg.tokens_per_frame} tokens, "
            f"{len(cfg.flow.denoising_steps)} denoising + 1 clean pass per chunk{text}; "
            + "; ".join(settings) + f"; {device_name}, {datetime.date.today()}, `{command}`")


# =========================================================================================
# main
# =========================================================================================
def run(args) -> str:
    overrides = {} if args.layers is None else {"model.layers": args.layers}
    cfg = load_config("tiny" if args.tiny else "wan-1.3b", overrides)
    c = cfg.video.chunk_frames
    frames = parse_frames(args.frames or ("9,12" if args.tiny else "21,84,240"), c)
    patterns = parse_patterns(args.patterns)
    if not args.tiny and not torch.cuda.is_available():
        raise BenchError("no CUDA GPU here: --tiny runs the CPU smoke test")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    backends = {name: make_pattern_backend(cfg, name, device, dtype) for name in patterns}

    model = build_model(cfg, device, dtype, args.seed)
    if args.compile:
        compile_blocks()
    bench = Bench(cfg, model, text_context(cfg, device, dtype, args.seed), device, dtype, args.seed)
    repeats = 1 if args.tiny else PROBE_REPEATS
    sdpa, sdpa_note = pick_sdpa(bench, args.sdpa, max(frames))
    rows = []
    with sdpa_context(sdpa):
        for name, backend in backends.items():
            # warm-up, untimed: every kernel compiled and the cache at its steady state once
            warm = bench.rollout(backend, steady_frames(cfg, backend, max(frames)))
            bench.attention_probe(warm, 1)
            del warm
            for f in frames:
                rows.append(bench.measure(name, backend, f, repeats))
                r = rows[-1]
                print(f"{name} {f} frames: {r.frames_per_s:.2f} frames/s, "
                      f"{_human(r.kv_peak)} KV", file=sys.stderr)

    device_name = torch.cuda.get_device_name(device) if bench.cuda else "cpu"
    settings = [f"torch.compile {'on (block halves)' if args.compile else 'off'}",
                "CUDA graphs off", sdpa_note,
                "warm-up: one untimed rollout per pattern to its cache's steady state"]
    out = table(rows, header_line(cfg, count_parameters(model), dtype, device_name, settings))
    notes = [f"- {name}: {b.describe()}" for name, b in backends.items()]
    notes.append("- attention: one steady chunk's 5 passes (no commit) minus the same with "
                 "attention returning v; peak KV: the largest cache.nbytes() over the rollout"
                 "; `vs kept`: against the dense frames kept between chunks (chunk slots "
                 "excluded)")
    out += "\n\n" + "\n".join(notes)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"config": cfg.name, "device": device_name, "compile": args.compile, "sdpa": sdpa,
             "runs": [r.record() for r in rows]}, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        out = run(args)
    except (BenchError, ConfigError) as e:
        print(f"decode.py: error: {e}", file=sys.stderr)
        return 2
    print(out)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
