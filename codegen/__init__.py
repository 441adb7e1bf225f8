"""sparsedsl code generation: schedule -> Triton source, kernel cache, launchers.

Rooms, by job; a room may import the rooms below it, never one above
(tests/test_import_graph.py: no import cycle, and nothing here imports `models`):

    program.py         a compiled pattern at run time: visit tables, select, attention, caches
    check.py           property checks of a program against the float64 reference
    memory/            the memory runtime: rollout cache, per-step plan, commit, update rule
    select.py          the fused select: representatives, window Top-K, block importance
    attention/         the attention kernels: spec, templates, kernel cache, launch, autograd
    _interp_compat.py  shims for Triton's CPU interpreter (imports nothing of codegen)
    _templates.py      Jinja2 settings of the kernel templates, and their hash (imports
                       nothing of codegen)

Entry points (imported lazily so that importing `codegen` never imports triton):
    codegen.attention.kernel_spec.AttentionKernelSpec, KernelConfig
    codegen.attention.autograd.pbsa_attention
    codegen.attention.torch_backend.attention
    codegen.program.PBSAProgram, codegen.memory.rollout_cache.RolloutCache

The flat module paths of before the rooms (`codegen.autograd`, `codegen.rollout_cache`, ...)
still import, as the same module objects, with a DeprecationWarning naming the new path.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .attention.kernel_spec import AttentionKernelSpec, KernelConfig

__all__ = ["AttentionKernelSpec", "KernelConfig"]

#: Old module (codegen.<name>) -> its room. `import codegen.<name>`, `from codegen.<name>
#: import X` and `codegen.<name>` give the module of the new path, with a DeprecationWarning.
_MOVED = {
    **{name: "attention" for name in (
        "autograd", "cache", "gluon_forward", "kernel_spec", "launch", "ops", "render", "tables",
        "torch_backend", "transpose", "validate")},
    **{name: "memory" for name in (
        "cache_plan", "memory_picture", "rollout_cache", "triton_commit", "update_rule")},
}


def _warn_moved(old: str, new: str) -> None:
    """DeprecationWarning at the importing line (past the import machinery and this file)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                        or frame.f_code.co_filename in (__file__,
                                                                        importlib.__file__)):
        frame = frame.f_back
    warnings.warn_explicit(f"{old} is deprecated: import {new} instead", DeprecationWarning,
                           frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds codegen.<old name>; loads it as the already imported module of the new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        name = spec.name.rpartition(".")[2]
        new = f"{__name__}.{_MOVED[name]}.{name}"
        _warn_moved(spec.name, new)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to this alias's
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # ... put the module's own back


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    """`codegen.<old name>` without an import statement: imported (and warned) like one."""
    if name in _MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_backends() -> None:
    """Register with the front end on import too (entry points need an installed package;
    a checkout run with PYTHONPATH=. has none). Factories import the kernels lazily."""
    from sparsedsl.backends import register_backend

    def triton_program(schedule, **options):
        from .program import triton_program as make
        return make(schedule, **options)

    def torch_program(schedule, **options):
        from .program import torch_program as make
        return make(schedule, **options)

    register_backend("triton", triton_program)
    register_backend("torch", torch_program)


_register_backends()
