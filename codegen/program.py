"""A compiled pattern at run time: schedule -> kernel spec, visit tables, select, attention.

    program = sparsedsl.compile(pattern, num_heads=12, head_dim=128, backend="triton")
    out, lse = program.attention(q, k, v, tables)       # one AR step, tables from the cache

Per step the program (1) lays out the static visits of every query block (sink, persistent,
static window offsets) as pool slots with a few torch index ops, (2) runs the fused select
(query representatives, representative attention, Top-K over the window) which appends the
dynamic picks to the same table, and (3) runs the generated attention kernel, which reads
K/V in place from the pool. No dense mask is built at any point.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from sparsedsl.explain import explain as explain_schedule
from sparsedsl.schedule import Schedule
from sparsedsl.tiles import kernel_block_tokens

from . import select as select_ops
from .attention.kernel_spec import AttentionKernelSpec
from .attention.tables import BlockTables, resolve_validate

KERNEL_DTYPES = {"float16", "bfloat16", "float32"}


def _pow2_at_least(x: int, floor: int) -> int:
    return max(floor, 1 << max(0, (x - 1).bit_length()))


# The dense path runs on CUDA through SDPA's flash / memory-efficient ops. Every new GPU path
# is checked on a GPU against the float64 reference before it is on by default
# (`pytest -m gpu tests/test_dense_step.py`: 8 passed on an H200, 2026-12-02).
DENSE_PATH_CHECKED_ON_CUDA = True
# ... and it is taken on CUDA only where it measured faster than the sparse kernels at the same
# steps (bench/rollout.py, docs/benchmarks.md): with 128-token padded blocks at every such step
# (H200: 0.62 vs 0.80 ms at step 0, 1.87 vs 2.32 at sink-window's step 2, against the generic
# kernel); with 64-token blocks (the Gluon kernel) once the visited earlier frames number at
# least DENSE_PATH_64_MIN_EARLIER_FRAMES_CUDA (H100, 2026-12-07, sink-window, cuDNN and the
# one-gather keys: 1.17 vs 1.32 ms with 6 earlier frames, 1.27 vs 1.48 with 7; slower with 3,
# 0.97 vs 0.87; level with none, 0.43 vs 0.43); never with smaller blocks (not measured).
DENSE_PATH_MIN_BLOCK_TOKENS_CUDA = 128
DENSE_PATH_64_MIN_EARLIER_FRAMES_CUDA = 6
# static visit tables kept for reuse across a chunk's passes (a few per layer of a model)
STATIC_VISITS_KEPT = 64


class PBSAProgram:
    """Runs a schedule with the generated Triton kernels (`backend="triton"`) or the PyTorch
    backend over the same tables (`backend="torch"`, CPU and fallback). Follows the program
    protocol (sparsedsl/protocol.py); its cache is a RolloutCache."""

    def __init__(self, schedule: Schedule, backend: str = "auto", config=None):
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend = {backend!r}: expected 'auto', 'triton' or 'torch'")
        self.schedule = schedule
        self.backend = backend
        self.config = config
        lay = schedule.layout
        self.kernel_block_tokens = kernel_block_tokens(lay.block_tokens)   # sparsedsl.tiles
        self.kernel_head_dim = _pow2_at_least(schedule.head_dim, 16)
        self.scale = 1.0 / math.sqrt(schedule.head_dim)
        self.cur_valid_host = torch.tensor(list(lay.frame_valid_tokens) * lay.chunk_frames,
                                           dtype=torch.int32)
        self._device_constants: dict = {}
        self._static_visit_memo: dict = {}   # see _static_visits
        # steps where every query block visits the same earlier frames whole run as dense SDPA
        # over them (Schedule.frames_at; codegen/attention/dense_step.py). None: wherever that path has
        # been checked against the float64 reference (see DENSE_PATH_CHECKED_ON_CUDA);
        # True / False: always / never.
        self.dense_path: Optional[bool] = None

    def path_at(self, step: int, device="cpu") -> str:
        """'dense' when `attention` at this step, on `device`, runs the dense path, else
        'sparse'."""
        frames = self.schedule.frames_at(step)
        if frames is None:
            return "sparse"
        on = self.dense_path
        if on is None:
            on = torch.device(device).type != "cuda" or (
                DENSE_PATH_CHECKED_ON_CUDA and self._dense_measured_faster_on_cuda(len(frames)))
        return "dense" if on else "sparse"

    def _dense_measured_faster_on_cuda(self, earlier_frames: int) -> bool:
        bt = self.kernel_block_tokens
        if bt >= DENSE_PATH_MIN_BLOCK_TOKENS_CUDA:
            return True
        return bt >= 64 and earlier_frames >= DENSE_PATH_64_MIN_EARLIER_FRAMES_CUDA

    def chunk_real_index(self, device) -> torch.Tensor:
        """Positions of the chunk's real tokens in the tile-major layout, long, on `device`."""
        key = ("chunk_real_index", str(device))
        if key not in self._device_constants:
            lay = self.schedule.layout
            self._device_constants[key] = lay.valid_token_mask(lay.chunk_frames).nonzero()[:, 0].to(device)
        return self._device_constants[key]

    # --- compile-time views -------------------------------------------------------------
    def max_cached_visits(self, step: int) -> int:
        """Width of the visit table: the steady-state bound for bounded windows (one kernel for
        the whole rollout), a power-of-two bucket of the step's bound otherwise."""
        s = self.schedule
        current_min = (s.blocks_per_frame if s.current == "causal" else s.layout.chunk_blocks)
        if s.window.frames is not None:
            return max(16, -(-(s.max_visits - current_min) // 16) * 16)
        need = s.shapes.max_visits_at(step) - current_min
        return _pow2_at_least(max(need, 1), 16)

    def kernel_spec(self, step: int, dtype: str | None = None) -> AttentionKernelSpec:
        s = self.schedule
        dtype = dtype or s.dtype
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"dtype = {dtype!r}: the kernels run in {sorted(KERNEL_DTYPES)}")
        return AttentionKernelSpec(
            block_tokens=self.kernel_block_tokens, head_dim=self.kernel_head_dim,
            num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, dtype=dtype,
            chunk_frames=s.chunk_frames, blocks_per_frame=s.blocks_per_frame, current=s.current,
            max_cached_visits=self.max_cached_visits(step),
            has_padding=s.layout.has_padding or self.kernel_block_tokens != s.layout.block_tokens)

    @property
    def source(self) -> str:
        """The generated Triton source of this pattern's attention kernels (steady state)."""
        from .attention.cache import kernel_source
        step = 10**4 if self.schedule.window.frames is not None else 8
        dtype = self.schedule.dtype if self.schedule.dtype in KERNEL_DTYPES else "float32"
        header = [f"# {line}" for line in (self.schedule.describe().splitlines() +
                                           str(self.schedule.pattern).splitlines())]
        return "\n".join(header) + "\n" + kernel_source(self.kernel_spec(step, dtype), "ptr")

    def write_source(self, out_dir):
        """Write the generated source to OUT_DIR/<pattern>-<key>.py (atomically); return the path."""
        from pathlib import Path
        from .attention.cache import _atomic_write
        path = Path(out_dir) / f"{self.schedule.pattern_name}-{self.schedule.key}.py"
        _atomic_write(path, self.source)
        return path

    def property_check(self, examples: int = 20, device: str = "cpu", dtypes=None,
                       num_heads=None, head_dim=None, backend=None):
        """Property-test this program's kernels (select, forward, backward) against the float64
        reference on small layouts of the same pattern; None if all pass, else the shrunk
        counterexample as text. `num_heads` / `head_dim` fix those (else drawn small);
        `backend` overrides the program's (`sparsedsl check --backend`)."""
        from .check import property_check
        if dtypes is None:
            dtypes = ("float32",) if device == "cpu" else ("float32", "bfloat16", "float16")
        if backend is None:
            backend = self.backend if self.backend != "auto" else (
                "triton" if device == "cuda" else "torch")
        return property_check(self.schedule.pattern, examples=examples, device=device,
                              backend=backend, dtypes=dtypes, num_heads=num_heads,
                              head_dim=head_dim)

    def explain(self, **kwargs) -> str:
        spec = self.kernel_spec(10**4 if self.schedule.window.frames is not None else 8,
                                self.schedule.dtype if self.schedule.dtype in KERNEL_DTYPES
                                else "float32")
        return (explain_schedule(self.schedule, **kwargs) +
                f"\n\nkernels ({self.backend}): block {spec.block_tokens} tokens x head dim "
                f"{spec.head_dim}, visit table width {spec.max_cached_visits}, "
                f"padding masks {'on' if spec.has_padding else 'compiled out'}")

    # --- the static part of the visits ----------------------------------------------------
    def static_window_positions(self, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [NQB, SMAX] int32, counts [NQB] int32): window positions of each query
        block's static neighborhood at `step` (position p = block w_start*nb + p)."""
        s = self.schedule
        w_start, w_end = s.window_frames_range(step)
        key = (str(device), step * s.chunk_frames - w_start, w_end - w_start)
        if key not in self._device_constants:  # one host->device copy per window phase
            pos, cnt = _static_positions(s, key[1:], step)
            self._device_constants[key] = (pos.to(device), cnt.to(device))
        return self._device_constants[key]

    def cur_valid(self, device) -> torch.Tensor:
        """Real tokens of each chunk block, on `device` (copied once)."""
        key = ("cur_valid", str(device))
        if key not in self._device_constants:
            self._device_constants[key] = self.cur_valid_host.to(device)
        return self._device_constants[key]

    def _static_visits(self, tables: BlockTables, step: int, B: int, H: int, NQB: int, dev,
                       writable: bool = True):
        """The visits that do not depend on the queries (sink, persistent set, static window),
        compacted to the front of each row: (visit_slots, visit_count). The four denoising
        passes and the clean pass of a chunk read the same cache, so for trusted tables
        (unchanged since the cache made them) it is built once per chunk and layer and reused."""
        key = None
        if tables.is_trusted():
            key = (step, B, H, NQB, str(dev), tables.trusted_versions,
                   *(getattr(tables, name).data_ptr() for name in BlockTables.INDEX_FIELDS))
            hit = self._static_visit_memo.get(key)
            if hit is not None:   # the Top-K writes into a copy; without it, shared
                return (hit[0].clone(), hit[1].clone()) if writable else hit
        slots, count = self._build_static_visits(tables, step, B, H, NQB, dev)
        if key is not None:
            if len(self._static_visit_memo) >= STATIC_VISITS_KEPT:
                self._static_visit_memo.pop(next(iter(self._static_visit_memo)))
            self._static_visit_memo[key] = (slots, count)
            return (slots.clone(), count.clone()) if writable else (slots, count)
        return slots, count

    def _build_static_visits(self, tables: BlockTables, step: int, B: int, H: int, NQB: int, dev):
        s = self.schedule
        group = s.num_heads // s.num_kv_heads
        head_kv = torch.arange(H, device=dev) // group
        nb, c = s.blocks_per_frame, s.chunk_frames
        parts, masks = [], []
        n_sink = min(s.sink_frames, step * c) * nb
        if n_sink:
            sink = tables.sink_slots[:, :, :n_sink].index_select(1, head_kv)
            parts.append(sink[:, :, None, :].expand(B, H, NQB, n_sink))
            masks.append(torch.ones(1, 1, 1, n_sink, dtype=torch.bool, device=dev).expand(B, H, NQB, n_sink))
        if s.capacity:
            cmax = tables.persistent_slots.shape[-1]
            pers = tables.persistent_slots.index_select(1, head_kv)[:, :, None, :].expand(B, H, NQB, cmax)
            used = (torch.arange(cmax, device=dev) <
                    tables.persistent_count.index_select(1, head_kv)[..., None])
            parts.append(pers)
            masks.append(used[:, :, None, :].expand(B, H, NQB, cmax))
        pos, cnt = self.static_window_positions(step, dev)
        split = s.window.split
        if pos.shape[1] and not (split.topk is not None and split.mode == "intersection"):
            win = tables.window_slots.index_select(1, head_kv)  # [B, H, NWMAX]
            idx = pos.long().clamp(min=0)
            gathered = win[:, :, idx.reshape(-1)].reshape(B, H, NQB, pos.shape[1])
            parts.append(gathered)
            used = torch.arange(pos.shape[1], device=dev)[None, :] < cnt[:, None]
            masks.append(used[None, None].expand(B, H, NQB, pos.shape[1]))
        maxv = self.max_cached_visits(step)
        # Compact the valid entries to the front of each row with one scatter: an entry's
        # column is the number of valid entries before it; invalid ones go to a spill column.
        visit_slots = torch.zeros(B, H, NQB, maxv + 1, dtype=torch.int32, device=dev)
        if parts:
            slots = torch.cat(parts, dim=-1).to(torch.int32)
            valid = torch.cat(masks, dim=-1)
            column = torch.cumsum(valid, dim=-1, dtype=torch.int32) - 1
            column = torch.where(valid, column.clamp(max=maxv), maxv).to(torch.int64)
            visit_slots.scatter_(-1, column, slots)
            visit_count = valid.sum(-1, dtype=torch.int32).clamp(max=maxv)
        else:
            visit_count = torch.zeros(B, H, NQB, dtype=torch.int32, device=dev)
        return visit_slots[..., :maxv].contiguous(), visit_count

    def visit_tables(self, q_blocks: torch.Tensor, tables: BlockTables, step: int,
                     select_backend: str = "auto", validate: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots each (batch, head, query block) visits, and how many: static + Top-K.

        `validate=False` skips the value checks that need a host sync (tables from a
        RolloutCache are consistent by construction)."""
        s = self.schedule
        dev = q_blocks.device
        B, H, NQB = q_blocks.shape[:3]
        split = s.window.split
        n_window = s.window_block_count(step)
        k = split.topk.count(n_window) if split.topk is not None and n_window else 0
        visit_slots, visit_count = self._static_visits(tables, step, B, H, NQB, dev,
                                                       writable=bool(k))
        if k:
            pos, cnt = self.static_window_positions(step, dev)
            q_rep = select_ops.block_representatives(q_blocks, self.cur_valid(dev),
                                                     backend=select_backend,
                                                     check_values=validate)
            # the Triton tile is sized by the valid window n_window (not the pool, which
            # doubles with an unbounded window's history); above
            # select.SELECT_TRITON_MAX_POSITIONS positions the select runs the tiled Triton
            # select (select.SELECT_TILED) or else its torch path (same picks; issue 12)
            backend = select_ops.select_backend_for(select_backend, n_window,
                                                    tiled=select_ops.SELECT_TILED)
            select_ops.select_topk(q_rep, tables.k_rep, tables.window_slots, n_window, pos,
                                   cnt, split.mode, k, visit_slots, visit_count,
                                   backend=backend, check_values=validate)
        return visit_slots, visit_count

    # --- attention ------------------------------------------------------------------------
    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, NQB*bt, d] tile-major -> [B, h, NQB, BT, D] zero-padded for the kernel."""
        lay = self.schedule.layout
        bt, d = lay.block_tokens, x.shape[-1]
        x = x.reshape(x.shape[0], x.shape[1], lay.chunk_blocks, bt, d)
        if bt == self.kernel_block_tokens and d == self.kernel_head_dim:
            return x.contiguous()  # a view when the input is contiguous: no copy
        return F.pad(x, (0, self.kernel_head_dim - d, 0, self.kernel_block_tokens - bt)).contiguous()

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: BlockTables,
                  return_visits: bool = False, validate: Optional[bool] = None):
        """One AR step. q [B, H, NQB*bt, d], k/v [B, Hkv, NQB*bt, d] in the tile-major layout.

        Returns (out [B, H, NQB*bt, d], lse [B, H, NQB*bt] float32) and, with
        `return_visits`, the (visit_slots, visit_count) tables the kernel ran on.

        Non-finite inputs (docs/semantics.md): the values of q, k, v are not checked (no host
        sync); as in SDPA, a NaN / inf gives non-finite outputs in the rows that read it (the
        chunk's blocks, or a cached block in the rows that visit it). `validate=True` checks
        the tables' indices and counts (persistent_count in [0, capacity]; one host sync);
        `validate=False` skips every check that needs a sync; `validate=None` (the default)
        checks unless the tables come unchanged from this program's own cache
        (`cache.tables(layer)`, consistent by construction), so the path users take pays no
        sync. Wrong argument types raise ValueError naming what was expected.

        At a step where every query block visits the same earlier frames whole
        (`Schedule.frames_at`; `path_at(step) == "dense"`: step 0, every step of a sink +
        window pattern, the first steps of one whose persistent set still holds every evicted
        block) the step runs as one fused SDPA over the real tokens of those frames: the same
        attention, without the tables, the selection or the block kernel
        (codegen/attention/dense_step.py; `return_visits=True` or `self.dense_path = False`
        keep the sparse kernels; on CUDA see DENSE_PATH_CHECKED_ON_CUDA,
        DENSE_PATH_MIN_BLOCK_TOKENS_CUDA and DENSE_PATH_64_MIN_EARLIER_FRAMES_CUDA).
        """
        from .attention.autograd import pbsa_attention
        from .memory.rollout_cache import check_tables
        s, lay = self.schedule, self.schedule.layout
        _check_types(q, k, v, tables)
        check_tables(self, tables)  # tables of another pattern's cache are refused
        _check_step_inputs(s, q, k, v, tables)
        validate = resolve_validate(validate, tables)
        if validate:
            _check_table_counts(s, tables)
        step = tables.step
        if not return_visits and self.path_at(step, q.device) == "dense":
            from .attention.dense_step import dense_step_attention
            return dense_step_attention(self, q, k, v, tables)
        backend = self.backend
        if backend == "auto":
            backend = "triton" if q.is_cuda else "torch"
        qb, kb, vb = self._blocks(q), self._blocks(k), self._blocks(v)
        visit_slots, visit_count = self.visit_tables(qb.detach(), tables, step,
                                                     select_backend=backend, validate=validate)
        spec = self.kernel_spec(step, str(q.dtype).replace("torch.", ""))
        out, lse = pbsa_attention(spec, qb, kb, vb, self.cur_valid(q.device),
                                  tables.k_pool, tables.v_pool, tables.slot_valid, visit_slots,
                                  visit_count, self.scale, backend=backend, config=self.config,
                                  validate=validate)
        bt, d = lay.block_tokens, q.shape[-1]
        out = out[..., :bt, :d].reshape(q.shape)
        lse = lse[..., :bt].reshape(q.shape[:-1])
        if return_visits:
            return out, lse, (visit_slots, visit_count)
        return out, lse

    def visited_blocks(self, visit_slots, visit_count, tables: BlockTables) -> list:
        """Global block ids of the cached visits: [b][h][qb] -> sorted list (for checks)."""
        s = self.schedule
        group = s.num_heads // s.num_kv_heads
        slot_block = tables.slot_block.cpu()
        vs, vc = visit_slots.cpu(), visit_count.cpu()
        B, H, NQB = vc.shape
        return [[[sorted(int(slot_block[b, h // group, vs[b, h, q, i]])
                         for i in range(int(vc[b, h, q]))) for q in range(NQB)]
                 for h in range(H)] for b in range(B)]

    def to_block_mask(self, q: torch.Tensor, tables: BlockTables):
        """The step's attention as a FlexAttention BlockMask (built on q's device, tensor ops only).

        Keys are the global key sequence of every frame so far: blocks [0, (step+1) *
        chunk_blocks) in tile-major order, i.e. K = torch.cat([k_0, ..., k_step], dim=2) of the
        chunks' tile-major k (padding slots included; V likewise). Then
        `flex_attention(q, K, V, block_mask=mask, enable_gqa=True)` computes exactly
        `self.attention(q, k_step, v_step, tables)`, eager or compiled: the `mask_mod` holds the
        visited blocks and masks padding (padded query rows give 0, log-sum-exp -inf). Padded
        key slots are never attended, but unlike for `attention` they must hold finite values
        (zeros, as `VideoLayout.to_tile_major` writes): Flex multiplies their zero weights by V.
        Visited pairs of two whole tiles are Flex's full blocks, the others its partial blocks
        (codegen/flex_export.py). The mask's blocks are the kernel's (64 tokens for 8x8 tiles),
        and compiled Flex on CUDA needs its own tiles to divide them: pass
        `kernel_options={"BLOCK_M": mask.BLOCK_SIZE[0], "BLOCK_N": mask.BLOCK_SIZE[1]}` (its
        default of 128 rows fails to lower on 64-token blocks; tested on an H200). Built in
        about 5 ms at Self-Forcing's geometry on an H200 (docs/benchmarks.md)."""
        from .flex_export import block_mask
        return block_mask(self, q, tables)

    def __repr__(self) -> str:
        return f"PBSAProgram({self.schedule.pattern_name}, key={self.schedule.key}, backend={self.backend})"

    def draw_memory(self, frames: int, path, seed: int = 0):
        """Simulate a rollout of `frames` frames on random q/k/v and draw which blocks of which
        frames are in the persistent set at every step (PNG at `path`)."""
        from .memory.rollout_cache import draw_memory, simulate_memory
        steps = -(-frames // self.schedule.chunk_frames)
        snapshots = simulate_memory(self, steps, seed=seed)
        return draw_memory(snapshots, path, title=f"{self.schedule.pattern_name}: memory over "
                                                  f"{steps} AR steps (random q/k, seed {seed})")

    def new_cache(self, batch: int = 1, num_layers: int = 1, device="cpu", dtype=None,
                  max_frames: int | None = None):
        """A RolloutCache for this program (codegen/memory/rollout_cache.py): per layer a block
        pool of the schedule's peak size and the block tables `attention` reads, updated by
        `cache.commit(layer, q, k, v)` after each chunk's clean pass. `max_frames` bounds an
        unbounded window's pool (else it grows), or shrinks a bounded one for short rollouts."""
        from .memory.rollout_cache import RolloutCache
        return RolloutCache(self, batch=batch, num_layers=num_layers, device=device, dtype=dtype,
                            max_frames=max_frames)


@lru_cache(maxsize=256)
def _static_positions(schedule: Schedule, key, step: int):
    lay = schedule.layout
    w_start, _ = schedule.window_frames_range(step)
    rows = [[b - w_start * lay.blocks_per_frame for b in schedule.static_window_blocks(step, qb)]
            for qb in range(lay.chunk_blocks)]
    width = max((len(r) for r in rows), default=0)
    pos = torch.full((lay.chunk_blocks, width), -1, dtype=torch.int32)
    for qb, r in enumerate(rows):
        pos[qb, :len(r)] = torch.tensor(r, dtype=torch.int32)
    cnt = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    return pos, cnt


def _check_types(q, k, v, tables) -> None:
    """Argument types first, so that a wrong one is named instead of an AttributeError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(tables, BlockTables):
        raise ValueError("tables must be the BlockTables of program.new_cache(...).tables(layer), "
                         f"got {'None' if tables is None else type(tables).__name__}")


def _check_table_counts(s: Schedule, tables: BlockTables) -> None:
    """validate=True: persistent_count in [0, min(capacity, persistent_slots width)] (one host
    sync; a count out of range would silently change the visits)."""
    pc = tables.persistent_count
    if not isinstance(pc, torch.Tensor) or tuple(pc.shape) != tuple(tables.persistent_slots.shape[:2]):
        raise ValueError(f"tables.persistent_count must be an int tensor of shape "
                         f"{tuple(tables.persistent_slots.shape[:2])} (batch, KV heads), got "
                         f"{tuple(pc.shape) if isinstance(pc, torch.Tensor) else type(pc).__name__}")
    hi = min(s.capacity, tables.persistent_slots.shape[-1])
    bad = (pc < 0) | (pc > hi)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"tables.persistent_count[{', '.join(map(str, idx))}] = "
                         f"{int(pc[tuple(idx)])}: expected a count in [0, {hi}] (the pattern's "
                         f"capacity is {s.capacity})")


def _check_step_inputs(s: Schedule, q, k, v, tables: BlockTables) -> None:
    lay = s.layout
    n = lay.chunk_blocks * lay.block_tokens
    B = tables.batch
    for name, x, heads in (("q", q, s.num_heads), ("k", k, s.num_kv_heads), ("v", v, s.num_kv_heads)):
        want = (B, heads, n, s.head_dim)
        if tuple(x.shape) != want:
            raise ValueError(f"{name}.shape = {tuple(x.shape)}: expected {want} "
                             "(batch, heads, chunk tokens in tile-major layout, head_dim)")
        if x.device != tables.k_pool.device:
            raise ValueError(f"{name}.device = {x.device} but the cache is on {tables.k_pool.device}")
        if x.dtype != tables.k_pool.dtype:
            raise ValueError(f"{name}.dtype = {x.dtype} but the cache holds {tables.k_pool.dtype}")


def triton_program(schedule: Schedule, **options) -> PBSAProgram:
    return PBSAProgram(schedule, backend="triton", **options)


def torch_program(schedule: Schedule, **options) -> PBSAProgram:
    return PBSAProgram(schedule, backend="torch", **options)
