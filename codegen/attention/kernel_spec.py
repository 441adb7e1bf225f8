"""The frozen contract between the schedule lowering and the attention kernels.

`AttentionKernelSpec` holds everything the generated Triton source is
specialised on (the compile-time shape of one AR step); `KernelConfig` holds
the tuning knobs (tile sizes, warps, loads through tensor descriptors or plain
pointers) that do not change the math.

Both are frozen and hashable: the spec (plus the load variant) keys the kernel
cache, the config only picks launch parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("float16", "bfloat16", "float32")
CURRENT_MODES = ("dense", "causal")
VARIANTS = ("ptr", "desc")
BWD_DQ_MODES = ("ordered", "atomic")


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_int(name: str, value, lo: int, hi: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"AttentionKernelSpec.{name} = {value!r} must be an int{hint}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"AttentionKernelSpec.{name} = {value!r} must be {rng}{hint}")


@dataclass(frozen=True)
class AttentionKernelSpec:
    """Compile-time description of one PBSA attention call.

    Tensor shapes it implies (B is the runtime batch, NSLOTS the runtime pool size):
      q, o:            [B, num_heads, NQB, block_tokens, head_dim]
      k_cur, v_cur:    [B, num_kv_heads, NQB, block_tokens, head_dim]
      k_pool, v_pool:  [B, num_kv_heads, NSLOTS, block_tokens, head_dim]
      visit_slots:     [B, num_heads, NQB, max_cached_visits] int32
      visit_count:     [B, num_heads, NQB] int32
    with NQB = chunk_frames * blocks_per_frame query blocks, frame-major.
    """

    block_tokens: int  # BT = th*tw tokens per block (power of two >= 16; pad tiles up)
    head_dim: int  # D, power of two in [16, 256]
    num_heads: int  # H (query heads)
    num_kv_heads: int  # HKV; query head h reads kv head h // (H // HKV)
    dtype: str  # "float16" | "bfloat16" | "float32"
    chunk_frames: int  # c
    blocks_per_frame: int  # nb
    current: str  # "dense" | "causal"
    max_cached_visits: int  # MAXV, width of the visit table
    has_padding: bool  # False: every block holds BT real tokens, masks are compiled out

    def __post_init__(self) -> None:
        bt = self.block_tokens
        _check_int("block_tokens", bt, 16, 1024)
        if not _is_pow2(bt):
            up = 1 << (bt - 1).bit_length()
            raise ValueError(
                f"AttentionKernelSpec.block_tokens = {bt} must be a power of two >= 16 "
                f"(pad the tile's th*tw tokens up to {up} and mark the rest as padding)"
            )
        _check_int("head_dim", self.head_dim, 16, 256)
        if not _is_pow2(self.head_dim):
            raise ValueError(
                f"AttentionKernelSpec.head_dim = {self.head_dim} must be a power of two in [16, 256]"
            )
        _check_int("num_heads", self.num_heads, 1)
        _check_int("num_kv_heads", self.num_kv_heads, 1)
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"AttentionKernelSpec.num_heads = {self.num_heads} must be a multiple of "
                f"num_kv_heads = {self.num_kv_heads} (grouped-query attention)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"AttentionKernelSpec.dtype = {self.dtype!r} must be one of {DTYPES}")
        _check_int("chunk_frames", self.chunk_frames, 1)
        _check_int("blocks_per_frame", self.blocks_per_frame, 1)
        if self.current not in CURRENT_MODES:
            raise ValueError(
                f"AttentionKernelSpec.current = {self.current!r} must be one of {CURRENT_MODES}"
            )
        _check_int("max_cached_visits", self.max_cached_visits, 0)
        if not isinstance(self.has_padding, bool):
            raise ValueError(
                f"AttentionKernelSpec.has_padding = {self.has_padding!r} must be a bool"
            )

    # derived sizes -------------------------------------------------------
    @property
    def num_query_blocks(self) -> int:
        """NQB: query blocks (and current-chunk key blocks) per head."""
        return self.chunk_frames * self.blocks_per_frame

    @property
    def group_size(self) -> int:
        """G: query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def current_blocks_visible(self, query_block: int) -> int:
        """How many current-chunk blocks (a prefix [0, n)) query block `query_block` sees."""
        if self.current == "dense":
            return self.num_query_blocks
        frame = query_block // self.blocks_per_frame
        return (frame + 1) * self.blocks_per_frame

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class KernelConfig:
    """Launch/tuning parameters; they never change the math.

    variant: "ptr" (plain pointer loads; works in the interpreter) or
             "desc" (tl.make_tensor_descriptor loads, TMA on Hopper).
    fwd_kv_splits: split each query block's visit list over this many programs
             and merge the partial softmaxes (fills the last wave of SMs);
             0 = choose from the SM count.
    fwd_overlap / dq_overlap / dkdv_overlap: loop orders that let the softmax (or dS)
             work run while a matmul is in flight (see codegen/attention/templates/helpers.py.jinja).
    """

    variant: str = "ptr"
    warp_specialize: bool = False
    fwd_block_m: int = 64
    fwd_block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 2
    fwd_kv_splits: int = 1
    dq_block_m: int = 64
    dq_block_n: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    dkdv_block_m: int = 64
    dkdv_block_n: int = 64
    dkdv_warps: int = 4
    dkdv_stages: int = 2
    bwd_warp_specialize: bool = False
    bwd_fused: bool = False  # dQ and dK/dV programs in one launch (after a DELTA pre-pass)
    # software-pipelined loops that overlap the softmax / dS work with a matmul in flight
    # (Hopper wgmma); False = the straight loops
    fwd_overlap: bool = True
    dq_overlap: bool = True
    dkdv_overlap: bool = True
    bwd_variant: str = ""  # load variant of the backward kernels; "" = same as `variant`
    # "ordered": dQ in its own programs, summed in visit order (bitwise reproducible, 7 block
    # matmuls per pair); "atomic": dQ added with fp32 atomics from the dK/dV programs (5 block
    # matmuls per pair; the summation order varies). The launcher uses "ordered" whenever
    # torch.use_deterministic_algorithms(True) is on. The atomic kernel takes the dkdv_* tiles.
    bwd_dq: str = "ordered"
    # the Gluon forwards (gluon_forward.py, FA3-style warp specialisation) where they
    # apply: sm_90, bf16/fp16, head dim 128, unpadded 128-token or any 64-token blocks, no
    # explicit KV splits (gluon_forward.supported)
    fwd_gluon: bool = False
    # atomic dQ adds as TMA bulk reductions instead of per-element atomics (with "desc" loads only)
    dq_atomic_tma: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"KernelConfig.variant = {self.variant!r} must be one of {VARIANTS}")
        if self.bwd_dq not in BWD_DQ_MODES:
            raise ValueError(f"KernelConfig.bwd_dq = {self.bwd_dq!r} must be one of {BWD_DQ_MODES}")
        if self.bwd_variant not in ("",) + VARIANTS:
            raise ValueError(f"KernelConfig.bwd_variant = {self.bwd_variant!r} must be '' or one of {VARIANTS}")
        for f in dataclasses.fields(self):
            if f.name.endswith(("block_m", "block_n")):
                v = getattr(self, f.name)
                if not (isinstance(v, int) and _is_pow2(v) and v >= 16):
                    raise ValueError(f"KernelConfig.{f.name} = {v!r} must be a power of two >= 16")
        if not isinstance(self.fwd_kv_splits, int) or not 0 <= self.fwd_kv_splits <= 16:
            raise ValueError(
                f"KernelConfig.fwd_kv_splits = {self.fwd_kv_splits!r} must be an int in [0, 16] "
                "(0 = automatic)"
            )

    def fitted(self, spec: AttentionKernelSpec) -> "KernelConfig":
        """Clamp tile sizes to the block size of `spec` (tiles never straddle blocks)."""
        bt = spec.block_tokens
        changes = {
            f.name: min(getattr(self, f.name), bt)
            for f in dataclasses.fields(self)
            if f.name.endswith(("block_m", "block_n"))
        }
        return dataclasses.replace(self, **changes)

    def replace(self, **kw) -> "KernelConfig":
        return dataclasses.replace(self, **kw)
