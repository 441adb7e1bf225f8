"""The built-in backend: a program that runs the float64 reference (always available).

It follows the program protocol (sparsedsl/protocol.py) like the generated kernels do, so
`backend="reference"` runs the same user code, slowly and exactly:

    program = sd.compile(pattern, num_heads=2, head_dim=8, dtype="float32", backend="reference")
    cache = program.new_cache(batch=1, num_layers=2)        # a ReferenceCache
    out, lse = program.attention(q, k, v, cache.tables(layer))
    cache.commit(layer, q, k, v)

Inputs may be of any float dtype (the cache's) and on any device; the reference computes in
float64 on the CPU and returns out in q's dtype and lse in float32 (float64 for float64
inputs) on q's device, as the kernels do. `reference.attention` / `reference.commit` over a
`RolloutState` stay the lower-level oracle API (float64 results, no cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import reference
from .explain import explain
from .protocol import CacheStepRules
from .schedule import Schedule

FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class ReferenceTables:
    """What `ReferenceCache.tables(layer)` returns: the layer's `reference.RolloutState` at the
    current step, tagged with the cache it came from (checked by `ReferenceProgram.attention`)."""

    state: reference.RolloutState
    schedule_key: str
    layer: int
    dtype: torch.dtype
    device: torch.device

    @property
    def step(self) -> int:
        return self.state.step


class ReferenceProgram:
    """A compiled pattern executed by the float64 reference: slow, exact, for checking."""

    backend = "reference"
    source = None  # nothing is generated

    def __init__(self, schedule: Schedule, **_options):
        self.schedule = schedule

    def explain(self, **kwargs) -> str:
        return explain(self.schedule, **kwargs)

    def new_cache(self, batch: int = 1, num_layers: int = 1, device="cpu", dtype=None,
                  max_frames: Optional[int] = None) -> "ReferenceCache":
        """A ReferenceCache: per layer a `reference.RolloutState` (float64, on the CPU).
        `dtype` None: the schedule's dtype. See `sparsedsl.protocol.Program.new_cache`."""
        return ReferenceCache(self, batch=batch, num_layers=num_layers, device=device,
                              dtype=dtype, max_frames=max_frames)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables,
                  validate: Optional[bool] = None, scale: Optional[float] = None):
        """One AR step: (out [B, H, tokens, D] in q's dtype, lse [B, H, tokens] float32, or
        float64 for float64 q), on q's device, differentiable. `tables`: `cache.tables(layer)`,
        or a bare `reference.RolloutState`. The reference checks everything whatever
        `validate` says; `scale` (reference only) replaces 1/sqrt(head_dim)."""
        if isinstance(q, reference.RolloutState):
            raise ValueError("ReferenceProgram.attention(state, q, k, v) is now "
                             "attention(q, k, v, tables) as for every backend: tables = "
                             "program.new_cache(...).tables(layer), or a reference.RolloutState "
                             "passed last")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(tables, ReferenceTables):
            if tables.schedule_key != self.schedule.key:
                raise ValueError(f"these tables belong to a cache of schedule "
                                 f"{tables.schedule_key}, not to {self!r}; make the cache with "
                                 "this program's new_cache()")
            for name, x in (("q", q), ("k", k), ("v", v)):
                if x.device != tables.device:
                    raise ValueError(f"{name}.device = {x.device} but the cache is on "
                                     f"{tables.device}")
                if x.dtype != tables.dtype:
                    raise ValueError(f"{name}.dtype = {x.dtype} but the cache holds {tables.dtype}")
            state = tables.state
        elif isinstance(tables, reference.RolloutState):
            state = tables
        else:
            raise ValueError("tables must be the tables of program.new_cache(...).tables(layer) "
                             "(or a reference.RolloutState), got "
                             f"{'None' if tables is None else type(tables).__name__}")
        cpu = torch.device("cpu")
        out, lse, _ = reference.attention(self.schedule, state, q.to(cpu), k.to(cpu), v.to(cpu),
                                          scale)
        return (out.to(device=q.device, dtype=q.dtype),
                lse.to(device=q.device, dtype=torch.promote_types(q.dtype, torch.float32)))

    def __repr__(self) -> str:
        return f"ReferenceProgram({self.schedule.pattern_name}, key={self.schedule.key})"


class ReferenceCache(CacheStepRules):
    """The rollout cache of the reference backend (sparsedsl.protocol.Cache): one
    `reference.RolloutState` per layer, updated by `reference.commit`. It keeps the same step
    protocol and raises the same ValueErrors as codegen's RolloutCache; K/V are held in float64
    on the CPU (the values of the cache's dtype, exactly)."""

    backend = "reference"

    def __init__(self, program: ReferenceProgram, batch: int = 1, num_layers: int = 1,
                 device="cpu", dtype=None, max_frames: Optional[int] = None):
        self._set_geometry(program, batch, num_layers, device, max_frames)
        s = self.schedule
        self.dtype = self._resolve_dtype(dtype)
        self.layers = [reference.new_state(s, batch) for _ in range(num_layers)]
        self.step = 0
        self._max_blocks = None
        if max_frames is not None:  # blocks per KV head a cache for max_frames frames holds
            c = s.chunk_frames
            self._max_blocks = _kv_blocks(s, -(-max_frames // c) * c)

    def _resolve_dtype(self, dtype) -> torch.dtype:
        if dtype is None:
            dtype = self.schedule.dtype
        if isinstance(dtype, str) and dtype in _DTYPES:
            return _DTYPES[dtype]
        if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"dtype = {dtype!r}: the reference backend takes one of {sorted(_DTYPES)}")

    # --- the protocol ---------------------------------------------------------------------
    def tables(self, layer: int) -> ReferenceTables:
        """The layer's state at the current step (what ReferenceProgram.attention reads)."""
        state = self._uncommitted(layer, reading_tables=True)
        return ReferenceTables(state, self.schedule.key, layer, self.dtype, self.device)

    def attention(self, layer: int, q, k, v, **kwargs):
        """`program.attention(q, k, v, self.tables(layer), **kwargs)`."""
        return self.program.attention(q, k, v, self.tables(layer), **kwargs)

    def commit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`reference.commit` of the current chunk in `layer` (not differentiated); the cache
        advances after the last layer's commit."""
        s = self.schedule
        state = self._uncommitted(layer)
        self._check_chunk_tensors(q, k, v)
        if self._max_blocks is not None:
            need = _kv_blocks(s, (state.step + 1) * s.chunk_frames)
            if need > self._max_blocks:
                raise ValueError(
                    f"commit: chunk {state.step} would hold {need} blocks per KV head but the "
                    f"cache was made for max_frames = {self.max_frames} ({self._max_blocks} "
                    "blocks); make the cache with a larger max_frames")
        cpu = torch.device("cpu")
        with torch.no_grad():
            self.layers[layer] = reference.commit(s, state, *(x.detach().to(cpu) for x in (q, k, v)))
        if not self.pending_layers():
            self.step += 1

    def nbytes(self) -> int:
        """Bytes of the K/V blocks held now (every layer), counted in the cache's dtype."""
        return sum(st.nbytes(_dtype_name(self.dtype)) for st in self.layers)

    # --- save / load ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every layer's state as tensors (copies): held blocks [n, 3] (batch, KV head, block)
        with their K and V [n, BT, D] float64, persistent blocks [m, 3] with their scores."""
        layers = []
        for st in self.layers:
            held = [(b, g, kb) for (b, g), blocks in sorted(st.kv.items()) for kb in sorted(blocks)]
            kv = [st.kv[(b, g)][kb] for b, g, kb in held]
            pers = [(b, g, kb) for (b, g), ps in sorted(st.persistent.items()) for kb in sorted(ps)]
            layers.append({
                "step": st.step,
                "blocks": torch.tensor(held, dtype=torch.int64).reshape(-1, 3),
                "k": self._stack([x[0] for x in kv]), "v": self._stack([x[1] for x in kv]),
                "persistent": torch.tensor(pers, dtype=torch.int64).reshape(-1, 3),
                "scores": torch.tensor([st.persistent[(b, g)][kb] for b, g, kb in pers],
                                       dtype=torch.float64)})
        return {"format": FORMAT_VERSION, "backend": "reference", "schedule_key": self.schedule.key,
                "pattern": self.schedule.pattern_name, "batch": self.batch,
                "num_layers": self.num_layers, "dtype": _dtype_name(self.dtype),
                "max_frames": self.max_frames, "step": self.step, "layers": layers}

    def _stack(self, blocks: list) -> torch.Tensor:
        lay = self.schedule.layout
        if not blocks:
            return torch.zeros(0, lay.block_tokens, self.schedule.head_dim, dtype=torch.float64)
        return torch.stack(blocks).clone()

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; ValueError (cache unchanged) if it does not fit: another
        pattern or cache size, or layer states whose blocks are not those the rollout holds."""
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION \
                or state.get("backend") != "reference":
            raise ValueError("load_state_dict: not a ReferenceCache state dict of format "
                             f"{FORMAT_VERSION}")
        s = self.schedule
        if state.get("schedule_key") != s.key:
            raise ValueError(f"load_state_dict: the state belongs to pattern "
                             f"'{state.get('pattern')}' (schedule {state.get('schedule_key')}), "
                             f"this cache to '{s.pattern_name}' (schedule {s.key})")
        for name in ("batch", "num_layers", "max_frames"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"load_state_dict: state has {name} = {state.get(name)}, this "
                                 f"cache {getattr(self, name)}")
        if state.get("dtype") != _dtype_name(self.dtype):
            raise ValueError(f"load_state_dict: state has dtype {state.get('dtype')}, this cache "
                             f"{self.dtype}")
        entries = state.get("layers")
        if not isinstance(entries, list) or len(entries) != self.num_layers:
            raise ValueError(f"load_state_dict: state has "
                             f"{len(entries) if isinstance(entries, list) else entries!r} layers, "
                             f"this cache {self.num_layers}")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"load_state_dict: step = {step!r}: expected an integer >= 0")
        try:
            layers = [self._layer_from_state(i, entry) for i, entry in enumerate(entries)]
        except KeyError as exc:
            raise ValueError(f"load_state_dict: the state misses {exc}") from None
        self._check_loaded_steps(step, [st.step for st in layers])
        self.layers, self.step = layers, step

    def _layer_from_state(self, i: int, entry: dict) -> reference.RolloutState:
        s = self.schedule
        lay = s.layout
        where = f"load_state_dict: layer {i}"
        step = entry["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where} step = {step!r}: expected an integer >= 0")
        blocks, k, v = entry["blocks"], entry["k"], entry["v"]
        pers, scores = entry["persistent"], entry["scores"]
        n, m = _rows(where, "blocks", blocks), _rows(where, "persistent", pers)
        for name, t, shape in (("k", k, (n, lay.block_tokens, s.head_dim)),
                               ("v", v, (n, lay.block_tokens, s.head_dim)),
                               ("scores", scores, (m,))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape \
                    or t.dtype != torch.float64:
                got = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"{where} {name} is {got}, expected {shape} torch.float64")
        new = reference.new_state(s, self.batch)
        new.step = step
        for row, (b, g, kb) in enumerate(blocks.tolist()):
            self._check_key(where, "blocks", row, b, g)
            if kb in new.kv[(b, g)]:
                raise ValueError(f"{where} blocks[{row}] = ({b}, {g}, {kb}): block held twice")
            new.kv[(b, g)][kb] = (k[row].clone(), v[row].clone())
        for row, ((b, g, kb), score) in enumerate(zip(pers.tolist(), scores.tolist())):
            self._check_key(where, "persistent", row, b, g)
            new.persistent[(b, g)][kb] = score
        # what the rollout holds at this step: sink, window and the persistent set
        nb, c = lay.blocks_per_frame, lay.chunk_frames
        w_start, w_end = s.window_frames_range(step)
        sink = set(range(min(s.sink_frames, step * c) * nb))
        window = set(range(w_start * nb, w_end * nb))
        if s.update is None or s.window.frames is None:
            n_pers = 0
        else:
            n_pers = min(s.capacity, max(0, step * c - s.window.frames - s.sink_frames) * nb)
        for (b, g), members in new.persistent.items():
            if len(members) != n_pers or set(members) & (sink | window) \
                    or any(not 0 <= kb < w_start * nb for kb in members):
                raise ValueError(f"{where} persistent set of (batch {b}, KV head {g}) = "
                                 f"{sorted(members)}: expected {n_pers} blocks evicted from the "
                                 f"window before step {step} (frames before {w_start}, past the "
                                 f"sink)")
            held = set(new.kv[(b, g)])
            want = sink | window | set(members)
            if held != want:
                raise ValueError(f"{where} blocks held for (batch {b}, KV head {g}) = "
                                 f"{sorted(held)}: at step {step} the cache holds the sink, "
                                 f"window and persistent blocks {sorted(want)}")
        return new

    def _check_key(self, where: str, name: str, row: int, b: int, g: int) -> None:
        if not (0 <= b < self.batch and 0 <= g < self.schedule.num_kv_heads):
            raise ValueError(f"{where} {name}[{row}] = ({b}, {g}, ...): batch index in "
                             f"[0, {self.batch}) and KV head in [0, {self.schedule.num_kv_heads}) "
                             "expected")

    def __repr__(self) -> str:
        return (f"ReferenceCache({self.schedule.pattern_name}, step={self.step}, "
                f"layers={self.num_layers}, batch={self.batch}, dtype={_dtype_name(self.dtype)}, "
                f"device={self.device})")


def _rows(where: str, name: str, t) -> int:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != 3 \
            or t.dtype != torch.int64:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where} {name} is {got}, expected [n, 3] torch.int64 "
                         "(batch, KV head, block)")
    return t.shape[0]


def _kv_blocks(schedule: Schedule, frames: int) -> int:
    """Blocks held per KV head after `frames` committed frames (the sympy formula)."""
    from .shapes import T
    return int(schedule.shapes.kv_blocks.subs(T, frames))
