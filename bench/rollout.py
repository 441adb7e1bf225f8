"""program.attention along an autoregressive rollout, next to what users would run instead.

    sparsedsl bench rollout                      # every default preset and tile (H200: ~6 min)
    sparsedsl bench rollout --presets sparse-forcing --tiles 8x8 --step-every 10
    PYTHONPATH=. python bench/rollout.py --tiny  # CPU smoke test (torch backend, ~20 s)

Geometry: Self-Forcing / Wan-1.3B latent frames of 30 x 52 tokens, 3-frame chunks, 12 heads x
head dim 128 (--head-dim 64 for the other common size), bf16, one layer, batch 1. For each
preset (default sparse-forcing, sliding-tile, sink-window, moba with their default options;
`--presets all` adds dense-causal and sliding-window) and each tile (default 8x8 = 64-token
blocks, a partial bottom row, and 8x16 = 128-token blocks, padded in both directions), the
script rolls out steps 0..--steps-1 (80 chunks = 240 frames), committing a random chunk (the
tile-major layout, padding tokens zero) to the program's cache at every step. At the timed
steps (default 0, 1, 2, 4, 7, 10, 20, 40, 79; `--step-every N` for every Nth), with the cache
holding the chunks before it, it times the chunk's attention as

1. `program.attention(q, k, v, cache.tables(0))`, the call users make (default arguments);
2. the generated kernel alone (`pbsa_attention` on precomputed visit tables);
3. the visit tables + Top-K select alone (`program.visit_tables`);
4. dense SDPA of the chunk's 4680 real queries (raster order) over the last min(21, frames so
   far) frames (Self-Forcing's rolling window, the chunk included), over all frames so far,
   and over the frames the program visits (any block of any head or query block);
5. compiled FlexAttention on the global tile-major keys of every frame so far, with the
   program's BlockMask (`program.to_block_mask`) built outside the timed region, and rebuilt
   inside it at every call (what a Flex user must do when the Top-K picks change).

Times are `triton.testing.do_bench` means (warm-up 25 ms, 100 ms of repetitions) in ms. Each
table also gives the frames so far, the frames visited, the blocks and real key tokens each
query block visits (the chunk's own included), the speedup over SDPA on the rolling 21 frames,
and whether program.attention is slower than dense SDPA over the frames it visits, and which
path program.attention took ("dense": the steps where it runs as one SDPA call over the
visited frames, PBSAProgram.path_at; else "sparse", the kernels of rows 2 and 3).

Run time on one H200 (measured 2026-12-02): sparse-forcing, sliding-tile and sink-window at
both tiles took most of a 575-second call; moba's cost grows with the history (its window is
the whole past: program.attention took 0.74 / 3.3 / 6.5 ms at steps 4 / 10 / 20 without
Flex) and it did not finish inside a call: time it alone (`--presets moba --tiles 8x8
--no-flex`). The largest step (79, 8x16 tiles) holds ~1.5 GB per tensor of keys for Flex and
~1.2 GB for SDPA; well inside the GPU's memory.

`--dense-path on|off` forces the dense path (one SDPA over the visited frames at the steps
`Schedule.frames_at` names) on or off instead of `PBSAProgram.path_at`'s choice, and
`--dense-sdpa flash|cudnn` picks its SDPA kernel on CUDA, and `--dense-keys one-buffer|cat`
how it gathers its keys (codegen.attention.dense_step.DENSE_PATH_KEYS), so each can be timed
against the block kernels in one run.

Prints one markdown table per (preset, tile) with the device, the date, the torch / triton
versions and the command; `--out FILE` appends them to FILE; a PNG of ms vs step goes to
`--plot` (default $OUT/rollout.png when OUT is set, else ./rollout.png; `--plot none` skips it).
`--tiny` runs the same code on a tiny geometry on the CPU (6 x 8 tokens, 2 x 4 tiles, 2 heads
x 16, float32, 3 steps, the torch backend, eager Flex, time.perf_counter).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

import sparsedsl as sd
from codegen.attention import dense_step
from codegen.attention.autograd import pbsa_attention
from codegen.flex_export import visit_block_matrix
from codegen.program import PBSAProgram

DEFAULT_PRESETS = ("sparse-forcing", "sliding-tile", "sink-window", "moba")
DEFAULT_TIMED_STEPS = (0, 1, 2, 4, 7, 10, 20, 40, 79)
ROLLING_FRAMES = 21   # Self-Forcing attends to the last 21 latent frames
# the tiny geometry's windows and budgets, scaled down so that eviction and Top-K still happen
TINY_PRESET_OPTIONS = {"sparse-forcing": dict(capacity=4, window_frames=3), "moba": dict(k=4),
                       "sink-window": dict(frames=3), "sliding-window": dict(frames=3)}

Cell = Union[float, str]   # milliseconds, or "failed: ..."


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    chunk_frames: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: str
    backend: str          # the program's backend: "triton" on the GPU, "torch" in --tiny

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def geometry(args) -> Geometry:
    if args.tiny:
        return Geometry(6, 8, 3, args.heads, args.head_dim, torch.float32, "cpu", "torch")
    return Geometry(30, 52, 3, args.heads, args.head_dim, torch.bfloat16, "cuda", "triton")


@dataclass
class StepRow:
    step: int
    path: str                      # what program.attention ran: "sparse" kernels or "dense" SDPA
    frames: int
    visited_frames: int
    visited_blocks: float          # per query block, the chunk's own blocks included
    visited_tokens: float          # real key tokens per query block
    program: float
    kernel: float
    tables: float
    graphed: Cell                  # program.attention captured in a CUDA graph, replayed
    sdpa_rolling: Cell
    sdpa_all: Cell
    sdpa_visited: Cell
    flex_prebuilt: Cell
    flex_rebuilt: Cell
    flex_options: Optional[dict] = None


@dataclass
class Result:
    preset: str
    tile: tuple[int, int]
    block_tokens: int
    rows: list[StepRow] = field(default_factory=list)
    profile: Optional[str] = None   # --profile: where program.attention's time goes, last step


# --- timing ---------------------------------------------------------------------------------
class Timer:
    """ms per call: do_bench on the GPU; on the CPU (--tiny) the median of 3 after a warm-up."""

    def __init__(self, device: str, warmup_ms: int, rep_ms: int):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def __call__(self, fn: Callable) -> float:
        if self.device == "cuda":
            import triton
            return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms)
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def safe(self, fn: Callable) -> Cell:
        """Like calling the timer, but a failure (lowering error, out of memory) becomes the cell."""
        try:
            return self(fn)
        except Exception as exc:  # the alternatives' failures are results, not crashes
            return failed(exc)


def failed(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # an out-of-memory failure must not starve the next cell
    return f"failed: {type(exc).__name__}: {lines[0][:120] if lines else ''}"


# --- FlexAttention -------------------------------------------------------------------------------
class Flex:
    """flex_attention, compiled once for the whole run (the compiled graphs of one tile and step
    are shared by the presets: same shapes) or eager in --tiny."""

    def __init__(self, compiled: bool):
        from torch.nn.attention.flex_attention import flex_attention
        self.compiled = compiled
        if compiled:
            # one compilation per tile and timed step (dynamic=False): stay compiled past
            # dynamo's default of 8 recompilations instead of falling back to eager Flex,
            # which materialises the scores
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4096))
            self.fn = torch.compile(flex_attention, dynamic=False)
        else:
            self.fn = flex_attention
        self.refused: list[dict] = []   # options that failed where the next ones ran

    def kernel_options(self, mask) -> list[Optional[dict]]:
        """Options to try in order: the mask's blocks as Flex's tiles (needed on 64-token blocks,
        see PBSAProgram.to_block_mask), then 64-key tiles, which also divide 128-token blocks;
        options already refused are not compiled again at every step."""
        if not self.compiled:
            return [None]
        bm, bn = mask.BLOCK_SIZE
        options = [{"BLOCK_M": bm, "BLOCK_N": bn}]
        if bn > 64 and bn % 64 == 0:
            options.append({"BLOCK_M": bm, "BLOCK_N": 64})
        kept = [o for o in options if o not in self.refused]
        return kept or options

    def __call__(self, q, keys, values, mask, options):
        return self.fn(q, keys, values, block_mask=mask, enable_gqa=True, kernel_options=options)


def time_flex(timer: Timer, flex: Flex, program: PBSAProgram, q, tables, keys, values
              ) -> tuple[Cell, Cell, Optional[dict]]:
    """(prebuilt mask ms, mask rebuilt per call ms, the kernel options that ran)."""
    error: Optional[BaseException] = None
    try:
        mask = program.to_block_mask(q, tables)
    except Exception as exc:
        return failed(exc), failed(exc), None
    tried = []
    for options in flex.kernel_options(mask):
        try:
            prebuilt = timer(lambda options=options: flex(q, keys, values, mask, options))
        except Exception as exc:
            error = exc
            tried.append(options)
            continue
        flex.refused += [o for o in tried if o not in flex.refused]
        rebuilt = timer.safe(lambda options=options: flex(q, keys, values,
                                                          program.to_block_mask(q, tables), options))
        return prebuilt, rebuilt, options
    cell = failed(error)
    return cell, cell, None


# --- the rollout's data ----------------------------------------------------------------------------
class History:
    """Every committed chunk's k / v twice: tile-major (Flex's global key sequence) and raster with
    real tokens only (dense SDPA's keys)."""

    def __init__(self, layout: sd.VideoLayout):
        self.layout = layout
        self.tile_k, self.tile_v, self.raster_k, self.raster_v = [], [], [], []

    def add(self, raster_k, raster_v, tile_k, tile_v) -> None:
        self.raster_k.append(raster_k)
        self.raster_v.append(raster_v)
        self.tile_k.append(tile_k)
        self.tile_v.append(tile_v)

    @property
    def frames(self) -> int:
        return len(self.raster_k) * self.layout.chunk_frames

    def flex_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.cat([k_0, ..., k_step], dim=2), as PBSAProgram.to_block_mask expects (and V)."""
        return torch.cat(self.tile_k, dim=2), torch.cat(self.tile_v, dim=2)

    def last_frames(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raster k / v of the last `n` frames (contiguous, as a rolling KV buffer holds them)."""
        chunks = -(-n // self.layout.chunk_frames)
        tokens = n * self.layout.tokens_per_frame
        k = torch.cat(self.raster_k[-chunks:], dim=2)[:, :, -tokens:].contiguous()
        v = torch.cat(self.raster_v[-chunks:], dim=2)[:, :, -tokens:].contiguous()
        return k, v


def random_chunk(layout: sd.VideoLayout, geo: Geometry, gen: torch.Generator):
    """(raster q, k, v of the chunk's real tokens; the same in the tile-major layout, padding 0)."""
    n = layout.chunk_frames * layout.tokens_per_frame
    raster = [torch.randn(1, geo.heads, n, geo.head_dim, device=geo.device, generator=gen
                          ).to(geo.dtype) for _ in range(3)]
    tile_major = [layout.to_tile_major(x, layout.chunk_frames) for x in raster]
    return raster, tile_major


def make_program(preset: str, layout: sd.VideoLayout, geo: Geometry, tiny: bool) -> PBSAProgram:
    options = TINY_PRESET_OPTIONS.get(preset, {}) if tiny else {}
    schedule = sd.lower(sd.presets.get(preset, layout=layout, **options), num_heads=geo.heads,
                        head_dim=geo.head_dim, dtype=geo.dtype_name)
    return PBSAProgram(schedule, backend=geo.backend)


# --- one timed step ------------------------------------------------------------------------------
def visit_stats(program: PBSAProgram, q, tables) -> tuple[int, float, float]:
    """(frames with a block visited by any head or query block, blocks and real key tokens
    visited per query block), the chunk's own blocks included."""
    lay = program.schedule.layout
    qb = program._blocks(q)
    slots, count = program.visit_tables(qb, tables, tables.step, select_backend=program.backend,
                                        validate=False)
    visit = visit_block_matrix(program, slots, count, tables, tables.step)   # [B, H, NQB, keys]
    frames = visit.shape[-1] // lay.blocks_per_frame
    real = torch.tensor(lay.frame_valid_tokens * frames, dtype=torch.float32, device=q.device)
    seen = visit.flatten(0, 2).any(0).view(frames, lay.blocks_per_frame).any(-1)
    return (int(seen.sum()), float(visit.sum(-1).float().mean()),
            float((visit.float() @ real).mean()))


def time_graphed(timer: Timer, fn: Callable, device: str) -> Cell:
    """`fn` captured once in a CUDA graph and replayed: the same GPU work without the host's
    launches, which says how much of a call is launch overhead (a diagnostic: replaying
    freezes the step's shapes and its tables' addresses, as a model that captures one graph
    per step would)."""
    if device != "cuda":
        return "n/a (CPU)"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm up (Triton compiles, allocator) off the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = timer(graph.replay)
        del graph
        return ms
    except Exception as exc:   # a host sync inside the call makes capture fail: a result
        return failed(exc)


def profile_call(fn: Callable, calls: int = 20, top: int = 8) -> str:
    """Where one call's time goes on the GPU: torch.profiler over `calls` calls; the GPU time
    of each kernel (by name, per call), the kernel launches per call, the GPU-busy time per
    call against the wall time per call (the rest is host time not hidden by the GPU)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time_total / 1e3   # us -> ms
    busy = sum(ms for _, ms in kernels.values()) / calls
    launches = sum(n for n, _ in kernels.values()) / calls
    lines = [f"wall {wall_ms:.3f} ms per call (profiler on), GPU busy {busy:.3f} ms per call, "
             f"{launches:.0f} kernel launches per call", "",
             "| kernel | launches / call | GPU ms / call | share of busy |", "|---|---|---|---|"]
    for name, (n, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        short = (name[:90] + "...") if len(name) > 90 else name
        lines.append(f"| `{short.replace('|', '/')}` | {n / calls:.0f} | {ms / calls:.3f} | "
                     f"{ms / calls / busy:.0%} |")
    return "\n".join(lines)


def time_sdpa(timer: Timer, q_raster, history: History, frames: int, memo: dict) -> Cell:
    """Dense SDPA of the chunk's queries over the last `frames` frames (memoised per step)."""
    if frames not in memo:
        try:
            k, v = history.last_frames(frames)
        except Exception as exc:
            memo[frames] = failed(exc)
        else:
            memo[frames] = timer.safe(lambda: F.scaled_dot_product_attention(q_raster, k, v))
            del k, v
    return memo[frames]


def program_path(program: PBSAProgram, step: int, device) -> str:
    """Which path program.attention takes at `step` on `device`: steps that visit every
    earlier block run as dense SDPA (PBSAProgram.path_at), the others the kernels."""
    return program.path_at(step, device)


def time_step(step: int, program: PBSAProgram, tables, q, k, v, q_raster, history: History,
              timer: Timer, flex: Optional[Flex]) -> StepRow:
    backend = program.backend
    qb, kb, vb = program._blocks(q), program._blocks(k), program._blocks(v)
    slots, count = program.visit_tables(qb, tables, step, select_backend=backend, validate=False)
    spec = program.kernel_spec(step, str(q.dtype).replace("torch.", ""))
    cur_valid = program.cur_valid(q.device)

    t_program = timer(lambda: program.attention(q, k, v, tables))
    t_kernel = timer(lambda: pbsa_attention(spec, qb, kb, vb, cur_valid, tables.k_pool,
                                            tables.v_pool, tables.slot_valid, slots, count,
                                            program.scale, backend=backend, validate=False))
    t_tables = timer(lambda: program.visit_tables(qb, tables, step, select_backend=backend,
                                                  validate=False))
    t_graphed = time_graphed(timer, lambda: program.attention(q, k, v, tables), q.device.type)
    visited_frames, blocks, tokens = visit_stats(program, q, tables)
    frames, memo = history.frames, {}
    sdpa_rolling = time_sdpa(timer, q_raster, history, min(ROLLING_FRAMES, frames), memo)
    sdpa_all = time_sdpa(timer, q_raster, history, frames, memo)
    sdpa_visited = time_sdpa(timer, q_raster, history, visited_frames, memo)
    prebuilt = rebuilt = "skipped (--no-flex)"
    options = None
    if flex is not None:
        keys, values = history.flex_keys()
        prebuilt, rebuilt, options = time_flex(timer, flex, program, q, tables, keys, values)
        del keys, values
    return StepRow(step, program_path(program, step, q.device), frames, visited_frames, blocks, tokens,
                   t_program, t_kernel, t_tables, t_graphed, sdpa_rolling, sdpa_all, sdpa_visited,
                   prebuilt, rebuilt, options)


def rollout(preset: str, tile: tuple[int, int], geo: Geometry, args, timed: set[int],
            timer: Timer, flex: Optional[Flex]) -> Result:
    """Commit a random chunk at every step; time the steps in `timed` before committing them."""
    layout = sd.VideoLayout(geo.height, geo.width, tile, geo.chunk_frames)
    program = make_program(preset, layout, geo, args.tiny)
    program.dense_path = {"auto": None, "on": True, "off": False}[args.dense_path]
    cache = program.new_cache(batch=1, num_layers=1, device=geo.device, dtype=geo.dtype)
    history = History(layout)
    gen = torch.Generator(device=geo.device).manual_seed(args.seed)   # same data for every preset
    result = Result(preset, tile, layout.block_tokens)
    for step in range(args.steps):
        (q_raster, k_raster, v_raster), (q, k, v) = random_chunk(layout, geo, gen)
        history.add(k_raster, v_raster, k, v)
        if step in timed:
            row = time_step(step, program, cache.tables(0), q, k, v, q_raster, history, timer, flex)
            result.rows.append(row)
            print(f"  {preset} {tile[0]}x{tile[1]} step {step}: program.attention "
                  f"{row.program:.3f} ms", file=sys.stderr, flush=True)
            if args.profile and step == max(timed) and geo.device == "cuda":
                tables = cache.tables(0)
                result.profile = profile_call(lambda: program.attention(q, k, v, tables))
        cache.commit(0, q, k, v)
    del cache, history
    if geo.device == "cuda":
        torch.cuda.empty_cache()
    return result


# --- report -------------------------------------------------------------------------------------
COLUMNS = ("step", "program path", "frames", "visited frames", "visited blocks / query block",
           "real key tokens / query block", "program.attention ms", "kernel alone ms",
           "visit tables + select ms", "program.attention as a CUDA graph ms",
           "SDPA rolling 21 ms", "SDPA all frames ms", "SDPA visited frames ms", "Flex prebuilt mask ms", "Flex mask rebuilt ms",
           "speedup vs SDPA rolling 21", "slower than SDPA on visited frames")


def cell(x: Cell) -> str:
    return f"{x:.3f}" if isinstance(x, float) else x.replace("|", "\\|")


def slower_than_dense(row: StepRow) -> str:
    if not isinstance(row.sdpa_visited, float):
        return "n/a"
    return "**yes**" if row.program > row.sdpa_visited else "no"


def speedup(row: StepRow) -> str:
    return f"{row.sdpa_rolling / row.program:.3g}x" if isinstance(row.sdpa_rolling, float) else "n/a"


def header(geo: Geometry, command: str) -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:   # a CPU-only install may lack it (--tiny needs no Triton)
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if geo.device == "cuda" else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc)
    return (f"{device}, {now:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, triton "
            f"{triton_version}; command: `{command}`")


def table(result: Result, geo: Geometry, command: str) -> str:
    th, tw = result.tile
    title = (f"### Rollout: {result.preset}, {th}x{tw} tiles ({result.block_tokens}-token blocks), "
             f"{geo.height}x{geo.width} tokens/frame, {geo.chunk_frames}-frame chunks, "
             f"H={geo.heads}, D={geo.head_dim}, {geo.dtype_name}, batch 1, one layer")
    lines = [title, "", header(geo, command), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result.rows:
        values = [str(r.step), r.path, str(r.frames), str(r.visited_frames),
                  f"{r.visited_blocks:.0f}", f"{r.visited_tokens:.0f}", cell(r.program),
                  cell(r.kernel), cell(r.tables), cell(r.graphed), cell(r.sdpa_rolling),
                  cell(r.sdpa_all), cell(r.sdpa_visited), cell(r.flex_prebuilt), cell(r.flex_rebuilt), speedup(r),
                  slower_than_dense(r)]
        lines.append("| " + " | ".join(values) + " |")
    slower = [str(r.step) for r in result.rows if slower_than_dense(r) == "**yes**"]
    lines += ["", "program.attention slower than dense SDPA over the frames it visits at steps: "
              + (", ".join(slower) if slower else "none")]
    fallback = {str(r.flex_options) for r in result.rows
                if r.flex_options and r.flex_options["BLOCK_N"] != result.block_tokens}
    if fallback:   # the mask's own block size did not run: say which Flex tiles did
        lines.append(f"Flex ran with kernel_options {', '.join(sorted(fallback))} (the mask's "
                     f"{result.block_tokens}-token BLOCK_N failed).")
    if result.profile:
        lines += ["", f"Where program.attention's time goes at step {result.rows[-1].step} "
                      f"(torch.profiler, --profile):", "", result.profile]
    return "\n".join(lines)


def plot(results: list[Result], path: str, title: str) -> None:
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    presets = list(dict.fromkeys(r.preset for r in results))
    tiles = list(dict.fromkeys(r.tile for r in results))
    fig, axes = plt.subplots(len(presets), len(tiles), squeeze=False, sharex=True,
                             figsize=(5.5 * len(tiles), 3.2 * len(presets)))
    series = (("program.attention", "program"), ("kernel alone", "kernel"),
              ("SDPA rolling 21", "sdpa_rolling"), ("SDPA all frames", "sdpa_all"),
              ("Flex, mask rebuilt", "flex_rebuilt"))
    for result in results:
        ax = axes[presets.index(result.preset)][tiles.index(result.tile)]
        steps = [r.step for r in result.rows]
        for label, name in series:
            ms = [getattr(r, name) for r in result.rows]
            ax.plot(steps, [m if isinstance(m, float) else math.nan for m in ms], marker=".",
                    label=label)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{result.preset}, {result.tile[0]}x{result.tile[1]} tiles", fontsize=9)
        ax.set_xlabel("AR step")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 60 * len(tiles)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line naming the option (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated steps >= 0, got {text!r}")
    return values


def tile_list(text: str) -> list[tuple[int, int]]:
    tiles = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected tiles like 8x8,8x16, got {text!r}")
        tiles.append((int(parts[0]), int(parts[1])))
    return tiles


def parse_args(argv) -> argparse.Namespace:
    p = OneLineParser(prog="rollout.py", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=None,
                   help=f"comma-separated presets, or 'all' (default {','.join(DEFAULT_PRESETS)})")
    p.add_argument("--tiles", type=tile_list, default=None, help="tiles HxW (default 8x8,8x16)")
    p.add_argument("--head-dim", type=positive_int, default=None, help="default 128 (--tiny: 16)")
    p.add_argument("--heads", type=positive_int, default=None, help="default 12 (--tiny: 2)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="AR steps (chunks) of the rollout (default 80 = 240 frames; --tiny: 3)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--timed-steps", type=int_list, default=None,
                      help=f"steps to time (default {','.join(map(str, DEFAULT_TIMED_STEPS))}: "
                           "those below --steps, and the last step)")
    when.add_argument("--step-every", type=positive_int, default=None, metavar="N",
                      help="time steps 0, N, 2N, ... and the last (every chunk is committed)")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention columns")
    p.add_argument("--dense-path", choices=("auto", "on", "off"), default="auto",
                   help="the dense path at frames_at steps: auto (PBSAProgram.path_at's choice), "
                        "on (wherever frames_at names frames), off (always the block kernels)")
    p.add_argument("--dense-sdpa", choices=("flash", "cudnn"), default=None,
                   help="the dense path's SDPA kernel on CUDA (default: "
                        "codegen.attention.dense_step.DENSE_PATH_SDPA_CUDA)")
    p.add_argument("--dense-keys", choices=("one-buffer", "cat"), default=None,
                   help="how the dense path gathers its keys (default: "
                        "codegen.attention.dense_step.DENSE_PATH_KEYS)")
    p.add_argument("--warmup", type=positive_int, default=25, help="do_bench warm-up ms (25)")
    p.add_argument("--rep", type=positive_int, default=100, help="do_bench repetition ms (100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the tables to this markdown file")
    p.add_argument("--plot", default=None,
                   help="PNG of ms vs step (default $OUT/rollout.png or ./rollout.png; 'none': no plot)")
    p.add_argument("--profile", action="store_true",
                   help="profile program.attention at the last timed step (GPU kernels by time)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny geometry")
    args = p.parse_args(argv)
    fill_defaults(args)
    check_args(p, args)
    return args


def fill_defaults(args) -> None:
    tiny = args.tiny
    if args.presets is None:
        args.presets = "sparse-forcing,moba" if tiny else ",".join(DEFAULT_PRESETS)
    if args.presets.strip() == "all":
        args.presets = ",".join(sd.presets.PRESETS)
    args.presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    args.tiles = args.tiles or ([(2, 4)] if tiny else [(8, 8), (8, 16)])
    args.head_dim = args.head_dim or (16 if tiny else 128)
    args.heads = args.heads or (2 if tiny else 12)
    args.steps = args.steps or (3 if tiny else 80)
    if args.plot is None:
        args.plot = os.path.join(os.environ.get("OUT") or ".", "rollout.png")


def check_args(p: argparse.ArgumentParser, args) -> None:
    unknown = [name for name in args.presets if name not in sd.presets.PRESETS]
    if unknown or not args.presets:
        p.error(f"--presets: unknown preset {unknown[0] if unknown else '(none)'!r}; expected "
                f"names among {', '.join(sd.presets.PRESETS)} or 'all'")
    height, width = (6, 8) if args.tiny else (30, 52)
    for tile in args.tiles:
        if tile[0] > height or tile[1] > width:
            p.error(f"--tiles: {tile[0]}x{tile[1]} does not fit a {height}x{width}-token frame")
    if args.timed_steps is not None:
        late = [s for s in args.timed_steps if s >= args.steps]
        if late:
            p.error(f"--timed-steps: step {late[0]} is not below --steps {args.steps}")
    if not args.tiny and not torch.cuda.is_available():
        p.error("--tiny is needed without a CUDA GPU (the benchmark times GPU kernels; --tiny is "
                "its CPU smoke test)")


def timed_steps(args) -> list[int]:
    last = args.steps - 1
    if args.timed_steps is not None:
        return sorted(set(args.timed_steps))
    if args.step_every is not None:
        return sorted(set(range(0, args.steps, args.step_every)) | {last})
    if args.tiny:
        return list(range(args.steps))
    return sorted({s for s in DEFAULT_TIMED_STEPS if s < args.steps} | {last})


def command_line(argv: list[str]) -> str:
    if "sparsedsl.cli" in sys.modules:   # run through `sparsedsl bench rollout`
        return "sparsedsl bench rollout " + shlex.join(argv)
    return ("PYTHONPATH=. python bench/rollout.py " + shlex.join(argv)).strip()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    geo = geometry(args)
    timer = Timer(geo.device, args.warmup, args.rep)
    flex = None if args.no_flex else Flex(compiled=geo.device == "cuda")
    if args.tiny:   # eager Flex is the point of the smoke test: no need to say it is slow
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    steps = set(timed_steps(args))
    if args.dense_sdpa is not None:
        dense_step.DENSE_PATH_SDPA_CUDA = args.dense_sdpa
    if args.dense_keys is not None:
        dense_step.DENSE_PATH_KEYS = args.dense_keys
    command = command_line(argv)
    results, tables = [], []
    with torch.no_grad():   # forward timings: no autograd graph around the calls
        for preset in args.presets:
            for tile in args.tiles:
                result = rollout(preset, tile, geo, args, steps, timer, flex)
                results.append(result)
                tables.append(table(result, geo, command))
                print(tables[-1] + "\n", flush=True)
                if args.out:   # table by table: a run stopped midway keeps what it measured
                    with open(args.out, "a") as handle:
                        handle.write("\n" + tables[-1] + "\n")
    if args.plot != "none":
        plot(results, args.plot, f"{header(geo, command)}")
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
