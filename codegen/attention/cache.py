"""On-disk kernel cache: render once, write atomically, import with importlib.

Key = sha256 over (generator version, the template files' hash `render.TEMPLATE_HASH`,
spec fields, load variant, torch and triton versions): editing a template re-renders. The
file `pbsa_attn_<key>.py` lives in the cache directory
(`$SPARSEDSL_KERNEL_CACHE`, else `~/.cache/sparsedsl/kernels`). Its first line
names the key; a file whose first line does not match is re-rendered, and so is a file
with the right key line that fails to import (cut short after it, say).

Within a process, loaded modules are kept in a dict keyed by (spec, variant):
a second load is one dict lookup (no hashing of versions, no file access).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from .kernel_spec import AttentionKernelSpec
from .render import GENERATOR_VERSION, TEMPLATE_HASH, render_attention_source

_LOADED: dict[tuple[AttentionKernelSpec, str], ModuleType] = {}
_LOCK = threading.Lock()
STATS = {"renders": 0, "disk_loads": 0}


def cache_dir() -> Path:
    env = os.environ.get("SPARSEDSL_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~")) / ".cache" / "sparsedsl" / "kernels"


def _versions() -> dict:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def kernel_key(spec: AttentionKernelSpec, variant: str) -> str:
    payload = {
        "generator": GENERATOR_VERSION,
        "templates": TEMPLATE_HASH,
        "spec": spec.as_dict(),
        "variant": variant,
        **_versions(),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def kernel_path(spec: AttentionKernelSpec, variant: str) -> Path:
    return cache_dir() / f"pbsa_attn_{kernel_key(spec, variant)}.py"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _first_line(path: Path) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def write_and_import(path: Path, marker: str, render, module_name: str) -> tuple[ModuleType, bool]:
    """Import the generated module at `path`, first writing `render()` there (atomically)
    unless the file already starts with `marker`. Returns (module, whether it was rendered)."""
    rendered = _first_line(path) != marker
    if rendered:
        _atomic_write(path, render())
    try:
        return _import(path, module_name), rendered
    except Exception:
        if rendered:
            raise  # freshly rendered and still broken: a generator bug, not a stale file
    # the file starts with the key but does not import (cut short by a crash or a full disk,
    # edited by hand): render it again, atomically, and import the new file
    _atomic_write(path, render())
    return _import(path, module_name), True


def _import(path: Path, module_name: str) -> ModuleType:
    ispec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(ispec)
    sys.modules[module_name] = module  # Triton and inspect look modules up by name
    try:
        ispec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_attention_kernels(spec: AttentionKernelSpec, variant: str = "ptr") -> ModuleType:
    """The generated module for (spec, variant); renders and writes it only on a cache miss."""
    mod = _LOADED.get((spec, variant))
    if mod is not None:
        return mod
    with _LOCK:
        mod = _LOADED.get((spec, variant))
        if mod is not None:
            return mod
        key = kernel_key(spec, variant)
        path = cache_dir() / f"pbsa_attn_{key}.py"
        mod, rendered = write_and_import(
            path, f"# sparsedsl-kernel-key: {key}",
            lambda: render_attention_source(spec, variant, key=key),
            f"sparsedsl_kernels.pbsa_attn_{key}")
        STATS["renders" if rendered else "disk_loads"] += 1
        mod.KERNEL_KEY = key
        mod.KERNEL_PATH = str(path)
        _LOADED[(spec, variant)] = mod
        return mod


def kernel_source(spec: AttentionKernelSpec, variant: str = "ptr") -> str:
    """The generated Triton source text (as cached on disk)."""
    return Path(load_attention_kernels(spec, variant).KERNEL_PATH).read_text()


def clear_memory_cache() -> None:
    """Forget loaded modules (the disk cache stays); for tests."""
    with _LOCK:
        _LOADED.clear()
