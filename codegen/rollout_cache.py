"""Persistent memory at run time: the rollout cache (pool + block tables + update).

    program = sparsedsl.compile(pattern, num_heads=12, head_dim=128, backend="triton")
    cache = program.new_cache(batch=1, num_layers=30, device="cuda", dtype=torch.bfloat16)
    for t, chunk in enumerate(chunks):                      # one AR step per chunk
        for noise_level in denoising_steps:                 # the cache is read, not changed
            ... out, lse = program.attention(q, k, v, cache.tables(layer)) ...
        # the clean pass, layer by layer: attend, then commit (k after RoPE)
        ... out, lse = program.attention(q, k, v, cache.tables(layer))
        ... cache.commit(layer, q, k, v)
        # after the last layer's commit the cache is at step t + 1 (it advances by itself)

What one layer holds (per batch element b and KV head g; BlockTables layout, codegen/tables.py)
    k_pool, v_pool   [B, HKV, NSLOTS, BT, D]  K/V blocks in the kernel's block size
    k_rep            [B, HKV, NSLOTS, D] f32  mean of each block's real keys (select, update)
    slot_valid       [B, HKV, NSLOTS] i32     real tokens of the block in the slot (0: free)
    slot_block       [B, HKV, NSLOTS] i32     global block id held (-1: free); origin frame =
                                              block // blocks_per_frame, tile = the rest
    slot_score       [B, HKV, NSLOTS] f32     score after the last update (persistent blocks)
    free_list        [B, HKV, NSLOTS] i32     a stack of free slots: free_list[..., :n_free]
    sink_slots       [B, HKV, max(S*nb, 1)]   slots of the sink blocks, block order
    persistent_slots [B, HKV, max(C, 1)]      slots of P_t, ascending block index
    persistent_count [B, HKV]                 |P_t| (the same for every (b, g))
    window_slots     [B, HKV, NWMAX]          slot of window position p (= ascending block)
The age of a block is derived from its frame: (t+1)*c - 1 - frame.

Size: NSLOTS = the schedule's sympy formula `shapes.kv_blocks` (sink + window + persistent
blocks held per KV head after T frames) at the peak horizon:
    bounded window: T -> infinity, i.e. S*nb + W*nb + C (its steady state), or
                    kv_blocks(T_max) when `max_frames` is given and smaller;
    unbounded window (no persistent memory then): kv_blocks(T_max) with T_max = max_frames
                    rounded up to whole chunks (a commit past it raises ValueError), or,
                    without max_frames, a growth policy: start at 4 chunks' worth and
                    double the pool (one copy) whenever a commit needs more.
The chunk being generated is *not* in the pool: the kernels read it from the k/v
arguments, and the commit frees the losers before it writes the chunk, so the pool never
holds more than kv_blocks((t+1)*c) blocks. Hence
    cache.nbytes() = num_layers * batch * HKV * NSLOTS * 2 * BT * D * itemsize
                   = num_layers * batch * shapes.kv_bytes(T_peak) * (BT*D*itemsize) /
                     (bt*d*bytes(schedule.dtype))          (BT, D: the kernel's padded sizes)
(peak KV bytes of a bounded pattern: num_layers * batch * kv_bytes(T) for T large enough
when the block and head sizes need no padding and the cache has the schedule's dtype).

The commit of chunk t in one layer (DESIGN.md §3, reference.commit), on the device, with
no host synchronisation (every count is a host integer known from the schedule):
  1. importance: the clean pass's q representatives (select.block_representatives) against
     the cached key representatives of P_t ∪ window_t (select.block_importance: softmax of
     <q_rep, k_rep>/sqrt(D) over the domain, summed over query blocks), averaged over the
     query heads of the KV head, or over all heads when the set is shared;
  2. the generated update step (codegen/update_rule.py): score P_t ∪ E_t with the pattern's
     sympy expression, Top-C (ties to the lower block index), persistent table rewritten;
     winners keep their slots (no K/V copy), losers go back to the free list; without
     persistent memory the blocks leaving the window are freed;
  3. the chunk's blocks that stay (window, or sink) are written into free slots (K, V and
     key representatives), and the sink / window tables advance (window_slots shifted so
     that position p stays block w_start*nb + p).
Backend "triton": three launches per layer (`_TritonCommit`: fused importance, the
generated update kernel, which also shifts the window table, and `_write_chunk_kernel`),
with every per-step integer a runtime argument that Triton does not specialise on, so a
steady-state commit compiles nothing and its host cost is three lean launches. Backend
"torch": the same steps as torch ops (`RolloutCache._commit`, the tests' second opinion).
Step protocol: every layer commits once per step; the cache advances (`cache.step`) when
the last layer has committed. A layer that has committed step t refuses `tables()` and a
second `commit` until the others have (ValueError). Tables are live views of the cache:
valid until that layer's next commit.

Errors are ValueError raised before any change: a chunk of the wrong shape, dtype or
device, a commit twice for one layer and step, a state dict or tables of another pattern,
a commit past `max_frames`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sparsedsl.schedule import Schedule

from . import select as select_ops
from .tables import BlockTables
from .update_rule import launch_update_kernel, load_update_rule, update_step

try:  # the torch path works without triton
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing
    triton = None
    tl = None

FORMAT_VERSION = 1
#: Test switch: fill freed pool slots with NaN, so that a table still pointing at a freed
#: slot poisons the attention output.
POISON_FREED = False
#: Unbounded windows without max_frames: the first pool holds this many chunks.
GROWTH_START_CHUNKS = 4

_TENSORS = ("k_pool", "v_pool", "k_rep", "slot_valid", "slot_block", "slot_score", "free_list",
            "sink_slots", "persistent_slots", "persistent_count", "window_slots")
_INTS = ("step", "n_free", "n_persistent")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CacheTables(BlockTables):
    """BlockTables of one layer of a RolloutCache, tagged with the schedule they belong to."""

    schedule_key: str = ""
    layer: int = 0


def check_tables(program, tables: BlockTables) -> None:
    """ValueError if `tables` come from a cache of another pattern than `program`'s."""
    key = getattr(tables, "schedule_key", None)
    if key is not None and key != program.schedule.key:
        raise ValueError(f"these tables belong to a cache of schedule {key}, not to "
                         f"{program!r} (schedule {program.schedule.key}); make the cache with "
                         "this program's new_cache()")


# ==================================================================================
# sizes and the per-step plan (host integers, pure functions of the schedule)
# ==================================================================================
@lru_cache(maxsize=256)
def _kv_blocks_fn(schedule: Schedule):
    import sympy
    from sparsedsl.shapes import T
    return sympy.lambdify(T, schedule.shapes.kv_blocks, modules="math")


def _kv_blocks(schedule: Schedule, frames: int) -> int:
    """shapes.kv_blocks(T = frames): blocks held per KV head after `frames` committed frames
    (the sympy formula, lambdified once per schedule)."""
    return int(round(_kv_blocks_fn(schedule)(frames)))


def _round_frames(schedule: Schedule, frames: int) -> int:
    c = schedule.chunk_frames
    return -(-frames // c) * c


def steady_frames(schedule: Schedule) -> Optional[int]:
    """Frames after which a bounded pattern holds its peak (None: unbounded window)."""
    if schedule.window.frames is None:
        return None
    nb = schedule.blocks_per_frame
    return _round_frames(schedule, schedule.sink_frames + schedule.window.frames
                         + -(-schedule.capacity // nb) + schedule.chunk_frames)


def peak_blocks(schedule: Schedule, max_frames: Optional[int] = None) -> int:
    """Blocks held per KV head at the peak of a rollout: shapes.kv_blocks(T_peak).

    T_peak = min(max_frames rounded up to whole chunks, steady state); an unbounded window
    needs max_frames (or the cache's growth policy)."""
    steady = steady_frames(schedule)
    if max_frames is None:
        if steady is None:
            raise ValueError("an unbounded window has no peak: give max_frames")
        return _kv_blocks(schedule, steady)
    frames = _round_frames(schedule, max_frames)
    if steady is not None:
        frames = min(frames, steady)
    return _kv_blocks(schedule, frames)


def expected_nbytes(program, batch: int, num_layers: int, dtype: torch.dtype,
                    max_frames: Optional[int] = None) -> int:
    """K/V pool bytes of `program.new_cache(...)`, from the sympy formula."""
    s = program.schedule
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (num_layers * batch * s.num_kv_heads * peak_blocks(s, max_frames) * 2
            * program.kernel_block_tokens * program.kernel_head_dim * itemsize)


@dataclass(frozen=True)
class StepPlan:
    """What the commit of chunk `step` does to one layer's tables (block counts)."""

    step: int
    n_sink_old: int          # sink blocks before / after
    n_sink_new: int
    nw: int                  # window blocks before / after
    nw_new: int
    n_drop: int              # window positions [0, n_drop) leave the window (E_t when updating)
    chunk_sink: int          # chunk blocks [0, chunk_sink) become sink blocks
    chunk_keep_start: int    # chunk blocks [chunk_keep_start, chunk_blocks) enter the window
    age0: int                # (t+1)*c - 1
    chunk_blocks: int        # c * nb

    @property
    def chunk_kept(self) -> tuple[int, ...]:
        """Chunk blocks written to the pool: the new sink blocks, then the window's."""
        return tuple(range(self.chunk_sink)) + tuple(range(self.chunk_keep_start,
                                                           self.chunk_blocks))


@lru_cache(maxsize=4096)
def step_plan(schedule: Schedule, step: int) -> StepPlan:
    c, nb, S = schedule.chunk_frames, schedule.blocks_per_frame, schedule.sink_frames
    t0, t1 = step * c, (step + 1) * c
    ws, we = schedule.window_frames_range(step)
    ws1, we1 = schedule.window_frames_range(step + 1)
    n_drop = max(0, min(we, ws1) - ws) * nb
    chunk_sink = max(0, min(S, t1) - t0) * nb
    keep_start = (max(ws1, t0) - t0) * nb
    plan = StepPlan(step=step, n_sink_old=min(S, t0) * nb, n_sink_new=min(S, t1) * nb,
                    nw=(we - ws) * nb, nw_new=(we1 - ws1) * nb, n_drop=n_drop,
                    chunk_sink=chunk_sink, chunk_keep_start=keep_start, age0=t1 - 1,
                    chunk_blocks=c * nb)
    # consistency with the schedule's own definitions (cheap, host-only)
    assert plan.nw_new == plan.nw - n_drop + c * nb - keep_start, plan
    assert plan.n_sink_new - plan.n_sink_old == chunk_sink, plan
    if schedule.update is not None:
        e0, e1 = schedule.evicted_frames(step)
        assert (e1 - e0) * nb == n_drop and (n_drop == 0 or e0 == ws), (plan, e0, e1)
    return plan


# ==================================================================================
# one layer's state
# ==================================================================================
class _Layer:
    """Tensors and host counters of one layer (see the module docstring)."""

    def __init__(self, B, HKV, nslots, bt, d, sink_w, cmax, nwmax, dtype, device):
        i32 = dict(dtype=torch.int32, device=device)
        self.k_pool = torch.zeros(B, HKV, nslots, bt, d, dtype=dtype, device=device)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.k_rep = torch.zeros(B, HKV, nslots, d, dtype=torch.float32, device=device)
        self.slot_valid = torch.zeros(B, HKV, nslots, **i32)
        self.slot_block = torch.full((B, HKV, nslots), -1, **i32)
        self.slot_score = torch.zeros(B, HKV, nslots, dtype=torch.float32, device=device)
        # top of the stack = slot 0 first: pops take free_list[..., n_free - m : n_free]
        self.free_list = torch.arange(nslots - 1, -1, -1, **i32).expand(B, HKV, nslots).contiguous()
        self.sink_slots = torch.zeros(B, HKV, sink_w, **i32)
        self.persistent_slots = torch.zeros(B, HKV, cmax, **i32)
        self.persistent_count = torch.zeros(B, HKV, **i32)
        self.window_slots = torch.zeros(B, HKV, nwmax, **i32)
        self.step = 0
        self.n_free = nslots
        self.n_persistent = 0

    @property
    def nslots(self) -> int:
        return self.k_pool.shape[2]


@dataclass(frozen=True)
class MemorySnapshot:
    """What one layer holds after `frames` committed frames (the memory chunk `step` sees).

    persistent[(b, g)] = {block: score}; sink / window are frame ranges [start, end).
    """

    step: int
    frames: int
    blocks_per_frame: int
    sink: tuple[int, int]
    window: tuple[int, int]
    persistent: dict = field(default_factory=dict)

    def frame_counts(self, b: int = 0) -> dict[int, float]:
        """Persistent blocks per frame, averaged over the KV heads of batch element b."""
        keys = [k for k in self.persistent if k[0] == b]
        counts: dict[int, float] = {}
        for key in keys:
            for block in self.persistent[key]:
                f = block // self.blocks_per_frame
                counts[f] = counts.get(f, 0.0) + 1.0 / len(keys)
        return counts


# ==================================================================================
# the commit on the GPU: three launches, nothing recompiled at steady state
# ==================================================================================
class _TritonCommit:
    """The Triton commit of one cache (backend "triton"): per layer and step

      1. `select.CommitImportance`: the chunk's query representatives and the importance
         partial sums over P_t ∪ window_t, read from the persistent and window tables;
      2. the generated update kernel: importance averaged over the heads, scores, Top-C,
         tables rewritten, losers freed, the window table shifted by the evicted blocks;
      3. `_write_chunk_kernel`: the kept chunk blocks into the slots on top of the free
         list (K, V, key representatives, slot_block, slot_valid) and into the sink /
         window tables.
    Everything that does not change from step to step (tiles, scratch, views, the valid
    counts on the device) is made here once; what changes (counts, AGE0, free-list top,
    the chunk's first block) is passed as runtime integers that Triton does not
    specialise on, so a steady-state commit compiles nothing. No host synchronisation.
    """

    def __init__(self, cache: "RolloutCache"):
        s = cache.schedule
        B, H, HKV = cache.batch, s.num_heads, s.num_kv_heads
        dev = cache.device
        self.cache = cache
        self.group = H // HKV
        self.cur_valid = cache._cur_valid
        self.write = _ChunkWriter(cache.bt, cache.d)
        self.importance = None
        if s.update is not None:
            ndom = cache._dom.shape[2]
            imp = self.importance = select_ops.CommitImportance(cache.nqb, s.layout.block_tokens,
                                                                 s.head_dim, ndom)
            self.q_rep = torch.zeros(B, H, cache.nqb, s.head_dim, dtype=torch.float32, device=dev)
            self.part = torch.zeros(B, H, imp.n_tiles, ndom, dtype=torch.float32, device=dev)
            # the update kernel sums the rows of one set: its query heads x tiles, or all
            # heads when the set is shared (a stride-0 view over the KV heads)
            if s.update.shared_heads:
                self.imp_rows = self.part.view(B, 1, H * imp.n_tiles, ndom).expand(
                    B, HKV, H * imp.n_tiles, ndom)
                self.imp_scale = 1.0 / H
            else:
                self.imp_rows = self.part.view(B, HKV, self.group * imp.n_tiles, ndom)
                self.imp_scale = 1.0 / self.group

    def commit(self, L: _Layer, plan: StepPlan, q, k, v) -> None:
        cache, s = self.cache, self.cache.schedule
        n_free0 = L.n_free
        freed = 0
        kept_old = plan.nw - plan.n_drop
        if s.update is not None:
            np_, nc = L.n_persistent, L.n_persistent + plan.n_drop
            if nc:
                self.importance.launch(q, self.cur_valid, self.q_rep, L.k_rep, L.persistent_slots,
                                       np_, L.window_slots, np_ + plan.nw, self.part,
                                       cache.program.scale, self.group)
                shift = (L.window_slots, plan.n_drop, kept_old if plan.n_drop else 0)
                launch_update_kernel(cache.rule, self.imp_rows, self.imp_scale, L.persistent_slots,
                                     L.window_slots, np_, nc, s.capacity, cache.nb, plan.age0,
                                     L.slot_block, L.slot_score, L.slot_valid,
                                     L.persistent_slots, L.persistent_count, L.free_list,
                                     n_free0, cache._scores, cache._block_n, shift)
                L.n_persistent = min(nc, s.capacity)
                freed = nc - L.n_persistent
        elif plan.n_drop:
            _free_dropped_window(L, plan, n_free0)
            if kept_old:
                L.window_slots[..., :kept_old] = L.window_slots[..., plan.n_drop:plan.nw].clone()
            freed = plan.n_drop
        if POISON_FREED and freed:
            cache._poison(L, n_free0, freed)
        L.n_free += freed
        m = plan.chunk_sink + plan.chunk_blocks - plan.chunk_keep_start
        if m:
            self.write.launch(L, plan, k, v, self.cur_valid, L.n_free, m, kept_old,
                              s.chunk_start_frame(plan.step) * cache.nb)
            L.n_free -= m


def _free_dropped_window(L: _Layer, plan: StepPlan, n_free0: int) -> None:
    """No persistent memory: the blocks leaving the window go back to the free list."""
    dropped = L.window_slots[..., :plan.n_drop].long()
    L.free_list[..., n_free0:n_free0 + plan.n_drop] = L.window_slots[..., :plan.n_drop]
    L.slot_block.scatter_(2, dropped, -1)
    L.slot_valid.scatter_(2, dropped, 0)
    L.slot_score.scatter_(2, dropped, 0.0)


class _ChunkWriter:
    """Launches `_write_chunk_kernel` for pools of BT x D blocks (tiles fixed per cache)."""

    def __init__(self, pool_tokens: int, pool_dim: int):
        self.bt_pool, self.d_pool = pool_tokens, pool_dim
        self.block_d = min(triton.next_power_of_2(pool_dim), 128)
        self.block_t = max(1, min(triton.next_power_of_2(pool_tokens), 4096 // self.block_d))
        self.warps = 8 if self.block_t * self.block_d >= 4096 else 4

    def launch(self, L: _Layer, plan: StepPlan, k, v, valid, top: int, m: int, win_at: int,
               first: int) -> None:
        """The m kept blocks (chunk blocks [0, chunk_sink) then [keep_start, ...)) into the
        slots free_list[..., top - m:top]; sink / window table entries from n_sink_old /
        win_at on; global block id = first + chunk block."""
        B, HKV, _, d = k.shape
        bt = k.shape[2] // plan.chunk_blocks
        _write_chunk_kernel[(m, HKV, B)](
            k, v, valid, L.free_list, L.k_pool, L.v_pool, L.k_rep, L.slot_block, L.slot_valid,
            L.sink_slots, L.window_slots,
            top - m, plan.chunk_sink, plan.chunk_keep_start, first, plan.n_sink_old, win_at,
            bt, d,
            *k.stride(), *v.stride(), valid.stride(0), *L.free_list.stride(), *L.k_pool.stride(),
            *L.k_rep.stride(), *L.slot_block.stride(), *L.sink_slots.stride(),
            *L.window_slots.stride(),
            BT=self.bt_pool, D=self.d_pool, BLOCK_T=self.block_t, BLOCK_D=self.block_d,
            num_warps=self.warps)


if triton is not None:

    # every integer changes with the step or the plan: none is specialised (no recompiles)
    @triton.jit(do_not_specialize=("POP_AT", "CHUNK_SINK", "KEEP_START", "FIRST", "SINK_AT",
                                   "WIN_AT", "bt", "d"))
    def _write_chunk_kernel(
        k_ptr, v_ptr, valid_ptr, fl_ptr, kp_ptr, vp_ptr, kr_ptr, sb_ptr, sv_ptr, sink_ptr, win_ptr,
        POP_AT, CHUNK_SINK, KEEP_START, FIRST, SINK_AT, WIN_AT, bt, d,
        sk_b, sk_h, sk_r, sk_d,
        sv_b, sv_h, sv_r, sv_d,
        sval,
        sf_b, sf_h, sf_n,
        sp_b, sp_h, sp_s, sp_t, sp_d,
        sr_b, sr_h, sr_s, sr_d,
        st_b, st_h, st_s,
        ssk_b, ssk_h, ssk_n,
        sw_b, sw_h, sw_n,
        BT: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program = kept block j of (b, g): chunk block c = j for the new sink blocks,
        # KEEP_START + (j - CHUNK_SINK) for the window's. Copies its bt x d tokens into the
        # BT x D pool slot popped from the free list (zero padding), its key representative
        # (mean of the first `valid` tokens, fp32, the representatives kernel's order), the
        # slot's block id and valid count, and its sink or window table entry.
        j = tl.program_id(0)
        g = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        c = tl.where(j < CHUNK_SINK, j, KEEP_START + j - CHUNK_SINK)
        slot = tl.load(fl_ptr + b * sf_b + g * sf_h + (POP_AT + j) * sf_n)
        nv = tl.load(valid_ptr + c * sval)
        nv = tl.minimum(tl.maximum(nv, 0), bt)
        row0 = c.to(tl.int64) * bt
        k_base = k_ptr + b * sk_b + g * sk_h + row0 * sk_r
        v_base = v_ptr + b * sv_b + g * sv_h + row0 * sv_r
        pool_off = b * sp_b + g * sp_h + slot.to(tl.int64) * sp_s
        rep_base = kr_ptr + b * sr_b + g * sr_h + slot.to(tl.int64) * sr_s
        denom = tl.maximum(nv, 1).to(tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for t0 in tl.static_range(0, BT, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                src = (t < bt)[:, None] & (dd < d)[None, :]
                dst = (t < BT)[:, None] & (dd < D)[None, :]
                xk = tl.load(k_base + t[:, None] * sk_r + dd[None, :] * sk_d, mask=src, other=0.0)
                xv = tl.load(v_base + t[:, None] * sv_r + dd[None, :] * sv_d, mask=src, other=0.0)
                at = pool_off + t[:, None] * sp_t + dd[None, :] * sp_d
                tl.store(kp_ptr + at, xk, mask=dst)
                tl.store(vp_ptr + at, xv, mask=dst)
                acc += tl.where((t < nv)[:, None], xk.to(tl.float32), 0.0)
            tl.store(rep_base + dd * sr_d, tl.sum(acc, axis=0) / denom, mask=dd < D)
        tl.store(sb_ptr + b * st_b + g * st_h + slot * st_s, FIRST + c)
        tl.store(sv_ptr + b * st_b + g * st_h + slot * st_s, nv)
        if j < CHUNK_SINK:
            tl.store(sink_ptr + b * ssk_b + g * ssk_h + (SINK_AT + j) * ssk_n, slot)
        else:
            tl.store(win_ptr + b * sw_b + g * sw_h + (WIN_AT + j - CHUNK_SINK) * sw_n, slot)


# ==================================================================================
# the cache
# ==================================================================================
class RolloutCache:
    """Per-layer block pools and tables of one rollout; see the module docstring."""

    def __init__(self, program, batch: int = 1, num_layers: int = 1, device="cpu", dtype=None,
                 max_frames: Optional[int] = None):
        for name, value, lo in (("batch", batch, 1), ("num_layers", num_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} = {value!r}: expected an integer >= {lo}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames = {max_frames!r}: expected None or an integer >= 1 "
                             "(latent frames the rollout will generate)")
        s = program.schedule
        self.program, self.schedule = program, s
        self.batch, self.num_layers, self.max_frames = batch, num_layers, max_frames
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = self._resolve_dtype(dtype)
        lay = s.layout
        self.nb, self.c, self.nqb = lay.blocks_per_frame, lay.chunk_frames, lay.chunk_blocks
        self.bt, self.d = program.kernel_block_tokens, program.kernel_head_dim
        self.growable = s.window.frames is None and max_frames is None
        if self.growable:
            nslots = _kv_blocks(s, GROWTH_START_CHUNKS * self.c)
        else:
            nslots = peak_blocks(s, max_frames)
        nslots = max(nslots, 1)
        self._sink_w = max(s.sink_frames * self.nb, 1)
        self._cmax = max(s.capacity, 1)
        self._fixed_nwmax = None if s.window.frames is None else max(s.window.frames * self.nb, 1)
        self.layers = [self._new_layer(nslots) for _ in range(num_layers)]
        self.step = 0
        self._pending = num_layers          # layers that have not committed `step` yet
        self._need_by_step: dict[int, int] = {}
        self.rule = None
        if s.update is not None:
            header = tuple(s.describe().splitlines())
            self.rule = load_update_rule(s.update.rule.score, header)
        backend = program.backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend == "triton":  # fail here, not half-way through a commit
            select_ops._use_triton("RolloutCache", "triton", self.device)
        self.backend = backend
        # scratch, shared by the layers (stream-ordered, used within one commit)
        HKV = s.num_kv_heads
        i32 = dict(dtype=torch.int32, device=self.device)
        # candidates per update: at most C + the blocks of one chunk (|E_t| <= c*nb as W >= c)
        self._ncand_max = (s.capacity + self.nqb) if s.update is not None else 0
        self._dom = torch.zeros(batch, HKV, self._cmax + (self._fixed_nwmax or 1), **i32)
        self._scores = torch.zeros(batch, HKV, max(self._ncand_max, 1), dtype=torch.float32,
                                   device=self.device)
        self._block_n = max(16, 1 << max(0, (max(self._ncand_max, 1) - 1).bit_length()))
        self._bg_base = (torch.arange(batch * HKV, device=self.device, dtype=torch.int64)
                         .view(batch, HKV, 1))
        self._cur_valid = program.cur_valid_host.to(self.device)
        # the whole chunk kept (the usual case): its blocks' valid counts and chunk-relative
        # ids, flattened over (b, g), so that the writes below are single index_copy_ calls
        full = (batch, HKV, self.nqb)
        self._full_valid = self._cur_valid.expand(full).reshape(-1).contiguous()
        self._full_ids = (torch.arange(self.nqb, device=self.device, dtype=torch.int32)
                          .expand(full).reshape(-1).contiguous())
        self._bg_by_nslots: dict[int, torch.Tensor] = {}
        self._kept_by_plan: dict[tuple[int, int], tuple] = {}
        self._fast = _TritonCommit(self) if backend == "triton" else None

    # --- construction helpers ------------------------------------------------------------
    def _resolve_dtype(self, dtype) -> torch.dtype:
        if dtype is None:
            dtype = self.schedule.dtype if self.schedule.dtype in _DTYPES else "float32"
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype = {dtype!r}: the kernels run in {sorted(_DTYPES)}")
            return _DTYPES[dtype]
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype = {dtype}: the kernels run in {sorted(_DTYPES)}")
        return dtype

    def _nwmax(self, nslots: int) -> int:
        return self._fixed_nwmax if self._fixed_nwmax is not None else nslots

    def _new_layer(self, nslots: int) -> _Layer:
        return _Layer(self.batch, self.schedule.num_kv_heads, nslots, self.bt, self.d,
                      self._sink_w, self._cmax, self._nwmax(nslots), self.dtype, self.device)

    # --- sizes ----------------------------------------------------------------------------
    @property
    def nslots(self) -> int:
        """Pool slots per (batch, KV head) of layer 0 (all layers alike unless grown)."""
        return self.layers[0].nslots

    def nbytes(self, include_metadata: bool = False) -> int:
        """Bytes of the K/V pools allocated (with `include_metadata`: + representatives and
        tables)."""
        names = _TENSORS if include_metadata else ("k_pool", "v_pool")
        return sum(getattr(L, n).numel() * getattr(L, n).element_size()
                   for L in self.layers for n in names)

    # --- tables ------------------------------------------------------------------------------
    def _layer(self, layer) -> _Layer:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer = {layer!r}: expected an integer in [0, {self.num_layers})")
        return self.layers[layer]

    def pending_layers(self) -> list[int]:
        """Layers that have not committed the current step yet."""
        return [i for i, L in enumerate(self.layers) if L.step == self.step]

    def tables(self, layer: int) -> CacheTables:
        """The BlockTables of `layer` at the current step (live views, no copy)."""
        L = self._layer(layer)
        if L.step != self.step:
            raise ValueError(f"layer {layer} has already committed chunk {self.step}; its tables "
                             f"now describe step {L.step}. Commit the other layers "
                             f"{self.pending_layers()} to finish step {self.step} first")
        return CacheTables(L.step, L.k_pool, L.v_pool, L.k_rep, L.slot_valid, L.slot_block,
                           L.sink_slots, L.persistent_slots, L.persistent_count, L.window_slots,
                           schedule_key=self.schedule.key, layer=layer)

    def attention(self, layer: int, q, k, v, **kwargs):
        """`program.attention(q, k, v, self.tables(layer))`."""
        return self.program.attention(q, k, v, self.tables(layer), **kwargs)

    # --- commit ------------------------------------------------------------------------------
    def _check_chunk(self, layer: int, q, k, v) -> None:
        s = self.schedule
        L = self._layer(layer)
        if L.step != self.step:
            raise ValueError(f"layer {layer} has already committed chunk {self.step}: a chunk is "
                             f"committed once per layer; the layers {self.pending_layers()} "
                             "still have to commit it")
        n = self.nqb * s.layout.block_tokens
        for name, x, heads in (("q", q, s.num_heads), ("k", k, s.num_kv_heads),
                               ("v", v, s.num_kv_heads)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            want = (self.batch, heads, n, s.head_dim)
            if tuple(x.shape) != want:
                raise ValueError(f"commit: {name}.shape = {tuple(x.shape)}, expected {want} "
                                 "(batch, heads, chunk tokens in tile-major layout, head_dim)")
            if x.dtype != self.dtype:
                raise ValueError(f"commit: {name}.dtype = {x.dtype} but the cache holds {self.dtype}")
            if x.device != self.device:
                raise ValueError(f"commit: {name} is on {x.device} but the cache is on {self.device}")
        if not self.growable:
            need = self._blocks_needed(L.step)
            if need > L.nslots:
                raise ValueError(
                    f"commit: chunk {L.step} would hold {need} blocks per KV head but the pool has "
                    f"{L.nslots} slots (made for max_frames = {self.max_frames}); make the "
                    "cache with a larger max_frames")

    def _blocks_needed(self, step: int) -> int:
        """Blocks per KV head after committing chunk `step` (the sympy formula, memoised)."""
        need = self._need_by_step.get(step)
        if need is None:
            need = self._need_by_step[step] = _kv_blocks(self.schedule, (step + 1) * self.c)
        return need

    def commit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The clean pass of the current chunk in `layer`: write its K/V (k after RoPE) and run
        the memory update; the cache advances after the last layer's commit."""
        self._check_chunk(layer, q, k, v)
        L = self.layers[layer]
        plan = step_plan(self.schedule, L.step)
        if self.growable:
            need = self._blocks_needed(L.step)
            if need > L.nslots:
                self._grow(L, max(2 * L.nslots, need))
        if self._fast is not None:
            self._fast.commit(L, plan, q, k, v)   # Triton kernels: no autograd involved
        else:
            with torch.no_grad():
                self._commit(L, plan, q.detach(), k.detach(), v.detach())
        L.step += 1
        self._pending -= 1
        if self._pending == 0:
            self.step += 1
            self._pending = self.num_layers

    def _bg_offsets(self, nslots: int) -> torch.Tensor:
        """int64 [B, HKV, 1]: (b * HKV + g) * nslots, the flat offset of each pool row."""
        off = self._bg_by_nslots.get(nslots)
        if off is None:
            off = self._bg_by_nslots[nslots] = self._bg_base * nslots
        return off

    def _poison(self, L: _Layer, n_free0: int, freed: int) -> None:
        """Test switch POISON_FREED: NaN into the slots just freed."""
        flat = (self._bg_offsets(L.nslots) + L.free_list[..., n_free0:n_free0 + freed]).reshape(-1)
        L.k_pool.view(-1, self.bt, self.d).index_fill_(0, flat, float("nan"))
        L.v_pool.view(-1, self.bt, self.d).index_fill_(0, flat, float("nan"))
        L.k_rep.view(-1, self.d).index_fill_(0, flat, float("nan"))

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, NQB*bt, d] -> [B, h, NQB, BT, D] (a view when no padding is needed)."""
        lay = self.schedule.layout
        bt, d = lay.block_tokens, x.shape[-1]
        x = x.reshape(x.shape[0], x.shape[1], self.nqb, bt, d)
        if bt == self.bt and d == self.d:
            return x
        return F.pad(x, (0, self.d - d, 0, self.bt - bt))

    def _reps(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """fp32 representatives [B, h, n, D] of [B, h, n, bt, d] blocks (kernel head dim)."""
        rep = select_ops.block_representatives(x, valid, backend=self.backend, check_values=False)
        if rep.shape[-1] != self.d:
            rep = F.pad(rep, (0, self.d - rep.shape[-1]))
        return rep

    def _kept_tensors(self, plan: StepPlan) -> tuple:
        """(index [m] int64, valid [m], valid flat over (b, g), chunk-relative ids flat) of the
        chunk blocks a partial commit keeps; made once per plan shape, not per commit."""
        key = (plan.chunk_sink, plan.chunk_keep_start)
        got = self._kept_by_plan.get(key)
        if got is None:
            B, HKV, m = self.batch, self.schedule.num_kv_heads, len(plan.chunk_kept)
            idx = torch.tensor(plan.chunk_kept, device=self.device, dtype=torch.long)
            valid = self._cur_valid.index_select(0, idx)
            got = self._kept_by_plan[key] = (
                idx, valid, valid.expand(B, HKV, m).reshape(-1).contiguous(),
                idx.to(torch.int32).expand(B, HKV, m).reshape(-1).contiguous())
        return got

    def _commit(self, L: _Layer, plan: StepPlan, q, k, v) -> None:
        """The commit in torch ops (backend "torch"; the Triton path's reference)."""
        s = self.schedule
        lay = s.layout
        B, HKV, H = self.batch, s.num_kv_heads, s.num_heads
        bt, d = lay.block_tokens, s.head_dim
        n_free0 = L.n_free
        freed = 0
        # 1-2. importance over P_t ∪ window_t, score P_t ∪ E_t, Top-C (losers freed)
        if s.update is not None:
            np_, nc = L.n_persistent, L.n_persistent + plan.n_drop
            if nc:
                nd = np_ + plan.nw
                dom = self._dom
                dom[..., :np_] = L.persistent_slots[..., :np_]
                dom[..., np_:nd] = L.window_slots[..., :plan.nw]
                q_rep = self._reps(q.reshape(B, H, self.nqb, bt, d), self._cur_valid)
                imp = select_ops.block_importance(q_rep, L.k_rep, dom, nd, self.program.scale,
                                                  backend=self.backend, check_values=False)
                if s.update.shared_heads:
                    imp = imp.mean(dim=1, keepdim=True).expand(B, HKV, imp.shape[-1])
                else:
                    imp = imp.reshape(B, HKV, H // HKV, imp.shape[-1]).mean(dim=2)
                update_step(self.rule, backend=self.backend, importance=imp, cand_slots=dom,
                            num_persistent=np_, num_candidates=nc, capacity=s.capacity,
                            blocks_per_frame=self.nb, age0=plan.age0, slot_block=L.slot_block,
                            slot_score=L.slot_score, slot_valid=L.slot_valid,
                            persistent_slots=L.persistent_slots,
                            persistent_count=L.persistent_count, free_list=L.free_list,
                            free_at=n_free0, scores=self._scores, block_n=self._block_n)
                L.n_persistent = min(nc, s.capacity)
                freed = nc - L.n_persistent
        elif plan.n_drop:
            _free_dropped_window(L, plan, n_free0)
            freed = plan.n_drop
        if POISON_FREED and freed:
            self._poison(L, n_free0, freed)
        L.n_free += freed

        # 3. the chunk's kept blocks into free slots (stack top), then the tables
        kept = plan.chunk_kept
        m = len(kept)
        if m:
            slots = L.free_list[..., L.n_free - m:L.n_free]                 # [B, HKV, m]
            L.n_free -= m
            flat = (self._bg_offsets(L.nslots) + slots).reshape(-1)          # int64
            kb, vb = self._blocks(k), self._blocks(v)
            k_raw = k.reshape(B, HKV, self.nqb, bt, d)
            first = s.chunk_start_frame(plan.step) * self.nb
            if m != self.nqb:
                idx, valid, valid_flat, ids_flat = self._kept_tensors(plan)
                kb, vb, k_raw = kb.index_select(2, idx), vb.index_select(2, idx), k_raw.index_select(2, idx)
                ids_flat = ids_flat + first
            else:
                valid, valid_flat = self._cur_valid, self._full_valid
                ids_flat = self._full_ids + first
            L.k_pool.view(-1, self.bt, self.d).index_copy_(0, flat, kb.reshape(-1, self.bt, self.d))
            L.v_pool.view(-1, self.bt, self.d).index_copy_(0, flat, vb.reshape(-1, self.bt, self.d))
            L.k_rep.view(-1, self.d).index_copy_(0, flat, self._reps(k_raw, valid).reshape(-1, self.d))
            L.slot_block.view(-1).index_copy_(0, flat, ids_flat)
            L.slot_valid.view(-1).index_copy_(0, flat, valid_flat)
            if plan.chunk_sink:
                L.sink_slots[..., plan.n_sink_old:plan.n_sink_new] = slots[..., :plan.chunk_sink]
            new_win = slots[..., plan.chunk_sink:]
        else:
            new_win = L.window_slots[..., :0]
        kept_old = plan.nw - plan.n_drop
        if plan.n_drop and kept_old:
            L.window_slots[..., :plan.nw_new] = torch.cat(
                [L.window_slots[..., plan.n_drop:plan.nw], new_win], dim=-1)
        else:
            L.window_slots[..., kept_old:plan.nw_new] = new_win

    def _grow(self, L: _Layer, nslots: int) -> None:
        """Unbounded windows: a bigger pool (same slot ids), the new slots at the stack bottom."""
        old = L.nslots
        new = self._new_layer(nslots)
        for name in ("k_pool", "v_pool", "k_rep", "slot_valid", "slot_block", "slot_score"):
            getattr(new, name)[:, :, :old] = getattr(L, name)
        added = nslots - old
        new.free_list[..., :added] = torch.arange(nslots - 1, old - 1, -1, dtype=torch.int32,
                                                  device=self.device)
        new.free_list[..., added:added + L.n_free] = L.free_list[..., :L.n_free]
        new.sink_slots.copy_(L.sink_slots)
        new.persistent_slots.copy_(L.persistent_slots)
        new.persistent_count.copy_(L.persistent_count)
        new.window_slots[..., :L.window_slots.shape[-1]] = L.window_slots
        new.step, new.n_free, new.n_persistent = L.step, L.n_free + added, L.n_persistent
        L.__dict__.update(new.__dict__)

    # --- save / load -----------------------------------------------------------------------------
    def state_dict(self, copy: bool = True) -> dict:
        """Everything needed to resume bit for bit (tensors cloned unless copy=False)."""
        layers = []
        for L in self.layers:
            entry = {n: (getattr(L, n).clone() if copy else getattr(L, n)) for n in _TENSORS}
            entry.update({n: getattr(L, n) for n in _INTS})
            layers.append(entry)
        return {"format": FORMAT_VERSION, "schedule_key": self.schedule.key,
                "pattern": self.schedule.pattern_name, "batch": self.batch,
                "num_layers": self.num_layers, "dtype": str(self.dtype).replace("torch.", ""),
                "max_frames": self.max_frames, "step": self.step, "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; ValueError (cache unchanged) if it does not fit."""
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            raise ValueError("load_state_dict: not a RolloutCache state dict of format "
                             f"{FORMAT_VERSION}")
        s = self.schedule
        if state["schedule_key"] != s.key:
            raise ValueError(f"load_state_dict: the state belongs to pattern "
                             f"'{state.get('pattern')}' (schedule {state['schedule_key']}), this "
                             f"cache to '{s.pattern_name}' (schedule {s.key})")
        for name in ("batch", "num_layers", "max_frames"):
            if state[name] != getattr(self, name):
                raise ValueError(f"load_state_dict: state has {name} = {state[name]}, this cache "
                                 f"{getattr(self, name)}")
        if state["dtype"] != str(self.dtype).replace("torch.", ""):
            raise ValueError(f"load_state_dict: state has dtype {state['dtype']}, this cache "
                             f"{self.dtype}")
        if len(state.get("layers", ())) != self.num_layers:
            raise ValueError(f"load_state_dict: state has {len(state.get('layers', ()))} layers, "
                             f"this cache {self.num_layers}")
        try:
            new_layers = self._layers_from_state(state)
        except KeyError as exc:
            raise ValueError(f"load_state_dict: the state misses {exc}") from None
        steps = {L.step for L in new_layers}
        if not steps <= {state["step"], state["step"] + 1}:
            raise ValueError(f"load_state_dict: layer steps {sorted(steps)} do not fit step "
                             f"{state['step']}")
        self.layers = new_layers
        self.step = int(state["step"])
        self._pending = sum(L.step == self.step for L in new_layers)

    def _layers_from_state(self, state: dict) -> list:
        new_layers = []
        for i, entry in enumerate(state["layers"]):
            nslots = entry["k_pool"].shape[2]
            if not self.growable and nslots != self.layers[i].nslots:
                raise ValueError(f"load_state_dict: layer {i} has {nslots} slots, this cache "
                                 f"{self.layers[i].nslots}")
            layer = self._new_layer(nslots)
            for name in _TENSORS:
                want, got = getattr(layer, name), entry[name]
                if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                    raise ValueError(f"load_state_dict: layer {i} {name} is {tuple(got.shape)} "
                                     f"{got.dtype}, expected {tuple(want.shape)} {want.dtype}")
                want.copy_(got)
            for name in _INTS:
                setattr(layer, name, int(entry[name]))
            new_layers.append(layer)
        return new_layers

    # --- inspection ------------------------------------------------------------------------------
    def persistent_sets(self, layer: int = 0) -> dict:
        """{(b, g): {block: score}} of the persistent set (host copies)."""
        L = self._layer(layer)
        slots = L.persistent_slots.cpu()
        count = L.persistent_count.cpu()
        block = L.slot_block.cpu()
        score = L.slot_score.cpu()
        out = {}
        for b in range(self.batch):
            for g in range(self.schedule.num_kv_heads):
                members = slots[b, g, :int(count[b, g])].tolist()
                out[(b, g)] = {int(block[b, g, sl]): float(score[b, g, sl]) for sl in members}
        return out

    def snapshot(self, layer: int = 0) -> MemorySnapshot:
        """What `layer` holds now (host copy; one device sync)."""
        L = self._layer(layer)
        s = self.schedule
        step = L.step
        return MemorySnapshot(step=step, frames=step * self.c, blocks_per_frame=self.nb,
                              sink=(0, min(s.sink_frames, step * self.c)),
                              window=s.window_frames_range(step),
                              persistent=self.persistent_sets(layer))

    def describe(self, layer: int = 0, batch: int = 0, max_blocks: int = 12) -> str:
        """Which frames and tiles are in memory and their scores (one layer, one batch element)."""
        s = self.schedule
        snap = self.snapshot(layer)
        lay = s.layout
        lines = [f"RolloutCache of '{s.pattern_name}' (schedule {s.key}): step {self.step} "
                 f"(frames [0, {self.step * self.c}) committed), {self.num_layers} layers, "
                 f"batch {self.batch}, {self.backend} backend",
                 f"  pool: {self.nslots} slots per KV head x {self.bt} tokens x {self.d}, "
                 f"{str(self.dtype).replace('torch.', '')}: {self.nbytes() / 2**20:.2f} MiB K/V "
                 f"({self.nbytes(True) / 2**20:.2f} MiB with representatives and tables)",
                 f"layer {layer}, batch element {batch}, at step {snap.step}:"]
        s0, s1 = snap.sink
        lines.append(f"  sink: frames [{s0}, {s1}) = {(s1 - s0) * self.nb} blocks")
        w0, w1 = snap.window
        lines.append(f"  window: frames [{w0}, {w1}) = {max(0, w1 - w0) * self.nb} blocks")
        if s.update is None:
            lines.append("  persistent: none (this pattern has no persistent memory)")
            return "\n".join(lines)
        shared = s.update.shared_heads
        heads = [0] if shared else range(s.num_kv_heads)
        for g in heads:
            members = snap.persistent[(batch, g)]
            who = "shared by all heads" if shared else f"KV head {g}"
            lines.append(f"  persistent ({who}): {len(members)}/{s.capacity} blocks, "
                         f"score = {s.update.rule.score}")
            by_frame: dict[int, list[tuple[int, int, float]]] = {}
            for block, score in sorted(members.items()):
                f, i, j = lay.block_coords(block)
                by_frame.setdefault(f, []).append((i, j, score))
            for f, tiles in sorted(by_frame.items()):
                shown = ", ".join(f"({i},{j}) {sc:.4g}" for i, j, sc in tiles[:max_blocks])
                more = f", ... {len(tiles) - max_blocks} more" if len(tiles) > max_blocks else ""
                lines.append(f"    frame {f} (age {snap.frames - 1 - f}): {len(tiles)} tiles: "
                             f"{shown}{more}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"RolloutCache({self.schedule.pattern_name}, step={self.step}, "
                f"layers={self.num_layers}, batch={self.batch}, slots={self.nslots}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, device={self.device})")


# ==================================================================================
# a simulated rollout and its picture
# ==================================================================================
def simulate_memory(program, steps: int, batch: int = 1, seed: int = 0, device="cpu",
                    dtype=torch.float32, chunks: Optional[Sequence] = None) -> list[MemorySnapshot]:
    """Commit `steps` chunks (random q/k/v unless `chunks` gives (q, k, v) per step) through a
    one-layer cache and return the memory after every step (snapshot i = before chunk i)."""
    s = program.schedule
    cache = RolloutCache(program, batch=batch, num_layers=1, device=device, dtype=dtype,
                         max_frames=(steps + 1) * s.chunk_frames if s.window.frames is None else None)
    gen = torch.Generator().manual_seed(seed)
    lay = s.layout
    n = lay.chunk_blocks * lay.block_tokens
    valid = lay.valid_token_mask(lay.chunk_frames)[None, None, :, None]
    snaps = [cache.snapshot()]
    for t in range(steps):
        if chunks is not None:
            q, k, v = (x.to(device=device, dtype=dtype) for x in chunks[t])
        else:
            q, k, v = ((torch.randn(batch, h, n, s.head_dim, generator=gen) * valid)
                       .to(device=device, dtype=dtype)
                       for h in (s.num_heads, s.num_kv_heads, s.num_kv_heads))
        cache.commit(0, q, k, v)
        snaps.append(cache.snapshot())
    return snaps


def draw_memory(snapshots: Sequence[MemorySnapshot], path=None, *, batch: int = 0,
                title: Optional[str] = None):
    """Which blocks of which frames are in memory over a rollout, as a PNG at `path`.

    x = AR step t (the memory that chunk t attends to), y = frame; a cell is coloured by
    the number of that frame's blocks in the persistent set (mean over KV heads of batch
    element `batch`; exact for shared sets), purple for sink frames, green for window
    frames, light grey for frames that left the window with no block kept, white for
    frames not generated yet. Returns the path (or the Figure when path is None).
    Needs only the snapshots (plain data) and matplotlib.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not snapshots:
        raise ValueError("draw_memory: no snapshots")
    nb = snapshots[0].blocks_per_frame
    steps = len(snapshots)
    n_frames = max(max(sn.frames for sn in snapshots), 1)
    rgba = np.ones((n_frames, steps, 4))
    counts = np.full((n_frames, steps), np.nan)
    sink_c, win_c, gone_c = (np.array(to_rgba) for to_rgba in
                             ((0.506, 0.447, 0.702, 1.0), (0.333, 0.659, 0.408, 1.0),
                              (0.9, 0.9, 0.9, 1.0)))
    from matplotlib import colormaps
    cmap = ListedColormap(colormaps["YlOrRd"](np.linspace(0.12, 1.0, 256)))
    norm = Normalize(vmin=0.0, vmax=float(nb))
    total_p = []
    for x, sn in enumerate(snapshots):
        fc = sn.frame_counts(batch)
        total_p.append(sum(fc.values()))
        for f in range(sn.frames):
            if sn.sink[0] <= f < sn.sink[1]:
                rgba[f, x] = sink_c
            elif sn.window[0] <= f < sn.window[1]:
                rgba[f, x] = win_c
            elif fc.get(f, 0.0) > 0:
                counts[f, x] = fc[f]
                rgba[f, x] = cmap(norm(fc[f]))
            else:
                rgba[f, x] = gone_c
    height = min(12.0, max(4.0, n_frames * 0.06 + 2.5))
    width = min(16.0, max(8.0, steps * 0.08 + 3.0))
    fig = Figure(figsize=(width, height), dpi=120)
    ax = fig.add_axes((0.09, 0.12, 0.74, 0.76))
    ax.imshow(rgba, origin="lower", aspect="auto", interpolation="nearest",
              extent=(-0.5, steps - 0.5, -0.5, n_frames - 0.5))
    ax.set_xlabel("AR step t (memory seen by chunk t)")
    ax.set_ylabel("latent frame")
    cax = fig.add_axes((0.86, 0.12, 0.025, 0.76))
    from matplotlib.cm import ScalarMappable
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax,
                 label=f"blocks of the frame in the persistent set (of {nb})")
    handles = [Patch(facecolor=sink_c, label="sink"), Patch(facecolor=win_c, label="window"),
               Patch(facecolor=gone_c, edgecolor="#a0a0a0", label="dropped (no block kept)"),
               Patch(facecolor="white", edgecolor="#a0a0a0", label="not generated yet")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    last = snapshots[-1]
    fig.suptitle(title or f"persistent memory over {steps - 1} AR steps\n"
                          f"({last.frames} frames, {nb} blocks/frame; "
                          f"{total_p[-1]:.0f} persistent blocks at the end)", fontsize=10)
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = ["RolloutCache", "CacheTables", "MemorySnapshot", "StepPlan", "step_plan",
           "peak_blocks", "expected_nbytes", "steady_frames", "check_tables",
           "simulate_memory", "draw_memory", "POISON_FREED"]
