"""Render plain, readable Triton source for one `AttentionKernelSpec` from the templates.

The kernels live as Jinja2 files in codegen/attention/templates/, written as the Triton
they become (the glossary of the generated module is in header.py.jinja):

    header.py.jinja         cache-key line, glossary, imports, the spec's tl.constexpr sizes
    helpers.py.jinja        shared @triton.jit helpers (online softmax, tile loads, segments)
    forward.py.jinja        pbsa_fwd_kernel, pbsa_fwd_combine_kernel
    backward_dq.py.jinja    DELTA preprocess, dQ convert, pbsa_bwd_dq_kernel
    backward_dkdv.py.jinja  dK/dV over the transposed schedule: ordered, fused, atomic dQ

The module is those five rendered in that order, two blank lines apart. Context: `variant`
("ptr" plain pointer loads | "desc" tl.make_tensor_descriptor, TMA on Hopper),
`has_padding` (token masks compiled in), `current` ("dense" | "causal"), `dtype`, the sizes
BT D H HKV G C NB NQB MAXV, `PREC` (IEEE fp32 dots for float32 specs), and the header's
`key` and `generator`. Everything the spec fixes becomes a module-level `tl.constexpr`, so
each rendered module is specialised code. Rendering settings: codegen/_templates.py (a
missing variable is an error).

`TEMPLATE_HASH` hashes the template files (names and bytes); the kernel cache's key
includes it, so editing a template re-renders the cached kernels.
"""

from __future__ import annotations

from pathlib import Path

from .._templates import render, templates_hash
from .kernel_spec import AttentionKernelSpec

GENERATOR_VERSION = "pbsa-attn-4"

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = ("header.py.jinja", "helpers.py.jinja", "forward.py.jinja", "backward_dq.py.jinja",
             "backward_dkdv.py.jinja")

# edits to the templates change the cache key (no stale kernels after a template change)
TEMPLATE_HASH = templates_hash(TEMPLATE_DIR)


def render_attention_source(spec: AttentionKernelSpec, variant: str, key: str = "") -> str:
    """Return the full Triton module source for `spec` with `variant` loads ("ptr"|"desc")."""
    if variant not in ("ptr", "desc"):
        raise ValueError(f"variant = {variant!r} must be 'ptr' or 'desc'")
    context = {
        "key": key or "(unkeyed)",
        "generator": GENERATOR_VERSION,
        "variant": variant,
        "has_padding": spec.has_padding,
        "current": spec.current,
        "dtype": spec.dtype,
        "BT": spec.block_tokens,
        "D": spec.head_dim,
        "H": spec.num_heads,
        "HKV": spec.num_kv_heads,
        "G": spec.group_size,
        "C": spec.chunk_frames,
        "NB": spec.blocks_per_frame,
        "NQB": spec.num_query_blocks,
        "MAXV": spec.max_cached_visits,
        # fp32 specs are the exactness path: keep the dots in IEEE fp32 (no tf32)
        "PREC": ', input_precision="ieee"' if spec.dtype == "float32" else "",
    }
    parts = [render(TEMPLATE_DIR, name, **context).strip("\n") for name in TEMPLATES]
    return "\n\n\n".join(parts) + "\n"
