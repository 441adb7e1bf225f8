"""The rollout cache's commit on the GPU: three launches per layer, nothing recompiled.

1. `select.CommitImportance`: the chunk's query representatives and the importance partial
   sums over P_t and the window, read straight from the persistent and window tables;
2. the generated update kernel (codegen/memory/update_rule.py): importance averaged over the heads,
   scores, Top-C, tables rewritten, losers freed, the window table shifted;
3. `_write_chunk_kernel`: the kept chunk blocks into free slots (K, V, key representative,
   slot_block, slot_valid) and into the sink / window tables.
Every integer that changes from step to step is a runtime argument Triton does not
specialise on (tests/test_rollout_cache.py checks that steady-state commits compile nothing).
"""
from __future__ import annotations

import torch

from .. import select as select_ops
from .cache_plan import StepPlan
from .layer import _Layer
from .update_rule import launch_update_kernel

try:  # the torch commit works without triton
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing
    triton = None
    tl = None

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

    def __init__(self, cache):
        """`cache`: the RolloutCache this commit serves (not imported: it imports this module)."""
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
            L.free_dropped_window(plan, n_free0)
            if kept_old:
                L.window_slots[..., :kept_old] = L.window_slots[..., plan.n_drop:plan.nw].clone()
            freed = plan.n_drop
        cache._poison(L, n_free0, freed)  # a test switch; nothing when off
        L.n_free += freed
        m = plan.chunk_sink + plan.chunk_blocks - plan.chunk_keep_start
        if m:
            self.write.launch(L, plan, k, v, self.cur_valid, L.n_free, m, kept_old,
                              s.chunk_start_frame(plan.step) * cache.nb)
            L.n_free -= m
        # the kernels wrote these in place behind autograd's back: say so, as torch's own
        # in-place ops do, so that anything saved from them fails loudly instead of reading
        # the new contents (and trusted tables of the previous step stop being trusted)
        torch.autograd.graph.increment_version(L.written_in_place())


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
