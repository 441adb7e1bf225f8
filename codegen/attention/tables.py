"""Block tables: how a program finds the cache's blocks in the pool, read in place.

One pool per layer holds K/V blocks at the kernel's block size; the tables name which
slots hold the sink, the persistent set and the window (by window position, i.e. in
ascending block order), plus per-slot metadata. The memory runtime (the rollout cache)
maintains them; here they are inputs, and `tables_from_reference` builds them from a
float64 reference state (slots shuffled, so that tests exercise the indirection).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class BlockTables:
    step: int
    k_pool: torch.Tensor            # [B, Hkv, NSLOTS, BT, D]
    v_pool: torch.Tensor            # [B, Hkv, NSLOTS, BT, D]
    k_rep: torch.Tensor             # [B, Hkv, NSLOTS, D] float32: mean of each block's real keys
    slot_valid: torch.Tensor        # int32 [B, Hkv, NSLOTS]: real-token prefix of each slot
    slot_block: torch.Tensor        # int32 [B, Hkv, NSLOTS]: global block id held (-1: free)
    sink_slots: torch.Tensor        # int32 [B, Hkv, NSINK]: slots of sink blocks, in block order
    persistent_slots: torch.Tensor  # int32 [B, Hkv, CMAX]
    persistent_count: torch.Tensor  # int32 [B, Hkv]
    window_slots: torch.Tensor      # int32 [B, Hkv, NWMAX]: slot of window position p
    # Set by code that built the tables consistent by construction (the rollout cache): the
    # version counters of the index tensors at that moment. Checking the counts needs a host
    # sync; tables still at those versions need no check (`validate=None`, the default).
    trusted_versions: Optional[tuple] = field(default=None, repr=False, compare=False)

    INDEX_FIELDS = ("slot_valid", "slot_block", "sink_slots", "persistent_slots",
                    "persistent_count", "window_slots")

    @property
    def batch(self) -> int:
        return self.k_pool.shape[0]

    def _index_versions(self) -> Optional[tuple]:
        """Version counters of the index tensors; None for inference tensors (made under
        `torch.inference_mode`), which keep none: an in-place edit could not be seen."""
        tensors = [getattr(self, name) for name in self.INDEX_FIELDS]
        if any(t.is_inference() for t in tensors):
            return None
        return tuple(t._version for t in tensors)

    def mark_trusted(self) -> "BlockTables":
        """Record that these tables are consistent now (their producer guarantees it). Tables
        of inference tensors stay untrusted (checked): use `torch.no_grad()` for rollouts
        that should skip the check."""
        self.trusted_versions = self._index_versions()
        return self

    def is_trusted(self) -> bool:
        """Marked trusted, and no index tensor changed in place since (a user's edit, or the
        cache moving on to the next step, bumps a version counter): no host sync."""
        return self.trusted_versions is not None and self.trusted_versions == self._index_versions()


def resolve_validate(validate: Optional[bool], tables: BlockTables) -> bool:
    """`validate=None` (the default of `program.attention`): check the tables' counts unless
    they come untouched from the program's own cache. True / False force it either way."""
    if validate is None:
        return not (isinstance(tables, BlockTables) and tables.is_trusted())
    return bool(validate)


def pad_blocks(x: torch.Tensor, block_tokens: int, head_dim: int) -> torch.Tensor:
    """Zero-pad [..., bt, d] up to [..., block_tokens, head_dim] (no copy when already there)."""
    bt, d = x.shape[-2], x.shape[-1]
    if bt == block_tokens and d == head_dim:
        return x.contiguous()
    out = x.new_zeros(*x.shape[:-2], block_tokens, head_dim)
    out[..., :bt, :d] = x
    return out


def tables_from_reference(program, state, dtype: torch.dtype, device, seed: int = 0,
                          extra_slots: int = 2) -> BlockTables:
    """Lay a reference RolloutState out as a pool + tables (random slot order)."""
    schedule = program.schedule
    lay = schedule.layout
    nb, c = lay.blocks_per_frame, lay.chunk_frames
    B, Hkv = state.batch, schedule.num_kv_heads
    BT, D = program.kernel_block_tokens, program.kernel_head_dim
    held = [[sorted(state.kv[(b, g)]) for g in range(Hkv)] for b in range(B)]
    nslots = max((len(h) for row in held for h in row), default=0) + extra_slots
    gen = torch.Generator().manual_seed(seed)
    k_pool = torch.zeros(B, Hkv, nslots, BT, D, dtype=dtype)
    v_pool = torch.zeros_like(k_pool)
    k_rep = torch.zeros(B, Hkv, nslots, D, dtype=torch.float32)
    slot_valid = torch.zeros(B, Hkv, nslots, dtype=torch.int32)
    slot_block = torch.full((B, Hkv, nslots), -1, dtype=torch.int32)
    step = state.step
    w_start, w_end = schedule.window_frames_range(step)
    n_sink = min(schedule.sink_frames, step * c) * nb
    cmax = max(schedule.capacity, 1)
    nwmax = max((w_end - w_start) * nb, 1)
    sink_slots = torch.zeros(B, Hkv, max(schedule.sink_frames * nb, 1), dtype=torch.int32)
    persistent_slots = torch.zeros(B, Hkv, cmax, dtype=torch.int32)
    persistent_count = torch.zeros(B, Hkv, dtype=torch.int32)
    window_slots = torch.zeros(B, Hkv, nwmax, dtype=torch.int32)
    for b in range(B):
        for g in range(Hkv):
            order = torch.randperm(nslots, generator=gen).tolist()
            slot_of = {}
            for slot, block in zip(order, held[b][g]):
                k, v = state.kv[(b, g)][block]
                _, i, j = lay.block_coords(block)
                valid = lay.block_valid_tokens(i, j)
                k_pool[b, g, slot, :k.shape[0], :k.shape[1]] = k.to(dtype)
                v_pool[b, g, slot, :v.shape[0], :v.shape[1]] = v.to(dtype)
                k_rep[b, g, slot, :k.shape[1]] = k[:valid].mean(0).float()
                slot_valid[b, g, slot] = valid
                slot_block[b, g, slot] = block
                slot_of[block] = slot
            for i in range(n_sink):
                sink_slots[b, g, i] = slot_of[i]
            members = sorted(state.persistent[(b, g)])
            for i, block in enumerate(members):
                persistent_slots[b, g, i] = slot_of[block]
            persistent_count[b, g] = len(members)
            for p, block in enumerate(range(w_start * nb, w_end * nb)):
                window_slots[b, g, p] = slot_of[block]
    to = dict(device=device)
    return BlockTables(step, k_pool.to(**to), v_pool.to(**to), k_rep.to(**to), slot_valid.to(**to),
                       slot_block.to(**to), sink_slots.to(**to), persistent_slots.to(**to),
                       persistent_count.to(**to), window_slots.to(**to))
