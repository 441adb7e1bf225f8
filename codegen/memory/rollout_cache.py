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

What one layer holds (per batch element b and KV head g; BlockTables layout, attention/tables.py)
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
  2. the generated update step (codegen/memory/update_rule.py): score P_t ∪ E_t with the pattern's
     sympy expression, Top-C (ties to the lower block index), persistent table rewritten;
     winners keep their slots (no K/V copy), losers go back to the free list; without
     persistent memory the blocks leaving the window are freed;
  3. the chunk's blocks that stay (window, or sink) are written into free slots (K, V and
     key representatives), and the sink / window tables advance (window_slots shifted so
     that position p stays block w_start*nb + p).
Modules: sizes and the per-step plan in codegen/memory/cache_plan.py, the GPU commit in
codegen/memory/triton_commit.py, snapshots and the picture in codegen/memory/memory_picture.py.
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
a commit past `max_frames`, a state dict whose indices, counts, free list or step do not
agree (`load_state_dict` checks every one; the cache is unchanged). Values are not checked:
non-finite q/k/v give non-finite outputs where read (the SDPA contract, docs/semantics.md),
and a NaN update score ranks last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sparsedsl.protocol import CacheStepRules

from .. import select as select_ops
from ..attention.tables import BlockTables
from .cache_plan import (StepPlan, _kv_blocks, expected_nbytes, peak_blocks, steady_frames,
                         step_plan)
from .layer import _Layer
from .memory_picture import MemorySnapshot, draw_memory, simulate_memory
from .triton_commit import _TritonCommit
from .update_rule import load_update_rule, update_step

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


def _is_int(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, int) and not isinstance(value, bool)


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
# the cache
# ==================================================================================
class RolloutCache(CacheStepRules):
    """Per-layer block pools and tables of one rollout; see the module docstring."""

    def __init__(self, program, batch: int = 1, num_layers: int = 1, device="cpu", dtype=None,
                 max_frames: Optional[int] = None):
        self._set_geometry(program, batch, num_layers, device, max_frames)
        s = self.schedule
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
    def tables(self, layer: int) -> CacheTables:
        """The BlockTables of `layer` at the current step (live views, no copy), marked
        trusted: `program.attention` skips the count checks (a host sync) while they stay
        unchanged."""
        L = self._uncommitted(layer, reading_tables=True)
        return CacheTables(L.step, L.k_pool, L.v_pool, L.k_rep, L.slot_valid, L.slot_block,
                           L.sink_slots, L.persistent_slots, L.persistent_count, L.window_slots,
                           schedule_key=self.schedule.key, layer=layer).mark_trusted()

    def attention(self, layer: int, q, k, v, **kwargs):
        """`program.attention(q, k, v, self.tables(layer))`."""
        return self.program.attention(q, k, v, self.tables(layer), **kwargs)

    # --- commit ------------------------------------------------------------------------------
    def _check_chunk(self, layer: int, q, k, v) -> None:
        L = self._uncommitted(layer)
        self._check_chunk_tensors(q, k, v)
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
        the memory update; the cache advances after the last layer's commit.

        Non-finite inputs (docs/semantics.md): the chunk's values are not checked (no host
        sync). A NaN / inf chunk is committed like any other: the tables stay consistent, the
        attention of rows that visit its blocks is non-finite (as in SDPA), and an update score
        that becomes NaN ranks last (below every number, ties to the lower block index)."""
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
        """Test switch POISON_FREED: NaN into the slots just freed (nothing when it is off)."""
        if not (POISON_FREED and freed):
            return
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
            L.free_dropped_window(plan, n_free0)
            freed = plan.n_drop
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
        step = state.get("step")
        if not _is_int(step) or step < 0:
            raise ValueError(f"load_state_dict: step = {step!r}: expected an integer >= 0")
        try:
            new_layers = self._layers_from_state(state)
        except KeyError as exc:
            raise ValueError(f"load_state_dict: the state misses {exc}") from None
        self._check_loaded_steps(step, [L.step for L in new_layers])
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
                value = entry[name]
                if not _is_int(value):
                    raise ValueError(f"load_state_dict: layer {i} {name} = {value!r}: expected "
                                     "an integer")
                setattr(layer, name, int(value))
            self._check_layer_state(i, layer)
            new_layers.append(layer)
        return new_layers

    def _check_layer_state(self, i: int, L: _Layer) -> None:
        """ValueError naming the field and value unless every index and count of a loaded
        layer is in range and the tables, the free list and the step agree (what a commit
        leaves; see check_invariants in the tests). Host copies of the small int tensors."""
        s = self.schedule
        nb, c, nslots = self.nb, self.c, L.nslots
        step = L.step
        where = f"load_state_dict: layer {i}"

        def fail(name, mask, t, expected):
            idx = mask.nonzero()[0].tolist()
            raise ValueError(f"{where} {name}[{', '.join(map(str, idx))}] = {t[tuple(idx)].item()}"
                             f": expected {expected}")

        if step < 0:
            raise ValueError(f"{where} step = {step}: expected an integer >= 0")
        n_committed = step * self.nqb
        sb = L.slot_block.cpu().long()
        sv = L.slot_valid.cpu().long()
        bad = (sb < -1) | (sb >= n_committed)
        if bad.any():
            fail("slot_block", bad, sb, f"-1 (free) or one of the {n_committed} blocks committed "
                 f"before the layer's step {step}, i.e. in [-1, {n_committed})")
        bad = (sv < 0) | (sv > self.bt)
        if bad.any():
            fail("slot_valid", bad, sv, f"a token count in [0, {self.bt}]")
        if not 0 <= L.n_free <= nslots:
            raise ValueError(f"{where} n_free = {L.n_free}: expected a count in [0, {nslots}]")
        # what the tables hold at this step
        n_sink = min(s.sink_frames, step * c) * nb
        w0, w1 = s.window_frames_range(step)
        nw = (w1 - w0) * nb
        if s.update is None or s.window.frames is None:
            want_np = 0
        else:
            want_np = min(s.capacity, max(0, step * c - s.window.frames - s.sink_frames) * nb)
        if L.n_persistent != want_np:
            raise ValueError(f"{where} n_persistent = {L.n_persistent}: at step {step} the "
                             f"persistent set holds {want_np} blocks")
        pc = L.persistent_count.cpu().long()
        bad = (pc < 0) | (pc > s.capacity)
        if bad.any():
            fail("persistent_count", bad, pc, f"a count in [0, {s.capacity}] (the capacity)")
        bad = pc != want_np
        if bad.any():
            fail("persistent_count", bad, pc, f"{want_np} (n_persistent, the size of the "
                 f"persistent set at step {step})")
        if nw > L.window_slots.shape[-1]:
            raise ValueError(f"{where} step = {step}: the window then holds {nw} blocks but "
                             f"window_slots has room for {L.window_slots.shape[-1]}")
        tables = {"sink_slots": L.sink_slots.cpu()[..., :n_sink].long(),
                  "persistent_slots": L.persistent_slots.cpu()[..., :want_np].long(),
                  "window_slots": L.window_slots.cpu()[..., :nw].long(),
                  "free_list": L.free_list.cpu()[..., :L.n_free].long()}
        for name, t in tables.items():
            bad = (t < 0) | (t >= nslots)
            if bad.any():
                fail(name, bad, t, f"a pool slot in [0, {nslots})")
        used = torch.cat([tables[n] for n in ("sink_slots", "persistent_slots", "window_slots")], -1)
        if used.shape[-1] + L.n_free != nslots:
            raise ValueError(f"{where} n_free = {L.n_free}: at step {step} the tables use "
                             f"{used.shape[-1]} of the {nslots} slots, so {nslots - used.shape[-1]} "
                             "are free")
        B, HKV = sb.shape[:2]
        ones = lambda t: torch.ones_like(t)  # noqa: E731
        n_used = torch.zeros(B, HKV, nslots, dtype=torch.long).scatter_add_(2, used, ones(used))
        n_freed = torch.zeros(B, HKV, nslots, dtype=torch.long).scatter_add_(
            2, tables["free_list"], ones(tables["free_list"]))
        for mask, what in ((n_used > 1, "is referenced twice by the tables"),
                           (n_freed > 1, "is twice on the free list"),
                           ((n_used > 0) & (n_freed > 0), "is on the free list and in use")):
            if mask.any():
                b, g, slot = mask.nonzero()[0].tolist()
                names = [n for n, t in tables.items() if (t[b, g] == slot).any()]
                raise ValueError(f"{where}: pool slot {slot} of (batch {b}, KV head {g}) {what} "
                                 f"({', '.join(names)}); free slots and the slots of the sink, "
                                 "persistent and window tables must be disjoint")
        # every slot is used xor free: the free ones hold nothing, the used ones the right block
        free = n_freed > 0
        bad = free & ((sb != -1) | (sv != 0))
        if bad.any():
            fail("slot_block", bad, sb, "-1 with slot_valid 0 (the slot is on the free list)")
        frame_valid = torch.tensor(s.layout.frame_valid_tokens, dtype=torch.long)
        bad = ~free & ((sb < 0) | (sv != frame_valid[sb.clamp(min=0) % nb]))
        if bad.any():
            fail("slot_valid", bad, sv, "the real tokens of the block the slot holds (slot_block "
                 "must name a block for every slot the tables use)")
        block_of = lambda t: sb.gather(2, t)  # noqa: E731
        checks = (("sink_slots", tables["sink_slots"], torch.arange(n_sink),
                   "block p at sink position p"),
                  ("window_slots", tables["window_slots"], torch.arange(w0 * nb, w1 * nb),
                   f"block {w0 * nb} + p at window position p (window frames [{w0}, {w1}) at "
                   f"step {step})"))
        for name, t, want, what in checks:
            got = block_of(t)
            bad = got != want
            if bad.any():
                idx = bad.nonzero()[0].tolist()
                raise ValueError(f"{where} {name}[{', '.join(map(str, idx))}] = "
                                 f"{t[tuple(idx)].item()} holds block {got[tuple(idx)].item()}: "
                                 f"expected {what}")
        if want_np:
            got = block_of(tables["persistent_slots"])
            lo, hi = s.sink_frames * nb, w0 * nb
            bad = (got < lo) | (got >= hi)
            bad[..., 1:] |= got[..., 1:] <= got[..., :-1]
            if bad.any():
                idx = bad.nonzero()[0].tolist()
                raise ValueError(f"{where} persistent_slots[{', '.join(map(str, idx))}] = "
                                 f"{tables['persistent_slots'][tuple(idx)].item()} holds block "
                                 f"{got[tuple(idx)].item()}: expected blocks in ascending order "
                                 f"in [{lo}, {hi}) (evicted from the window by step {step})")

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


__all__ = ["RolloutCache", "CacheTables", "MemorySnapshot", "StepPlan", "step_plan",
           "peak_blocks", "expected_nbytes", "steady_frames", "check_tables",
           "simulate_memory", "draw_memory", "POISON_FREED"]
