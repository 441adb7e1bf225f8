"""One layer of a rollout cache: its block pool, block tables and host counters.

The state that the cache (rollout_cache.py) owns and the commits (`RolloutCache._commit`,
triton_commit.py) change; the field layout is in rollout_cache.py's module docstring.
Here, below both, so that the GPU commit can name it without importing the cache.
"""
from __future__ import annotations

import torch

from .cache_plan import StepPlan


class _Layer:
    """Tensors and host counters of one layer (see rollout_cache.py's module docstring)."""

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

    def free_dropped_window(self, plan: StepPlan, n_free0: int) -> None:
        """No persistent memory: the blocks leaving the window go back to the free list."""
        dropped = self.window_slots[..., :plan.n_drop].long()
        self.free_list[..., n_free0:n_free0 + plan.n_drop] = self.window_slots[..., :plan.n_drop]
        self.slot_block.scatter_(2, dropped, -1)
        self.slot_valid.scatter_(2, dropped, 0)
        self.slot_score.scatter_(2, dropped, 0.0)

    def written_in_place(self) -> list[torch.Tensor]:
        """Every tensor a commit may write in place (the GPU commit's kernels bump their
        version counters through this list, as torch's own in-place ops do)."""
        return [self.k_pool, self.v_pool, self.k_rep, self.slot_valid, self.slot_block,
                self.slot_score, self.free_list, self.sink_slots, self.persistent_slots,
                self.persistent_count, self.window_slots]
