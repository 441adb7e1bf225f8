"""The float64 reference: docs/design.md §2 implemented literally, for clarity, not speed.

It is the oracle of every test. It reads only the pattern's parameters from the
schedule (sink frames, window, neighborhood, current rule, update rule) and
re-derives every visited block from the definition, so a bug in the lowering
cannot hide behind the same bug here.

Tensors are in the tile-major layout (`VideoLayout.to_tile_major`): the chunk's
q is [B, H, chunk_blocks * BT, D], k and v are [B, H_kv, chunk_blocks * BT, D].
Padded query rows produce O = 0 and LSE = -inf.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from .schedule import Schedule, dtype_bytes

Key = tuple[int, int]  # (batch index, kv head)


@dataclass
class RolloutState:
    """What the reference holds between steps: the cache's K/V and the persistent sets.

    kv[(b, g)][block] = (k, v), each [BT, D] float64, for every block in the cache
    (sink, persistent, window); persistent[(b, g)][block] = score after the last update.
    """

    step: int
    batch: int
    kv: dict[Key, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    persistent: dict[Key, dict[int, float]] = field(default_factory=dict)

    def blocks(self, b: int, g: int) -> list[int]:
        return sorted(self.kv[(b, g)])

    def nbytes(self, dtype: str) -> int:
        """Bytes the cache would take in `dtype` (K and V of every held block, all heads, batch)."""
        return sum((k.numel() + v.numel()) * dtype_bytes(dtype)
                   for blocks in self.kv.values() for k, v in blocks.values())


def new_state(schedule: Schedule, batch: int) -> RolloutState:
    keys = [(b, g) for b in range(batch) for g in range(schedule.num_kv_heads)]
    return RolloutState(step=0, batch=batch, kv={k: {} for k in keys},
                        persistent={k: {} for k in keys})


# --- helpers ------------------------------------------------------------------------
def block_valid(schedule: Schedule, block: int) -> int:
    _, i, j = schedule.layout.block_coords(block)
    return schedule.layout.block_valid_tokens(i, j)


def representative(x: torch.Tensor, valid: int) -> torch.Tensor:
    """Mean of a block's real tokens (x: [BT, D])."""
    return x[:valid].mean(dim=0)


def _chunk_blocks(x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """[..., chunk_blocks * BT, D] -> [..., chunk_blocks, BT, D]."""
    bt = schedule.layout.block_tokens
    return x.reshape(*x.shape[:-2], x.shape[-2] // bt, bt, x.shape[-1])


def _check_inputs(schedule: Schedule, state: RolloutState, q, k, v) -> None:
    lay = schedule.layout
    n = lay.chunk_blocks * lay.block_tokens
    for name, x, heads in (("q", q, schedule.num_heads), ("k", k, schedule.num_kv_heads),
                           ("v", v, schedule.num_kv_heads)):
        want = (state.batch, heads, n, schedule.head_dim)
        if tuple(x.shape) != want:
            raise ValueError(f"{name}.shape = {tuple(x.shape)}, expected {want} "
                             "(batch, heads, chunk tokens in tile-major layout, head_dim)")


def _window(schedule: Schedule, step: int) -> tuple[int, int]:
    c, S, W = schedule.chunk_frames, schedule.sink_frames, schedule.window.frames
    end = step * c
    start = S if W is None else max(S, end - W)
    return min(start, end), end


# --- which key blocks a query block may attend (the definition) -----------------------
def allowed_blocks(schedule: Schedule, state: RolloutState, q: torch.Tensor) -> torch.Tensor:
    """Bool [B, H, chunk_blocks, (step+1) * chunk_blocks]: the block mask of this step."""
    lay, step = schedule.layout, state.step
    c = lay.chunk_frames
    n_keys = (step + 1) * lay.chunk_blocks
    q_blocks = _chunk_blocks(q.detach().double(), schedule)  # picks are not differentiated
    B, H = q.shape[0], q.shape[1]
    group = schedule.num_heads // schedule.num_kv_heads
    mask = torch.zeros(B, H, lay.chunk_blocks, n_keys, dtype=torch.bool)
    w_start, w_end = _window(schedule, step)
    sink_end = min(schedule.sink_frames, step * c)
    split = schedule.window.split
    chunk0 = step * c
    for b in range(B):
        for h in range(H):
            g = h // group
            for qb in range(lay.chunk_blocks):
                fq, iq, jq = lay.block_coords(qb)
                fq += chunk0
                candidates = []
                for kb in range(n_keys):
                    fk, ik, jk = lay.block_coords(kb)
                    if fk >= chunk0:  # the current chunk
                        allowed = schedule.current == "dense" or fk <= fq
                    elif fk < sink_end:
                        allowed = True
                    elif kb in state.persistent[(b, g)]:
                        allowed = True
                    elif w_start <= fk < w_end:
                        inside = split.static is not None and split.static.contains(
                            (fq, iq, jq), (fk, ik, jk))
                        if split.topk is None:
                            allowed = inside
                        else:
                            if (split.mode == "union") != inside:
                                candidates.append(kb)
                            allowed = inside and split.mode == "union"
                    else:
                        allowed = False
                    mask[b, h, qb, kb] = allowed
                for kb in _topk(schedule, state, q_blocks[b, h, qb], g, b, qb, candidates):
                    mask[b, h, qb, kb] = True
    return mask


def _topk(schedule, state, q_block, g, b, qb, candidates) -> list[int]:
    split = schedule.window.split
    if split.topk is None or not candidates:
        return []
    w_start, w_end = _window(schedule, state.step)
    k = split.topk.count((w_end - w_start) * schedule.layout.blocks_per_frame)
    q_rep = representative(q_block, block_valid(schedule, qb))
    scored = []
    for kb in candidates:
        k_block = state.kv[(b, g)][kb][0]
        scored.append((-float(q_rep @ representative(k_block, block_valid(schedule, kb))), kb))
    scored.sort()  # highest score first, ties to the lower block index
    return [kb for _, kb in scored[:k]]


# --- attention --------------------------------------------------------------------------
def token_mask(schedule: Schedule, block_mask: torch.Tensor) -> torch.Tensor:
    """Expand a block mask to tokens, removing padding keys: [B, H, Lq, Lk]."""
    lay = schedule.layout
    bt = lay.block_tokens
    n_keys = block_mask.shape[-1]
    key_valid = torch.tensor([t < block_valid(schedule, kb) for kb in range(n_keys)
                              for t in range(bt)])
    mask = block_mask.repeat_interleave(bt, dim=-2).repeat_interleave(bt, dim=-1)
    return mask & key_valid


def gather_keys(schedule: Schedule, state: RolloutState, k: torch.Tensor, v: torch.Tensor):
    """Global K/V [B, H_kv, (step+1)*chunk_blocks*BT, D] float64, zeros where the cache holds nothing."""
    lay = schedule.layout
    bt = lay.block_tokens
    n_keys = (state.step + 1) * lay.chunk_blocks
    B, Hkv, _, D = k.shape
    K = torch.zeros(B, Hkv, n_keys * bt, D, dtype=torch.float64)
    V = torch.zeros_like(K)
    held = torch.zeros(B, Hkv, n_keys, dtype=torch.bool)
    for (b, g), blocks in state.kv.items():
        for kb, (kk, vv) in blocks.items():
            K[b, g, kb * bt:(kb + 1) * bt] = kk
            V[b, g, kb * bt:(kb + 1) * bt] = vv
            held[b, g, kb] = True
    first = state.step * lay.chunk_blocks * bt
    K[:, :, first:] = k.double()
    V[:, :, first:] = v.double()
    held[:, :, state.step * lay.chunk_blocks:] = True
    # Padding slots are never attended: zero them so that whatever they hold (even NaN)
    # cannot reach the output through 0 * NaN.
    key_valid = lay.valid_token_mask(n_keys // lay.blocks_per_frame)[None, None, :, None]
    K = torch.where(key_valid, K, torch.zeros((), dtype=K.dtype))
    V = torch.where(key_valid, V, torch.zeros((), dtype=V.dtype))
    return K, V, held


def attention(schedule: Schedule, state: RolloutState, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, scale: float | None = None):
    """Reference attention of one AR step. Returns (out [B,H,Lq,D] float64, lse [B,H,Lq], block_mask)."""
    _check_inputs(schedule, state, q, k, v)
    block_mask = allowed_blocks(schedule, state, q)
    out, lse = masked_attention(schedule, state, q, k, v, block_mask, scale)
    return out, lse, block_mask


def masked_attention(schedule: Schedule, state: RolloutState, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, block_mask: torch.Tensor, scale: float | None = None):
    """Float64 attention of one step on a given block mask [B, H, chunk_blocks, n_keys].

    Used on its own to check a backend whose Top-K picks differ from the reference's only
    by near-ties: its attention must still be exact on the blocks it chose.
    """
    lay = schedule.layout
    group = schedule.num_heads // schedule.num_kv_heads
    K, V, held = gather_keys(schedule, state, k, v)
    held_q = held.repeat_interleave(group, dim=1)[:, :, None, :]
    if bool((block_mask & ~held_q).any()):
        raise RuntimeError("reference: a visited block is not in the cache (state is inconsistent)")
    mask = token_mask(schedule, block_mask)
    q_valid = lay.valid_token_mask(lay.chunk_frames)
    scale = 1.0 / math.sqrt(schedule.head_dim) if scale is None else scale
    K = K.repeat_interleave(group, dim=1)
    V = V.repeat_interleave(group, dim=1)
    scores = (q.double() @ K.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = probs @ V
    out = torch.where(q_valid[None, None, :, None], out, torch.zeros((), dtype=out.dtype))
    lse = torch.where(q_valid[None, None, :], lse, torch.full((), float("-inf"), dtype=lse.dtype))
    return out, lse


# --- the update rule --------------------------------------------------------------------
def importance(schedule: Schedule, state: RolloutState, q: torch.Tensor, b: int, g: int,
               domain: list[int]) -> dict[int, float]:
    """Block-level softmax mass each domain block receives from the chunk's query representatives,
    summed over query blocks, averaged over the query heads that share this set."""
    lay = schedule.layout
    q_blocks = _chunk_blocks(q.double(), schedule)
    group = schedule.num_heads // schedule.num_kv_heads
    shared = schedule.update.shared_heads
    heads = range(schedule.num_heads) if shared else range(g * group, (g + 1) * group)
    totals = {kb: 0.0 for kb in domain}
    if not domain:
        return totals
    for h in heads:
        gk = h // group
        k_reps = torch.stack([representative(state.kv[(b, gk)][kb][0], block_valid(schedule, kb))
                              for kb in domain])
        for qb in range(lay.chunk_blocks):
            q_rep = representative(q_blocks[b, h, qb], block_valid(schedule, qb))
            probs = torch.softmax(k_reps @ q_rep / math.sqrt(schedule.head_dim), dim=0)
            for kb, p in zip(domain, probs.tolist()):
                totals[kb] += p
    return {kb: s / len(heads) for kb, s in totals.items()}


def commit(schedule: Schedule, state: RolloutState, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor) -> RolloutState:
    """The clean pass of chunk `state.step`: write its K/V, advance the window, update P.

    Returns a new state; the input state is not modified.
    """
    _check_inputs(schedule, state, q, k, v)
    lay = schedule.layout
    bt, c, nb = lay.block_tokens, lay.chunk_frames, lay.blocks_per_frame
    step = state.step
    new = RolloutState(step=step + 1, batch=state.batch,
                       kv={key: dict(blocks) for key, blocks in state.kv.items()},
                       persistent=copy.deepcopy(state.persistent))
    w_start, w_end = _window(schedule, step)
    window_blocks = list(range(w_start * nb, w_end * nb))
    # E_t: frames past the sink that were in the window (or the chunk) and are not in the next one.
    W, S = schedule.window.frames, schedule.sink_frames
    if W is None:
        evicted = []
    else:
        evicted = list(range(max(S, step * c - W) * nb, max(S, (step + 1) * c - W) * nb))
    for b in range(state.batch):
        per_head_scores = {}
        if schedule.update is not None:
            # A shared set is the same on every KV head and `importance` then averages over all
            # query heads, so one head's scores stand for all of them.
            heads = [0] if schedule.update.shared_heads else range(schedule.num_kv_heads)
            for g in heads:
                domain = sorted(state.persistent[(b, g)]) + window_blocks
                per_head_scores[g] = _scores(schedule, state, q, b, g, domain, evicted, step)
            if schedule.update.shared_heads:
                per_head_scores = {g: per_head_scores[0] for g in range(schedule.num_kv_heads)}
        for g in range(schedule.num_kv_heads):
            blocks = new.kv[(b, g)]
            kb0 = step * lay.chunk_blocks
            for i in range(lay.chunk_blocks):
                blocks[kb0 + i] = (k[b, g, i * bt:(i + 1) * bt].double().clone(),
                                   v[b, g, i * bt:(i + 1) * bt].double().clone())
            keep = {}
            if schedule.update is not None:
                ranked = sorted(per_head_scores[g].items(), key=rank_key)
                keep = dict(ranked[:schedule.update.capacity])
            for kb in list(state.persistent[(b, g)]) + evicted:
                if kb not in keep:
                    blocks.pop(kb, None)
            new.persistent[(b, g)] = keep
    return new


def rank_key(item) -> tuple:
    """Sort key of a (block, score) candidate, best first: higher score first, ties to the
    lower block index; a NaN score ranks last (below every number, -inf included), NaNs
    among themselves by block index; -0.0 ties with +0.0."""
    block, score = item
    nan = score != score
    return (nan, 0.0 if nan else -score, block)


def _scores(schedule, state, q, b, g, domain, evicted, step) -> dict[int, float]:
    """Score every candidate (P_t ∪ E_t) of one KV head with the pattern's expression."""
    imp = importance(schedule, state, q, b, g, domain)
    c = schedule.chunk_frames
    scores = {}
    for kb in sorted(state.persistent[(b, g)]) + evicted:
        frame = schedule.layout.block_coords(kb)[0]
        prev = state.persistent[(b, g)].get(kb, 0.0)
        age = (step + 1) * c - 1 - frame
        scores[kb] = float(schedule.update.rule.evaluate(imp[kb], prev, age))
    return scores


def rollout(schedule: Schedule, chunks, batch: int):
    """Run steps over a list of (q, k, v) chunks; yields (step, out, lse, block_mask, state_after)."""
    state = new_state(schedule, batch)
    for q, k, v in chunks:
        out, lse, block_mask = attention(schedule, state, q, k, v)
        state = commit(schedule, state, q, k, v)
        yield state.step - 1, out, lse, block_mask, state
