"""sparsedsl code generation: schedule -> Triton source, kernel cache, launchers.

Entry points (imported lazily so that importing `codegen` never imports triton):
    codegen.kernel_spec.AttentionKernelSpec, KernelConfig
    codegen.autograd.pbsa_attention
    codegen.torch_backend.attention
"""

from .kernel_spec import AttentionKernelSpec, KernelConfig

__all__ = ["AttentionKernelSpec", "KernelConfig"]


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
