"""Probe: how much of the forward's time is the softmax's exp2 (GPU experiment, not a test).

    cd /work/main && PYTHONPATH=. python3 bench/fwd_probe.py

Renders the generated forward for the paper's profile point (25% local density, 128-token
blocks, bf16), rewrites the line that computes P = exp2(S - m) in a few ways, and times each
variant on identical inputs:

- baseline:   P = exp2(x) on the MUFU unit (what the generator emits);
- no-exp:     P = x (wrong values; the upper bound of any exp2 speed-up);
- fma-exp:    P = 2^x from a degree-3 polynomial on the FMA pipe (FA4's trick), every element;
- split-exp:  even columns on MUFU, odd columns by the polynomial (both pipes busy).

The variants' outputs are compared with the baseline (no-exp is expected to differ).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import torch
import triton

from codegen import cache as kcache
from codegen import launch
from codegen.autograd import pbsa_attention
from codegen.render import render_attention_source

sys.path.insert(0, os.path.dirname(__file__))
from gpu_attention import ARGN, bench_problem  # noqa: E402

POLY = '''

@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe: 2^floor(x) * p(frac), p a degree-3 fit (rel. err 1.3e-4)."""
    x = tl.maximum(x, -126.0)
    xi = tl.floor(x)
    f = x - xi
    p = 1.0 + f * (0.6954300196885351 + f * (0.22694011441316092 + f * 0.07738064009353081))
    bits = p.to(tl.int32, bitcast=True) + (xi.to(tl.int32) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_split(x):
    """Even columns through MUFU exp2, odd columns through the FMA polynomial."""
    BM: tl.constexpr = x.shape[0]
    BN: tl.constexpr = x.shape[1]
    xa, xb = tl.split(tl.reshape(x, [BM, BN // 2, 2]))
    return tl.reshape(tl.join(tl.math.exp2(xa), _exp2_fma(xb)), [BM, BN])
'''

TARGET = "p = tl.math.exp2(qk * qk_scale - m_new[:, None])"
VARIANTS = {
    "baseline": TARGET,
    "no-exp": "p = qk * qk_scale - m_new[:, None]",
    "fma-exp": "p = _exp2_fma(qk * qk_scale - m_new[:, None])",
    "split-exp": "p = _exp2_split(qk * qk_scale - m_new[:, None])",
}


def load_variant(spec, variant_name, tmpdir):
    src = render_attention_source(spec, "desc")
    assert TARGET in src, "the generated forward changed: update the probe"
    src = src.replace(TARGET, VARIANTS[variant_name])
    marker = "\n@triton.jit\ndef _softmax_update"
    src = src.replace(marker, POLY + marker, 1)
    path = os.path.join(tmpdir, f"probe_{variant_name.replace('-', '_')}.py")
    with open(path, "w") as f:
        f.write(src)
    mod_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def main():
    print(f"# forward exp2 probe on {torch.cuda.get_device_name()}, triton {triton.__version__}")
    spec, t, vis, n_pairs = bench_problem(0.25)
    flops = 4 * spec.block_tokens**2 * spec.head_dim * n_pairs
    args = [t[k] for k in ARGN]
    cfg = launch.default_config(spec, torch.device("cuda")).replace(fwd_kv_splits=2)
    ref = None
    real_loader = launch.load_attention_kernels
    print("| variant | fwd ms | TFLOP/s | rel. diff vs baseline |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in VARIANTS:
            try:
                mod = load_variant(spec, name, tmpdir)
                launch.load_attention_kernels = lambda s, v, _m=mod: _m
                fn = lambda: pbsa_attention(spec, *args, config=cfg, validate=False)  # noqa: E731
                o, _ = fn()
                ref = o if ref is None else ref
                diff = ((o.double() - ref.double()).norm() / ref.double().norm()).item()
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {diff:.1e} |", flush=True)
            except Exception as exc:
                print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]} | | |")
            finally:
                launch.load_attention_kernels = real_loader
    kcache.clear_memory_cache()


if __name__ == "__main__":
    main()
