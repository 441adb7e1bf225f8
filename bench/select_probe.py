"""The Top-K select at moba's sizes: the Triton kernel against its torch path (issue 12).

    PYTHONPATH=. python bench/select_probe.py --out $OUT/select_probe.md     # on a GPU
    PYTHONPATH=. python bench/select_probe.py --cpu-smoke                    # CPU smoke test

moba's window is the whole past, and its rollout cache doubles the pool as the history grows,
so `window_slots.shape[2]` (NWMAX, the allocation) runs ahead of the valid window NW. The
Triton select sized its register tile by NWMAX until the ninth session (0.99 ms at moba's
step 10 on an H100, against 0.114 ms for the tile by NW); it now sizes it by NW
(`codegen.select._tile_config`), and this probe's first table times that. This probe
times, at B=1, H=12 (12 KV heads), D=128, NQB=84 (a 3-frame chunk of 30x52 tokens in 8x8
tiles: 4x7 = 28 blocks a frame), k=32, mode "union", no static set (moba's select):

1. `select_topk` with backend="triton" (the tile sized by the valid count NW), with
   `codegen.select.SELECT_TILED` on (past the threshold: tiles of that many positions, their
   best k merged by one torch.topk) and backend="torch" (gather + GEMM + torch.topk), at NW = 168, 336, 672, 1344, 2688 in the pool allocation that holds
   them, and at moba's own (NW, NWMAX) at AR steps 4, 10, 20, 40 (the pool from the cache's
   growth rule, `codegen.memory.rollout_cache`); whether the two backends' picks agree;
2. `block_importance` (the Sparse Forcing commit's column sum; its domain is P_t + a bounded
   window, fixed per pattern, so it does not grow along a rollout) at a few domain sizes;
3. `program.attention` and `program.visit_tables` for the moba preset along a rollout
   (bench/rollout.py's helpers), at steps 4, 10, 20, with the size threshold
   `codegen.select.SELECT_TRITON_MAX_POSITIONS` on (its value, or --threshold) and off
   (set to the kernel's own limit, 8192: the Triton tile at every size, as before the fix).

Times: CUDA events around each call, after a warm-up, median of --reps calls, in ms (hot L2:
the inputs stay resident between calls). Each select call appends to a visit table whose
counts are already full after the first call, so later calls drop their picks (the kernels'
documented behaviour): the same scores and top-k work, no reset launch in the timed region.
program.attention is also given as `triton.testing.do_bench`'s mean (cold L2), the number
bench/rollout.py and docs/benchmarks.md report.

`--cpu-smoke`: tiny sizes, the torch path only, time.perf_counter, on the CPU (a test runs it).
Prints markdown tables with the device, the date and the command; `--out FILE` appends them.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import statistics
import sys
import time
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/rollout.py's helpers
import rollout as rollout_bench  # noqa: E402

import sparsedsl as sd  # noqa: E402
from codegen import select as sel  # noqa: E402
from codegen.memory import rollout_cache as rc  # noqa: E402

WINDOW_POSITIONS = (168, 336, 672, 1344, 2688)
MOBA_STEPS = (4, 10, 20, 40)
PROGRAM_STEPS = (4, 10, 20)
IMPORTANCE_DOMAINS = (232, 512, 1024, 2048)   # 232 = Sparse Forcing's 64 + 6 frames x 28
OFF = sel._MAX_TRITON_POSITIONS               # threshold "off": the Triton tile at every size


# --- timing -----------------------------------------------------------------------------------
def time_ms(fn: Callable, device: str, warmup: int, reps: int) -> float:
    """Median ms per call: CUDA events around each call on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def safe(fn: Callable) -> object:
    """fn(), or a 'failed: ...' cell (a compile error or an out-of-range size is a result)."""
    try:
        return fn()
    except Exception as exc:
        return rollout_bench.failed(exc)


def cell(x) -> str:
    return rollout_bench.cell(x) if isinstance(x, (float, str)) else str(x)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "n/a"


# --- sizes --------------------------------------------------------------------------------------
def moba_schedule(layout: sd.VideoLayout, heads: int, head_dim: int, k: int):
    return sd.lower(sd.presets.get("moba", layout=layout, k=k), num_heads=heads,
                    head_dim=head_dim, dtype="bfloat16")


def pool_at(schedule, step: int) -> int:
    """Pool slots per KV head of an unbounded window's cache when chunk `step` attends (after
    `step` commits): the cache's own growth rule (start at GROWTH_START_CHUNKS chunks, double
    whenever a commit needs more)."""
    c = schedule.chunk_frames
    nslots = max(rc._kv_blocks(schedule, rc.GROWTH_START_CHUNKS * c), 1)
    for done in range(step):
        need = rc._kv_blocks(schedule, (done + 1) * c)
        if need > nslots:
            nslots = max(2 * nslots, need)
    return nslots


def allocation_for(schedule, nw: int) -> int:
    """The first pool of the doubling sequence that holds `nw` window positions."""
    step = 0
    while schedule.window_block_count(step) < nw:
        step += 1
    return pool_at(schedule, step)


def size_rows(schedule, tuned_nw: int) -> list[tuple[str, int, int]]:
    """(label, NW, NWMAX): the fixed window the kernel was tuned for, NW on the doubling
    ladder in the allocation that holds it, then moba's own AR steps."""
    rows = [("fixed window (sparse-forcing)", tuned_nw, tuned_nw)]
    rows += [("ladder", nw, allocation_for(schedule, nw)) for nw in WINDOW_POSITIONS]
    rows += [(f"moba step {s}", schedule.window_block_count(s), pool_at(schedule, s))
             for s in MOBA_STEPS]
    return rows


# --- 1. select ------------------------------------------------------------------------------------
def select_inputs(B, H, NQB, D, nw, nwmax, k, device, gen):
    q_rep = torch.randn(B, H, NQB, D, device=device, generator=gen)
    k_pool = torch.randn(B, H, nwmax, D, device=device, generator=gen)
    window = torch.zeros(B, H, nwmax, dtype=torch.int32, device=device)
    window[..., :nw] = torch.randperm(nwmax, device=device, generator=gen)[:nw].int()
    static_pos = torch.zeros(NQB, 0, dtype=torch.int32, device=device)
    static_count = torch.zeros(NQB, dtype=torch.int32, device=device)
    return q_rep, k_pool, window, static_pos, static_count


def run_select(inputs, nw, k, backend):
    q_rep, k_pool, win, static_pos, static_count = inputs
    B, H, NQB = q_rep.shape[:3]
    vs = torch.zeros(B, H, NQB, k, dtype=torch.int32, device=q_rep.device)
    vc = torch.zeros(B, H, NQB, dtype=torch.int32, device=q_rep.device)

    def call():
        sel.select_topk(q_rep, k_pool, win, nw, static_pos, static_count, "union", k, vs, vc,
                        backend=backend, check_values=False)
    return call, vs


def picks_equal(picks, reference, k_eff: int) -> str:
    """'yes', or how many (b, h, query block) rows pick other slots than the reference."""
    diff = int((picks[..., :k_eff] != reference[..., :k_eff]).any(-1).sum())
    return "yes" if diff == 0 else f"no: {diff} of {reference[..., 0].numel()} rows differ"


@contextlib.contextmanager
def select_tiled(on: bool):
    """codegen.select.SELECT_TILED set to `on` inside the block, restored after."""
    old = sel.SELECT_TILED
    sel.SELECT_TILED = on
    try:
        yield
    finally:
        sel.SELECT_TILED = old


def select_table(args, schedule, device) -> str:
    B, H, NQB, D, k = 1, args.heads, schedule.layout.chunk_blocks, args.head_dim, args.k
    tuned = (schedule.layout.blocks_per_frame * 6) if not args.cpu_smoke else 8
    gen = torch.Generator(device=device).manual_seed(0)
    rows = ["| size | NW | NWMAX | Triton tile by NW (BLOCK_W, BLOCK_Q, warps) | "
            "triton ms | torch ms | triton / torch | picks equal | program's choice now | "
            "tiled triton ms (SELECT_TILED) | tiled picks equal |",
            "|" + "---|" * 11]
    sizes = size_rows(schedule, tuned) if not args.cpu_smoke else [
        ("smoke", 8, 8), ("smoke", 12, 16), ("smoke", 20, 32)]
    for label, nw, nwmax in sizes:
        inputs = select_inputs(B, H, NQB, D, nw, nwmax, k, device, gen)
        k_eff = min(k, nw)
        t_torch_call, vs_torch = run_select(inputs, nw, k, "torch")
        t_torch = safe(lambda: time_ms(t_torch_call, device, args.warmup, args.reps))
        t_tri = t_tiled = "n/a (CPU smoke: torch only)"
        equal = equal_tiled = "n/a"
        tile = "n/a"
        if not args.cpu_smoke:
            tile = str(sel._tile_config(nw, NQB)) if nw <= OFF else f"> {OFF}: refused"
            with select_tiled(False):     # the one-tile kernel, whatever the width
                call, vs_tri = run_select(inputs, nw, k, "triton")
                t_tri = safe(lambda: time_ms(call, device, args.warmup, args.reps))
            if isinstance(t_tri, float):
                equal = picks_equal(vs_tri, vs_torch, k_eff)
            with select_tiled(True):      # past the threshold: tiles merged by one topk
                call_t, vs_tiled = run_select(inputs, nw, k, "triton")
                t_tiled = safe(lambda: time_ms(call_t, device, args.warmup, args.reps))
            if isinstance(t_tiled, float):
                equal_tiled = picks_equal(vs_tiled, vs_torch, k_eff)
        choice = sel.select_backend_for("triton", nw, tiled=sel.SELECT_TILED)
        rows.append(f"| {label} | {nw} | {nwmax} | {tile} | {cell(t_tri)} | "
                    f"{cell(t_torch)} | {ratio(t_tri, t_torch)} | {equal} | {choice} | "
                    f"{cell(t_tiled)} | {equal_tiled} |")
    return "\n".join([
        f"### select_topk: B={B}, H={H}, NQB={NQB}, D={D}, k={k}, union, no static set "
        f"(SELECT_TRITON_MAX_POSITIONS = {sel.SELECT_TRITON_MAX_POSITIONS})", ""] + rows)


# --- 2. block importance ------------------------------------------------------------------------------
def importance_table(args, schedule, device) -> str:
    B, H, NQB, D = 1, args.heads, schedule.layout.chunk_blocks, args.head_dim
    gen = torch.Generator(device=device).manual_seed(1)
    rows = ["| NDOM = ND | Triton tile (BLOCK_N, BLOCK_Q, warps) | triton ms | torch ms | "
            "triton / torch | max abs diff | 'auto' now |", "|" + "---|" * 7]
    for ndom in (IMPORTANCE_DOMAINS if not args.cpu_smoke else (8, 16)):
        q_rep = torch.randn(B, H, NQB, D, device=device, generator=gen)
        k_pool = torch.randn(B, H, ndom, D, device=device, generator=gen)
        dom = torch.randperm(ndom, device=device, generator=gen).int().expand(B, H, ndom).contiguous()
        scale = D ** -0.5

        def call(backend):
            return sel.block_importance(q_rep, k_pool, dom, ndom, scale, backend=backend,
                                        check_values=False)
        t_torch = safe(lambda: time_ms(lambda: call("torch"), device, args.warmup, args.reps))
        t_tri, tile, diff = "n/a (CPU smoke: torch only)", "n/a", "n/a"
        if not args.cpu_smoke:
            tile = str(sel._tile_config(ndom, NQB))
            t_tri = safe(lambda: time_ms(lambda: call("triton"), device, args.warmup, args.reps))
            if isinstance(t_tri, float):
                diff = f"{float((call('triton') - call('torch')).abs().max()):.1e}"
        auto = "torch" if ndom > sel.SELECT_TRITON_MAX_POSITIONS or device != "cuda" else "triton"
        rows.append(f"| {ndom} | {tile} | {cell(t_tri)} | {cell(t_torch)} | "
                    f"{ratio(t_tri, t_torch)} | {diff} | {auto} |")
    return "\n".join([f"### block_importance: B={B}, H={H}, NQB={NQB}, D={D}", ""] + rows)


# --- 3. program.attention along a moba rollout -------------------------------------------------------------
def program_table(args, device: str) -> str:
    """moba's program.attention and visit tables at PROGRAM_STEPS, the threshold on and off,
    on one rollout (bench/rollout.py's geometry, program and chunks)."""
    tiny = args.cpu_smoke
    geo = rollout_bench.Geometry(*((6, 8) if tiny else (30, 52)), 3, args.heads, args.head_dim,
                                 torch.float32 if tiny else torch.bfloat16, device,
                                 "torch" if tiny else "triton")
    tile = (2, 4) if tiny else (8, 8)
    layout = sd.VideoLayout(geo.height, geo.width, tile, geo.chunk_frames)
    program = rollout_bench.make_program("moba", layout, geo, tiny)
    cache = program.new_cache(batch=1, num_layers=1, device=geo.device, dtype=geo.dtype)
    gen = torch.Generator(device=geo.device).manual_seed(0)
    steps = (1, 2, 3) if tiny else PROGRAM_STEPS
    on = args.threshold if args.threshold is not None else sel.SELECT_TRITON_MAX_POSITIONS
    do_bench = rollout_bench.Timer(device, 25, 100) if device == "cuda" else None
    rows = ["| step | NW | pool slots (NWMAX) | select path (on) | program.attention ms, "
            f"threshold on ({on}) | off ({OFF}) | on / off | do_bench mean on | do_bench mean off | "
            "visit tables + select ms, on | off |", "|" + "---|" * 11]
    old = sel.SELECT_TRITON_MAX_POSITIONS
    try:
        for step in range(max(steps) + 1):
            (_, _, _), (q, k, v) = rollout_bench.random_chunk(layout, geo, gen)
            if step in steps:
                tables = cache.tables(0)
                qb = program._blocks(q)
                cells = {}
                for name, value in (("on", on), ("off", OFF)):
                    sel.SELECT_TRITON_MAX_POSITIONS = value
                    attn = lambda: program.attention(q, k, v, tables)   # noqa: E731
                    cells[name] = (
                        safe(lambda: time_ms(attn, device, args.warmup, args.reps)),
                        safe(lambda: do_bench(attn)) if do_bench else "n/a (CPU)",
                        safe(lambda: time_ms(lambda: program.visit_tables(
                            qb, tables, step, select_backend=program.backend, validate=False),
                            device, args.warmup, args.reps)))
                nwmax = tables.window_slots.shape[2]
                nw = program.schedule.window_block_count(step)
                sel.SELECT_TRITON_MAX_POSITIONS = on
                path = sel.select_backend_for(program.backend, nw, tiled=sel.SELECT_TILED)
                (a_on, b_on, t_on), (a_off, b_off, t_off) = cells["on"], cells["off"]
                rows.append(f"| {step} | {nw} | {nwmax} | "
                            f"{path} | {cell(a_on)} | {cell(a_off)} | {ratio(a_on, a_off)} | "
                            f"{cell(b_on)} | {cell(b_off)} | {cell(t_on)} | {cell(t_off)} |")
                print(rows[-1], file=sys.stderr, flush=True)
            cache.commit(0, q, k, v)
    finally:
        sel.SELECT_TRITON_MAX_POSITIONS = old
    del cache
    return "\n".join([
        f"### moba program.attention along a rollout: {geo.height}x{geo.width} tokens, "
        f"{tile[0]}x{tile[1]} tiles, {geo.chunk_frames}-frame chunks, H={geo.heads}, "
        f"D={geo.head_dim}, {geo.dtype_name}, backend {geo.backend}", ""] + rows)


# --- command line ---------------------------------------------------------------------------------------
def parse_args(argv) -> argparse.Namespace:
    p = rollout_bench.OneLineParser(prog="select_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append the tables to this markdown file")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes, torch path only, on the CPU (the test's mode)")
    p.add_argument("--heads", type=rollout_bench.positive_int, default=None,
                   help="default 12 (--cpu-smoke: 2)")
    p.add_argument("--head-dim", type=rollout_bench.positive_int, default=None,
                   help="default 128 (--cpu-smoke: 16)")
    p.add_argument("--k", type=rollout_bench.positive_int, default=None,
                   help="Top-K of the select (default 32, moba's; --cpu-smoke: 4)")
    p.add_argument("--threshold", type=rollout_bench.positive_int, default=None,
                   help="SELECT_TRITON_MAX_POSITIONS for 'threshold on' (default: the module's)")
    p.add_argument("--warmup", type=rollout_bench.positive_int, default=None,
                   help="warm-up calls (default 20; --cpu-smoke: 1)")
    p.add_argument("--reps", type=rollout_bench.positive_int, default=None,
                   help="timed calls, median taken (default 200; --cpu-smoke: 3)")
    p.add_argument("--no-program", action="store_true",
                   help="skip the program.attention rollout (section 3)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.heads = args.heads or (2 if smoke else 12)
    args.head_dim = args.head_dim or (16 if smoke else 128)
    args.k = args.k or (4 if smoke else 32)
    args.warmup = args.warmup or (1 if smoke else 20)
    args.reps = args.reps or (3 if smoke else 200)
    if not smoke and not torch.cuda.is_available():
        p.error("--cpu-smoke is needed without a CUDA GPU (the probe times GPU kernels)")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    layout = (sd.VideoLayout(6, 8, (2, 4), 3) if args.cpu_smoke
              else sd.VideoLayout(30, 52, (8, 8), 3))
    schedule = moba_schedule(layout, args.heads, args.head_dim, args.k)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    try:
        import triton
        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}, triton not installed"
    now = datetime.datetime.now(datetime.timezone.utc)
    command = ("PYTHONPATH=. python bench/select_probe.py " + shlex.join(argv)).strip()
    parts = [f"## Select probe (issue 12): {name}, {now:%Y-%m-%d %H:%M} UTC, {versions}; "
             f"command: `{command}`"]
    print(parts[0] + "\n", flush=True)
    with torch.no_grad():
        for make in (select_table, importance_table):
            parts.append(make(args, schedule, device))
            print(parts[-1] + "\n", flush=True)
        if not args.no_program:
            parts.append(program_table(args, device))
            print(parts[-1] + "\n", flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n" + "\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
