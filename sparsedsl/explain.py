"""Human-readable report of a compiled pattern: segments, density, visits, cost vs dense, checks."""
from __future__ import annotations

from .errors import PatternError
from .graph import block_graph, reach
from .schedule import Schedule

#: Self-Forcing horizons in latent frames: 5 s, 20 s, 60 s.
HORIZONS = {"5 s": 21, "20 s": 84, "60 s": 240}
#: Largest horizon the report takes (frames; ~2.3 days of Self-Forcing latent frames): the
#: costs are closed forms for bounded windows but sums over steps for unbounded ones.
MAX_HORIZON_FRAMES = 1_000_000
#: Horizons up to this many frames get the frame-graph reach line (its cost grows with T).
MAX_REACH_FRAMES = 2_000


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


def density_at(schedule: Schedule, step: int) -> tuple[int, int, float]:
    """(max visits, key blocks in causal history, density of the busiest query block)."""
    visits = schedule.shapes.max_visits_at(step)
    history = (step + 1) * schedule.layout.chunk_blocks
    return visits, history, visits / history


def _ranges(steps: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for i, t in enumerate(steps):
        if start is None:
            start = t
        if i + 1 == len(steps) or steps[i + 1] != t + 1:
            parts.append(f"{start}" if start == t else f"{start}-{t}")
            start = None
    return ", ".join(parts)


def _dense_path_line(schedule: Schedule, horizons: dict[str, int]) -> str:
    """The steps at which every query block visits the same earlier frames whole: a backend
    runs them as one dense SDPA over those frames (the same attention, without the sparse
    machinery)."""
    steps = schedule.shapes.steps(max(horizons.values())) if horizons else 1
    dense = schedule.whole_frame_steps(steps)
    return (f"dense path (the same whole frames visited by every query block; a backend may run "
            f"them as one fused SDPA, same result): steps {_ranges(dense)} of {steps}")


def explain(schedule: Schedule, horizons: dict[str, int] | None = None, graph: bool = True) -> str:
    horizons = HORIZONS if horizons is None else horizons
    for name, frames in horizons.items():
        if isinstance(frames, bool) or not isinstance(frames, int) \
                or not 1 <= frames <= MAX_HORIZON_FRAMES:
            raise PatternError(f"horizon {name!r}", frames,
                               f"an integer in [1, {MAX_HORIZON_FRAMES}] (latent frames)")
    s = schedule.shapes
    lay = schedule.layout
    lines = [schedule.describe(), "",
             f"layout: {lay.tokens_per_frame} tokens/frame -> {s.blocks_per_frame} blocks of "
             f"{s.block_tokens} slots ({s.padding_per_frame} padding slots/frame)",
             "visits per query block (max over blocks and heads), sympy in step t:",
             f"  {s.max_visits}", _dense_path_line(schedule, horizons), ""]
    header = f"{'horizon':>8} {'frames':>6} {'visits':>7} {'density':>8} {'FLOPs':>10} " \
             f"{'vs dense':>8} {'KV/layer':>10} {'dense KV':>10} {'KV ratio':>8}"
    lines.append(header)
    lines.append("-" * len(header))
    for name, frames in horizons.items():
        last_step = s.steps(frames) - 1
        visits, history, density = density_at(schedule, last_step)
        flops, dense_flops = s.flops(frames), s.flops(frames, dense=True)
        kv, dense_kv = s.kv_bytes(frames), s.kv_bytes(frames, dense=True)
        lines.append(f"{name:>8} {frames:>6} {visits:>7} {density:>8.1%} {flops / 1e12:>8.2f} T "
                     f"{flops / dense_flops:>8.1%} {_size(kv):>10} {_size(dense_kv):>10} "
                     f"{kv / dense_kv:>8.1%}")
    lines.append("(FLOPs: forward attention of one layer, one video, all heads, to generate the "
                 "horizon; dense = block-causal attention over every earlier frame; density at the "
                 "last step)")
    if graph:
        _, report = block_graph(schedule)
        lines += ["", f"graph over {report.steps} steps: {report.nodes} blocks, {report.edges} "
                      f"may-attend edges",
                  f"  causal (nothing from the future): {'yes' if report.causal else 'NO'}",
                  f"  segments disjoint (no block visited twice): "
                  f"{'yes' if report.disjoint_segments else 'NO'}"]
        lines += [f"  ! {p}" for p in report.problems]
        for name, frames in horizons.items():
            if frames > MAX_REACH_FRAMES:
                lines.append(f"  frame 0 -> frame {frames - 1} ({name}): not computed "
                             f"(the reach graph is drawn up to {MAX_REACH_FRAMES} frames)")
                continue
            r = reach(schedule, frames)
            how = ("directly (sink or memory)" if r.direct_memory else
                   f"in {r.hops} attention hops" if r.reachable else "no longer")
            lines.append(f"  frame 0 -> frame {frames - 1} ({name}): {how}")
    return "\n".join(lines)
