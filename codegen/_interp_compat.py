"""Compatibility shims for Triton 3.6's interpreter (TRITON_INTERPRET=1).

1. numpy >= 2.4: the interpreter turns a scalar tensor into a Python int with `int(data)`, but a
scalar loaded from memory is held as a 1-element 1-d array, which numpy 2.4
refuses to convert ("only 0-dimensional arrays can be converted to Python
scalars"). Loop bounds read from tensors (visit counts, CSR offsets) hit this.
We wrap the interpreter's tensor patching so `__index__` takes the single
element.
2. bfloat16 tl.dot: the interpreter stores bfloat16 as raw uint16 bits and
`create_dot` multiplies those bits as integers (garbage results). We widen
bfloat16 operands to float32 (exact: bf16 is the top half of fp32) first.

Only the interpreter is touched; compiled kernels never see this.
"""

from __future__ import annotations

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - triton missing
        return
    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover - other triton versions
        _INSTALLED = True
        return

    def _index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if getattr(data, "size", 1) == 1 else int(data)

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    _interp._patch_lang_tensor = patched

    import numpy as np
    import triton.language as tl

    builder_cls = _interp.InterpreterBuilder
    orig_dot = builder_cls.create_dot

    def _widen(h):
        if h.dtype.scalar == tl.bfloat16:
            bits = h.data.astype(np.uint32) << np.uint32(16)
            return _interp.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    _INSTALLED = True
