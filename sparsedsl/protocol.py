"""The program protocol: what `sd.compile` returns, whatever the backend.

Every backend's program (the float64 `reference`, codegen's `triton` and `torch`, a third
party's) has the members of `Program`, and its `new_cache` returns a `Cache`, so switching
`backend=` changes no other line of user code:

    program = sd.compile(pattern, num_heads=H, head_dim=D, dtype="float32", backend=name)
    cache = program.new_cache(batch=B, num_layers=L, device=device, dtype=torch.float32)
    for q, k, v in chunks:                                 # one AR step per chunk
        for layer in range(L):                             # denoising passes: attention only
            out, lse = program.attention(q, k, v, cache.tables(layer))
            cache.commit(layer, q, k, v)                   # the clean pass (k after RoPE)
        # after the last layer's commit, cache.step has advanced by one

Tensors are tile-major (`VideoLayout.to_tile_major`, one chunk of `chunk_frames` frames):
q is [B, H, chunk_blocks * block_tokens, head_dim], k and v are [B, H_kv, same, head_dim],
in the cache's dtype and on its device. `attention` returns out [B, H, tokens, head_dim] in
q's dtype and lse [B, H, tokens] in float32 (float64 for float64 inputs), both on q's device;
padded query rows give out 0 and lse -inf. Errors in arguments raise ValueError before
anything changes.

`sd.compile` checks the members (`missing_members`) and raises BackendError naming the
backend and what it lacks. A backend may offer more (PBSAProgram: `source`,
`to_block_mask`, `property_check`, `draw_memory`; RolloutCache: `describe`, `snapshot`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from .errors import BackendError
from .schedule import Schedule

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Cache(Protocol):
    """The K/V of one rollout, for every layer: what `program.new_cache(...)` returns.

    Every layer commits once per AR step, in any order; `step` (chunks committed by every
    layer) advances after the last one. A layer that has committed the current step refuses
    `tables()` and a second `commit` (ValueError) until the others have.
    """

    step: int                  # AR steps committed by every layer
    batch: int
    num_layers: int
    device: "torch.device"
    dtype: "torch.dtype"       # of the chunks committed and attended

    def tables(self, layer: int) -> Any:
        """What `program.attention` reads for `layer` at the current step (backend-specific;
        valid until that layer's next commit)."""

    def attention(self, layer: int, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor",
                  **kwargs) -> tuple["torch.Tensor", "torch.Tensor"]:
        """`program.attention(q, k, v, self.tables(layer), **kwargs)`."""

    def commit(self, layer: int, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor") -> None:
        """The clean pass of the current chunk in `layer`: store its K/V and run the memory
        update (docs/design.md §2). Not differentiated."""

    def state_dict(self) -> dict:
        """Everything needed to resume the rollout bit for bit (a copy; torch.save-able)."""

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` of a cache made with the same arguments; ValueError
        (cache unchanged) if the state does not fit."""

    def nbytes(self) -> int:
        """Bytes of K/V memory the cache holds (allocated pools, or the blocks held now)."""


@runtime_checkable
class Program(Protocol):
    """A compiled pattern: the schedule plus whatever runs it (`sd.compile`)."""

    schedule: Schedule
    backend: str               # the name it runs under ("reference", "torch", "triton", ...)

    def explain(self, **kwargs) -> str:
        """The schedule's report (`sparsedsl.explain.explain`, kwargs passed on)."""

    def new_cache(self, batch: int = 1, num_layers: int = 1, device: Any = "cpu",
                  dtype: Any = None, max_frames: Optional[int] = None) -> Cache:
        """An empty rollout cache at step 0. `dtype` None: the schedule's dtype where the
        backend runs it (else float32). `max_frames`: frames the rollout will generate at
        most (bounds an unbounded window; a commit that would hold more blocks than
        `max_frames` frames need raises ValueError)."""

    def attention(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", tables: Any,
                  *, validate: Optional[bool] = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """One AR step of the chunk (q, k, v) against `tables = cache.tables(layer)`:
        (out, lse), see the module docstring for shapes and dtypes. Differentiable in q, k
        and v. `validate=False` skips the checks that need a host synchronisation, `True`
        runs them; None (the default) runs them unless the tables come unchanged from the
        program's own cache."""


class CacheStepRules:
    """The rules every cache of the protocol enforces, written once (the reference backend's
    ReferenceCache and codegen's RolloutCache both inherit them): a layer is an integer in
    [0, num_layers); each layer reads the tables of, and commits, the current chunk once;
    a commit's q/k/v have the chunk's shape, the cache's dtype and device; the arguments of
    `new_cache` are checked alike (`_set_geometry`). Subclasses also hold `layers` (one state
    per layer, each with its own `.step`), `step` and `dtype`."""

    def _set_geometry(self, program, batch, num_layers, device, max_frames) -> None:
        """Check and keep the arguments every `new_cache` takes (dtype is the backend's own)."""
        import torch

        for name, value in (("batch", batch), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r}: expected an integer >= 1")
        if max_frames is not None and (isinstance(max_frames, bool) or
                                       not isinstance(max_frames, int) or max_frames < 1):
            raise ValueError(f"max_frames = {max_frames!r}: expected None or an integer >= 1 "
                             "(latent frames the rollout will generate)")
        self.program, self.schedule = program, program.schedule
        self.batch, self.num_layers, self.max_frames = batch, num_layers, max_frames
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _layer(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.layers):
            raise ValueError(f"layer = {layer!r}: expected an integer in [0, {len(self.layers)})")
        return self.layers[layer]

    def pending_layers(self) -> list[int]:
        """Layers that have not committed the current step yet."""
        return [i for i, state in enumerate(self.layers) if state.step == self.step]

    def _uncommitted(self, layer, reading_tables: bool = False):
        """The state of `layer`, which must not have committed the current chunk yet."""
        state = self._layer(layer)
        if state.step != self.step:
            if reading_tables:
                raise ValueError(f"layer {layer} has already committed chunk {self.step}; its "
                                 f"tables now describe step {state.step}. Commit the other "
                                 f"layers {self.pending_layers()} to finish step {self.step} first")
            raise ValueError(f"layer {layer} has already committed chunk {self.step}: a chunk is "
                             f"committed once per layer; the layers {self.pending_layers()} "
                             "still have to commit it")
        return state

    @staticmethod
    def _check_loaded_steps(step: int, layer_steps: list) -> None:
        """load_state_dict: every layer is at `step` (not committed yet) or `step + 1`
        (committed), and at least one has not committed."""
        if not set(layer_steps) <= {step, step + 1} or step not in layer_steps:
            raise ValueError(f"load_state_dict: layer steps {layer_steps} do not fit step {step}: "
                             f"every layer is at step {step} (not committed yet) or {step + 1} "
                             "(committed), and at least one has not committed")

    def _check_chunk_tensors(self, q, k, v) -> None:
        import torch

        s = self.schedule
        n = s.layout.chunk_blocks * s.layout.block_tokens
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


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of `protocol` that `obj` lacks (methods must be callable)."""
    missing = []
    for name in _members(protocol):
        if not hasattr(obj, name):
            missing.append(name)
        elif name in _methods(protocol) and not callable(getattr(obj, name)):
            missing.append(f"{name} (not callable)")
    return missing


def check_program(program: object, backend: str) -> None:
    """BackendError unless `program` (what backend `backend` built) has every Program member."""
    missing = missing_members(program, Program)
    if missing:
        raise BackendError(f"backend '{backend}' returned a {type(program).__name__}, which does "
                           f"not follow the program protocol (sparsedsl.Program): missing "
                           f"{', '.join(missing)}. See sparsedsl/protocol.py")


def _methods(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


def _members(protocol: type) -> list[str]:
    return list(getattr(protocol, "__annotations__", {})) + _methods(protocol)


__all__ = ["Program", "Cache", "CacheStepRules", "missing_members", "check_program"]
