"""sparsedsl code generation: schedule -> Triton source, kernel cache, launchers.

Entry points (imported lazily so that importing `codegen` never imports triton):
    codegen.kernel_spec.AttentionKernelSpec, KernelConfig
    codegen.autograd.pbsa_attention
    codegen.torch_backend.attention
"""

from .kernel_spec import AttentionKernelSpec, KernelConfig

__all__ = ["AttentionKernelSpec", "KernelConfig"]
