"""Graph pass: a networkx block-dependency graph over a simulated rollout.

An edge key -> query means "at the query's step, the query block may attend the key
block" for *some* runtime choice (any Top-K pick, any persistent set drawn from the
evicted blocks): an over-approximation, so the checks below are proofs for every
rollout, not tests of one.

Checks: causality (no edge from a later chunk, none from a later frame when the
current chunk is causal) and disjoint segments (no block can be visited twice).
Reach: on the frame graph up to a horizon, can frame 0 still influence the last
frame, and through how many attention hops (layers)?
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import networkx as nx

from .schedule import Schedule


@dataclass(frozen=True)
class GraphReport:
    steps: int
    nodes: int
    edges: int
    causal: bool
    disjoint_segments: bool
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.causal and self.disjoint_segments


@dataclass(frozen=True)
class Reach:
    horizon_frames: int
    reachable: bool
    hops: Optional[int]          # shortest path in attention hops, None if unreachable
    direct_memory: bool          # frame 0 is attended directly at the last step (sink or memory)


def possible_segments(schedule: Schedule, step: int, query_block: int) -> dict[str, set[int]]:
    """Every block each segment may contribute at `step` for any runtime choice."""
    nb = schedule.blocks_per_frame
    w_start, _ = schedule.window_frames_range(step)
    evicted = set(range(schedule.sink_frames * nb, w_start * nb)) if schedule.capacity else set()
    static = set(schedule.static_window_blocks(step, query_block))
    if schedule.window.has_topk and schedule.window.split.mode == "intersection":
        static = set()
    return {"current": set(schedule.current_blocks(step, query_block)),
            "sink": set(schedule.sink_blocks(step)),
            "persistent": evicted,
            "window": static,
            "topk": set(schedule.topk_candidates(step, query_block))}


def default_steps(schedule: Schedule) -> int:
    """Enough steps to fill sink, window and memory, plus two in steady state."""
    c = schedule.chunk_frames
    frames = schedule.sink_frames + (schedule.window.frames or 2 * c) + c
    return -(-frames // c) + 2


def block_graph(schedule: Schedule, steps: Optional[int] = None) -> tuple[nx.DiGraph, GraphReport]:
    steps = default_steps(schedule) if steps is None else steps
    lay = schedule.layout
    graph = nx.DiGraph()
    problems = []
    for step in range(steps):
        chunk_first = step * lay.chunk_blocks
        for qb in range(lay.chunk_blocks):
            query = chunk_first + qb
            graph.add_node(query, frame=lay.block_coords(query)[0])
            segments = possible_segments(schedule, step, qb)
            names = list(segments)
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    overlap = segments[names[a]] & segments[names[b]]
                    if overlap:
                        problems.append(f"step {step} query block {qb}: {names[a]} and {names[b]} "
                                        f"share blocks {sorted(overlap)[:4]}")
            for name, blocks in segments.items():
                for key in blocks:
                    graph.add_edge(key, query, segment=name)
    causal = True
    for key, query in graph.edges:
        fk, fq = lay.block_coords(key)[0], lay.block_coords(query)[0]
        chunk_k, chunk_q = fk // lay.chunk_frames, fq // lay.chunk_frames
        if chunk_k > chunk_q or (schedule.current == "causal" and fk > fq):
            causal = False
            problems.append(f"block {key} (frame {fk}) reaches block {query} (frame {fq}) "
                            "from the future")
            break
    report = GraphReport(steps, graph.number_of_nodes(), graph.number_of_edges(), causal,
                         not any("share blocks" in p for p in problems), tuple(problems[:10]))
    return graph, report


def frame_graph(schedule: Schedule, horizon_frames: int) -> nx.DiGraph:
    """Frames as nodes; an edge fk -> fq when some block of fq may attend some block of fk.

    Works on frame ranges (not blocks), so a 240-frame horizon costs milliseconds.
    """
    lay = schedule.layout
    c, nb = lay.chunk_frames, lay.blocks_per_frame
    window = schedule.window
    graph = nx.DiGraph()
    graph.add_nodes_from(range(horizon_frames))
    for step in range(-(-horizon_frames // c)):
        chunk0 = step * c
        w_start, w_end = schedule.window_frames_range(step)
        for r in range(c):
            fq = chunk0 + r
            if fq >= horizon_frames:
                continue
            frames = set(range(chunk0, chunk0 + (c if schedule.current == "dense" else r + 1)))
            frames.update(range(min(schedule.sink_frames, chunk0)))
            if schedule.capacity:
                frames.update(range(schedule.sink_frames, w_start))
            if window.static_offsets is None or (window.has_topk and window.split.mode == "union"):
                frames.update(range(w_start, w_end))
            else:
                for qb in range(r * nb, (r + 1) * nb):
                    frames.update(f for f in (chunk0 + d for d, _, _ in window.static_offsets[qb])
                                  if w_start <= f < w_end)
            graph.add_edges_from((fk, fq) for fk in frames if fk != fq)
    return graph


def reach(schedule: Schedule, horizon_frames: int) -> Reach:
    graph = frame_graph(schedule, horizon_frames)
    last = horizon_frames - 1
    try:
        hops = nx.shortest_path_length(graph, 0, last)
    except nx.NetworkXNoPath:
        hops = None
    return Reach(horizon_frames, hops is not None, hops, graph.has_edge(0, last))
