"""The `sparsedsl` command line (also `python -m sparsedsl`).

    sparsedsl explain sparse-forcing --png out/sparse-forcing.png
    sparsedsl explain my_pattern.py --horizon 21 --horizon 480 --heads 12 --head-dim 128
    sparsedsl presets
    sparsedsl demo --out out/

`explain` takes a preset name or a Python file that defines a variable `pattern`
(a `sparsedsl.Pattern`). User errors (an unknown preset, a file without `pattern`,
a field the DSL rejects) print one line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import runpy
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from .errors import CheckEnvironmentError, PatternError
from .pattern import Pattern

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --- loading a pattern ------------------------------------------------------------------
def load_pattern(spec: str) -> Pattern:
    """A preset name, or a path to a Python file defining `pattern`."""
    from . import presets

    if spec in presets.PRESETS:
        return presets.get(spec)
    path = Path(spec)
    if not path.exists():
        if spec.endswith(".py"):
            raise CliError(f"pattern file '{spec}' does not exist")
        raise CliError(f"unknown preset '{spec}': expected one of {', '.join(presets.PRESETS)} "
                       "or a path to a Python file defining `pattern`")
    if not path.is_file():
        raise CliError(f"'{spec}' is not a file: expected a Python file defining `pattern`")
    try:
        namespace = runpy.run_path(str(path), run_name="__sparsedsl_pattern__")
    except PatternError as exc:
        raise CliError(f"{spec}: {exc}") from exc
    except SyntaxError as exc:
        raise CliError(f"{spec}: syntax error at line {exc.lineno}: {exc.msg}") from exc
    except Exception as exc:  # the user's file failed: say where, not a traceback
        raise CliError(f"{spec}: {type(exc).__name__}: {exc}") from exc
    if "pattern" not in namespace:
        raise CliError(f"{spec} defines no variable `pattern` "
                       "(write e.g. `pattern = sparsedsl.Pattern(...)` at module level)")
    pattern = namespace["pattern"]
    if not isinstance(pattern, Pattern):
        raise CliError(f"{spec}: `pattern` is a {type(pattern).__name__}, not a sparsedsl.Pattern")
    return pattern


# --- argument bounds and output paths ------------------------------------------------------
#: --rollout simulates the cache frame by frame and draws one column per step.
MAX_ROLLOUT_FRAMES = 2_000


def _check_range(flag: str, value: Optional[int], minimum: int, maximum: int, why: str) -> None:
    if value is not None and not minimum <= value <= maximum:
        raise CliError(f"{flag} {value}: expected an integer in [{minimum}, {maximum}] ({why})")


def _check_head_dim(args: argparse.Namespace) -> None:
    from .lowering import MAX_HEAD_DIM
    _check_range("--head-dim", args.head_dim, 1, MAX_HEAD_DIM,
                 f"the kernels take head dims up to {MAX_HEAD_DIM}")


def _check_writable(path, what: str) -> Path:
    """Fail early, in one line, when `path` (a file or folder to create) cannot be written."""
    path = Path(path)
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent != path and parent.exists() and not parent.is_dir():
        raise CliError(f"cannot write {what} '{path}': '{parent}' is a file, not a directory")
    if path.exists() and what == "folder" and not path.is_dir():
        raise CliError(f"cannot write {what} '{path}': it is a file, not a directory")
    if path.exists() and what != "folder" and path.is_dir():
        raise CliError(f"cannot write {what} '{path}': it is a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {what} '{path}': permission denied on '{parent}'")
    return path


def _write(path, what: str, writer):
    """Run `writer()`; an OSError becomes one line naming the path and the reason."""
    try:
        return writer()
    except OSError as exc:
        raise CliError(f"cannot write {what} '{path}': {exc.strerror or exc}") from exc


# --- subcommands ---------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import MAX_HORIZON_FRAMES, explain
    from .lowering import lower

    _check_head_dim(args)
    for frames in args.horizon or ():
        _check_range("--horizon", frames, 1, MAX_HORIZON_FRAMES, "latent frames")
    _check_range("--rollout", args.rollout, 1, MAX_ROLLOUT_FRAMES,
                 "frames of the simulated rollout")
    if args.png:
        _check_writable(args.png, "PNG")
    pattern = load_pattern(args.pattern)
    schedule = lower(pattern, num_heads=args.heads, num_kv_heads=args.kv_heads,
                     head_dim=args.head_dim, dtype=args.dtype)
    horizons = None
    if args.horizon:
        horizons = {f"T={frames}": frames for frames in args.horizon}
    print(explain(schedule, horizons=horizons))
    if args.png and args.rollout:
        from . import compile as compile_pattern
        program = compile_pattern(pattern, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                  head_dim=args.head_dim, dtype=args.dtype, backend="torch")
        if not hasattr(program, "draw_memory"):
            raise CliError("--rollout needs the codegen package (the memory runtime)")
        path = _write(args.png, "PNG", lambda: program.draw_memory(args.rollout, args.png))
        print(f"wrote {path}")
    elif args.png:
        from .plot import draw_block_mask
        path = _write(args.png, "PNG",
                      lambda: draw_block_mask(schedule, step=args.step, path=args.png))
        print(f"wrote {path}")
    elif args.rollout:
        raise CliError("--rollout draws a picture: give --png FILE too")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from . import compile as compile_pattern

    _check_head_dim(args)
    _check_writable(args.out, "folder")
    pattern = load_pattern(args.pattern)
    program = compile_pattern(pattern, num_heads=args.heads, num_kv_heads=args.kv_heads,
                              head_dim=args.head_dim, dtype=args.dtype, backend=args.backend)
    if not hasattr(program, "write_source"):
        raise CliError(f"backend '{args.backend}' generates no source; use --backend triton")
    path = _write(args.out, "folder", lambda: program.write_source(args.out))
    print(f"{program!r}\nwrote the generated Triton source to {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from . import compile as compile_pattern

    _check_head_dim(args)
    if args.backend not in ("auto", "triton", "torch"):
        raise CliError(f"--backend {args.backend}: expected auto, triton or torch")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if (args.backend == "triton" and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise CliError("--backend triton: no CUDA GPU is visible; use --backend torch (or set "
                       "TRITON_INTERPRET=1 for Triton's slow CPU interpreter)")
    pattern = load_pattern(args.pattern)
    program = compile_pattern(pattern, num_heads=args.heads, head_dim=args.head_dim,
                              backend=args.backend)
    if not hasattr(program, "property_check"):
        raise CliError(f"backend '{args.backend}' has no kernels to check")

    backend = args.backend if args.backend != "auto" else (
        "triton" if args.device == "cuda" else "torch")
    dtypes = ("float32",) if args.device == "cpu" else ("float32", "bfloat16", "float16")
    print(f"checking {program!r} against the float64 reference on {args.examples} random small "
          f"layouts ({args.device}, {args.heads} heads x {args.head_dim}) ...", flush=True)
    try:
        report = program.property_check(examples=args.examples, device=args.device,
                                        backend=backend, dtypes=dtypes, num_heads=args.heads,
                                        head_dim=args.head_dim)
    except CheckEnvironmentError as exc:
        raise CliError(str(exc)) from exc
    if report is None:
        print(f"PASS: {args.examples} examples: visits, output, LSE and gradients match")
        return 0
    print(f"FAIL: counterexample (shrunk): {report}")
    return 1


# `sparsedsl bench NAME`: the benchmark modules of the checkout's bench/ folder, by name;
# each prints a markdown table with the device, the date and its command
BENCH_SCRIPTS = {
    "attention": ("gpu_attention.py", "PBSA vs FlexAttention vs SDPA: checks, sweep, splits, table"),
    "program": ("gpu_program.py", "program checks on the GPU and the selection's cost"),
    "memory": ("memory.py", "the memory update's cost per chunk and the peak KV bytes"),
    "model-step": ("model_step.py", "the reference model's self-forcing step and its attention share"),
    "teacher-forcing": ("teacher_forcing_step.py", "the student's teacher-forcing step, profiled"),
    "rollout": ("rollout.py", "program.attention along a rollout vs dense SDPA and Flex, every preset"),
    "decode": ("decode.py", "end-to-end decoding at wan-1.3b scale: frames/s, latency, peak memory"),
    "select": ("select_probe.py", "the Top-K select at moba's sizes: Triton kernel vs torch path"),
}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a GPU benchmark script of the checkout's bench/ folder (they print markdown tables)."""
    import torch

    if args.list:
        width = max(map(len, BENCH_SCRIPTS))
        for name, (script, what) in BENCH_SCRIPTS.items():
            print(f"{name:<{width}}  bench/{script:<24} {what}")
        return 0
    which = "memory" if args.memory else args.which
    script = Path(__file__).resolve().parent.parent / "bench" / BENCH_SCRIPTS[which][0]
    if not script.is_file():
        raise CliError(f"{script} not found: `sparsedsl bench` runs from a source checkout")
    if not torch.cuda.is_available() and "--tiny" not in args.extra:
        raise CliError("the benchmarks need a CUDA GPU (all but `program` take --tiny for a CPU smoke test: "
                       "`sparsedsl bench memory --tiny`)")
    sys.argv = [str(script)] + list(args.extra)
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_tiles(args: argparse.Namespace) -> int:
    """Rank tile shapes for a frame of HxW tokens by the kernel slots they leave empty."""
    from .tiles import format_table, rank_tiles
    try:
        height, width = (int(x) for x in args.frame.lower().split("x"))
    except ValueError:
        raise CliError(f"frame {args.frame!r}: expected HEIGHTxWIDTH in tokens, e.g. 30x52") from None
    _check_range("--max-block", args.max_block, 16, 1024, "kernel slots per block")
    choices = rank_tiles(height, width, max_block=args.max_block, min_blocks=args.min_blocks)
    if not choices:
        raise CliError(f"no tile of {height}x{width} tokens gives >= {args.min_blocks} blocks of "
                       f"<= {args.max_block} slots: lower --min-blocks")
    print(format_table(height, width, choices, args.top))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from . import presets

    width = max(len(name) for name in presets.PRESETS)
    for name, factory in presets.PRESETS.items():
        doc = (factory.__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {doc[0] if doc else ''}")
    return 0


def demo_schedule():
    """The demo's small sparse-forcing: 8x10 tokens in 4x4 tiles (the right column partial,
    so padding is exercised), 2-frame chunks, 1 sink frame, a 2-frame window with
    Radius(1,1,1) | TopK(25%), memory of 4 blocks; 2 heads x 16, float32 KV bytes."""
    from . import presets
    from .layout import VideoLayout
    from .lowering import lower

    layout = VideoLayout(8, 10, tile=(4, 4), chunk_frames=2)
    pattern = presets.sparse_forcing(layout, capacity=4, window_frames=2)
    return lower(pattern, num_heads=2, head_dim=16, dtype="float32")


class _Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.count = 0

    def __call__(self, name: str, ok: bool, detail: str = "") -> None:
        self.count += 1
        if not ok:
            self.failed.append(name)
        _say(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))


def _say(line: str) -> None:
    """Print to stdout without tearing the progress bar (which lives on stderr)."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stdout)


def _random_chunks(schedule, steps: int, batch: int, seed: int):
    """Random q/k/v per step in raster order, moved to the tile-major layout (padding = 0)."""
    import torch

    lay = schedule.layout
    gen = torch.Generator().manual_seed(seed)
    n = lay.chunk_frames * lay.tokens_per_frame
    chunks = []
    for _ in range(steps):
        q, k, v = (torch.randn(batch, heads, n, schedule.head_dim, generator=gen,
                               dtype=torch.float64)
                   for heads in (schedule.num_heads, schedule.num_kv_heads, schedule.num_kv_heads))
        chunks.append(tuple(lay.to_tile_major(x, lay.chunk_frames) for x in (q, k, v)))
    return chunks


def _frames(start: int, end: int) -> str:
    return "none" if end <= start else str(start) if end == start + 1 else f"{start}-{end - 1}"


def check_rollout(schedule, steps: int = 4, batch: int = 2, seed: int = 0, progress: bool = True):
    """Run the float64 reference over `steps` random chunks and check every step against the
    definitions (plain softmax over the token mask, `schedule.visits`, the cache's bytes).
    Prints one PASS/FAIL line per check; returns the names of the failed checks."""
    import torch
    from tqdm import tqdm

    from . import reference

    lay = schedule.layout
    nb, c = lay.blocks_per_frame, lay.chunk_frames
    group = schedule.num_heads // schedule.num_kv_heads
    scale = 1.0 / math.sqrt(schedule.head_dim)
    chunks = _random_chunks(schedule, steps, batch, seed)
    check = _Checks()
    before = reference.new_state(schedule, batch)
    K_all, V_all = [], []
    bar = tqdm(reference.rollout(schedule, chunks, batch), total=steps, desc="reference rollout",
               unit="step", file=sys.stderr, leave=False,
               disable=not progress or not sys.stderr.isatty())  # no \r frames into a file
    for step, out, lse, block_mask, after in bar:
        q, k, v = chunks[step]
        K_all.append(k)
        V_all.append(v)
        w_start, w_end = schedule.window_frames_range(step)
        _say(f"step {step}: query frames {_frames(step * c, step * c + c)}, window frames "
             + _frames(w_start, w_end)
             + f", persistent blocks {sorted(before.persistent[(0, 0)])} (batch 0, head 0)")

        # 1. the reference equals plain softmax attention over the materialised token mask,
        #    with K/V taken from the full history (not the cache).
        K = torch.cat(K_all, dim=2).repeat_interleave(group, dim=1)
        V = torch.cat(V_all, dim=2).repeat_interleave(group, dim=1)
        mask = reference.token_mask(schedule, block_mask)
        scores = (q @ K.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        plain = torch.softmax(scores, dim=-1) @ V
        q_valid = lay.valid_token_mask(c)
        diff = (out[..., q_valid, :] - plain[..., q_valid, :]).abs().max().item()
        pad_zero = bool((out[..., ~q_valid, :] == 0).all())
        check(f"step {step}: reference == softmax(token mask) attention",
              diff <= 1e-10 and pad_zero, f"max |diff| {diff:.1e}"
              + ("" if pad_zero else ", padded query rows not zero"))

        # 2. schedule.visits with the runtime parts read off the state and the mask equals the
        #    mask's allowed blocks, visits no block twice, and Top-K picks topk_count blocks.
        window = set(range(w_start * nb, w_end * nb))
        intersection = schedule.window.has_topk and schedule.window.split.mode == "intersection"
        bad, checked = [], 0
        for b in range(batch):
            for h in range(schedule.num_heads):
                persistent = sorted(before.persistent[(b, h // group)])
                for qb in range(lay.chunk_blocks):
                    allowed = set(block_mask[b, h, qb].nonzero().flatten().tolist())
                    static = set() if intersection else set(
                        schedule.static_window_blocks(step, qb))
                    topk = sorted((allowed & window) - static)
                    visits = schedule.visits(step, qb, persistent=persistent, topk=topk)
                    checked += 1
                    if (set(visits) != allowed or len(set(visits)) != len(visits)
                            or len(topk) != schedule.topk_count(step, qb)):
                        bad.append((b, h, qb))
        check(f"step {step}: schedule.visits == reference block mask", not bad,
              f"{checked} (batch, head, query block) rows"
              + (f", first mismatch {bad[0]}" if bad else ""))

        # 3. the cache holds what the sympy analysis says, for the whole batch.
        frames = (step + 1) * c
        held = after.nbytes(schedule.dtype)
        want = schedule.shapes.kv_bytes(frames) * batch
        check(f"step {step}: cache bytes == shapes.kv_bytes({frames}) x batch {batch}",
              held == want, f"{held} B held, {want} B predicted")
        before = after
    bar.close()
    return check.failed, check.count


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    failed, count = [], 0
    if args.full_size:
        _check_writable(args.out, "folder")
        from . import presets
        from .explain import explain
        from .lowering import lower
        from .plot import draw_block_mask

        full = lower(presets.sparse_forcing())
        print("== sparse-forcing at Self-Forcing size (30x52 tokens, 8x8 tiles, 3-frame chunks, "
              "12 heads x 128, bf16) ==")
        print(explain(full))
        print()
    small = demo_schedule()
    print(f"== small sparse-forcing, float64 reference on random q/k/v: {args.steps} steps, "
          f"batch {args.batch}, seed {args.seed} ==")
    print(small.layout)
    print(small.describe())
    try:
        failed, count = check_rollout(small, steps=args.steps, batch=args.batch, seed=args.seed)
    except Exception as exc:  # a crash inside the reference or the schedule is a failed check
        traceback.print_exc()
        failed, count = [f"the rollout raised {type(exc).__name__}: {exc}"], 1
        print(f"  FAIL  {failed[0]}")
    if args.full_size:
        png = Path(args.out) / "sparse-forcing.png"
        path = _write(png, "PNG", lambda: draw_block_mask(full, path=png, seed=args.seed))
        print(f"wrote {path}")
    elapsed = time.perf_counter() - start
    if failed:
        print(f"FAIL: {len(failed)} of {count} checks failed ({elapsed:.1f} s): "
              + "; ".join(failed))
        return 1
    print(f"PASS: all {count} checks passed ({elapsed:.1f} s)")
    return 0


# --- the parser ---------------------------------------------------------------------------
def _int_at_least(minimum: int, words: str):
    """An argparse type: an integer >= minimum, with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsedsl", description="Declare, inspect and check persistent block-sparse "
                                      "attention patterns for AR video diffusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("explain", help="segments, density, FLOPs and KV bytes vs horizon, checks",
                       description="Lower PATTERN and print its report (sparsedsl.explain).")
    p.add_argument("pattern", metavar="PATTERN",
                   help="a preset name (see `sparsedsl presets`) or a .py file defining `pattern`")
    p.add_argument("--png", metavar="FILE", help="also draw the block mask of one step to FILE")
    p.add_argument("--horizon", metavar="T", type=_positive_int, action="append",
                   help="horizon in latent frames (repeatable; default 21, 84, 240 = 5/20/60 s)")
    p.add_argument("--heads", metavar="H", type=_positive_int, default=12,
                   help="query heads (default 12)")
    p.add_argument("--kv-heads", metavar="HKV", type=_positive_int, default=None,
                   help="KV heads (default: --heads)")
    p.add_argument("--head-dim", metavar="D", type=_positive_int, default=128,
                   help="head dim (default 128)")
    p.add_argument("--dtype", default="bfloat16",
                   help="KV dtype for the byte counts (default bfloat16)")
    p.add_argument("--step", metavar="N", type=_nonnegative_int, default=None,
                   help="AR step drawn by --png (default: the first steady-state step)")
    p.add_argument("--rollout", metavar="T", type=_positive_int, default=None,
                   help="with --png: draw the persistent memory over a simulated rollout of T "
                        "frames instead of one step's block mask")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("compile", help="write the generated Triton source of PATTERN",
                       description="Compile PATTERN and write its generated kernels' source.")
    p.add_argument("pattern", metavar="PATTERN", help="a preset name or a .py file defining `pattern`")
    p.add_argument("--out", metavar="DIR", default="out/kernels", help="(default out/kernels)")
    p.add_argument("--backend", default="triton", help="backend (default triton)")
    p.add_argument("--heads", metavar="H", type=_positive_int, default=12)
    p.add_argument("--kv-heads", metavar="HKV", type=_positive_int, default=None)
    p.add_argument("--head-dim", metavar="D", type=_positive_int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("check", help="property-test PATTERN's kernels against the reference",
                       description="Property-test the compiled kernels (select, forward, backward) "
                                   "of PATTERN on random small layouts against the float64 "
                                   "reference; print the shrunk counterexample if one fails.")
    p.add_argument("pattern", metavar="PATTERN", help="a preset name or a .py file defining `pattern`")
    p.add_argument("--examples", metavar="N", type=_positive_int, default=20)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", default="auto",
                   help="auto (Triton on cuda, PyTorch backend on cpu), triton or torch")
    p.add_argument("--heads", metavar="H", type=_positive_int, default=2)
    p.add_argument("--head-dim", metavar="D", type=_positive_int, default=16)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="GPU benchmarks by name (--list): attention, memory, model step, ...",
                       description="Run one benchmark module of the checkout's bench/ folder by "
                                   "name (`sparsedsl bench --list`); extra arguments go to it "
                                   "(`sparsedsl bench attention --phases check`).")
    p.add_argument("which", nargs="?", choices=list(BENCH_SCRIPTS), default="attention")
    p.add_argument("--list", action="store_true", help="list the benchmarks and what they measure")
    p.add_argument("--memory", action="store_true", help="same as `bench memory`")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tiles", help="which tile shape wastes least kernel work for a frame size",
                       description="Rank tile shapes for a frame of HEIGHTxWIDTH tokens by the "
                                   "share of kernel slots left empty (edge tiles plus the "
                                   "kernels' rounding of a block to a power of two >= 16).")
    p.add_argument("frame", metavar="HxW", help="tokens per frame, e.g. 30x52")
    p.add_argument("--max-block", type=_positive_int, default=128, metavar="N",
                   help="largest kernel block, in slots (default 128)")
    p.add_argument("--min-blocks", type=_positive_int, default=16, metavar="N",
                   help="fewest blocks per frame (Top-K needs blocks to choose among; default 16)")
    p.add_argument("--top", type=_positive_int, default=10, metavar="N", help="rows (default 10)")
    p.set_defaults(func=cmd_tiles)

    p = sub.add_parser("presets", help="list the preset patterns",
                       description="List the preset patterns with their one-line descriptions.")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="check the float64 reference on a small rollout (CPU)",
                       description="Declare sparse-forcing on a small layout, run a rollout of the "
                                   "float64 reference on random q/k/v and check it step by step; "
                                   "print the full-size Self-Forcing report and draw its block "
                                   "mask. Exits 1 if any check fails.")
    p.add_argument("--out", metavar="DIR", default="out", help="where the PNG goes (default out/)")
    p.add_argument("--steps", metavar="N", type=_positive_int, default=4,
                   help="AR steps of the small rollout (default 4)")
    p.add_argument("--batch", metavar="B", type=_positive_int, default=2,
                   help="batch of the small rollout (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-full-size", dest="full_size", action="store_false",
                   help="skip the full-size report and picture (the small checks only)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage + the error (or --help)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except (CliError, PatternError) as exc:
        print(f"sparsedsl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
