"""The attention kernels: one AR step's block-sparse attention over a pool read in place.

Owns the kernel contract (kernel_spec.py), the Triton kernels as Jinja2 template files
(templates/*.py.jinja) and their rendering (render.py), the on-disk kernel cache (cache.py),
the launchers (launch.py, transpose.py for dK/dV, gluon_forward.py on Hopper), autograd
(autograd.py) and the torch.library custom op (ops.py), input checks (validate.py), the
PyTorch twin (torch_backend.py) and the block tables a cache hands the kernels (tables.py).

May import: torch, triton (lazily: importing this package imports neither), `sparsedsl`,
`codegen._interp_compat` and `codegen._templates`. Never `codegen.select`,
`codegen.memory`, `codegen.program` or `codegen.check`; the memory runtime and the program
import from here.
"""
