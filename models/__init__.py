"""The reference AR video diffusion model (Sparse Forcing) lives here.

Not built yet: it comes after the memory runtime (see the open issues). It will use
`sparsedsl.compile(...)` programs through `codegen` and never the other way round.
"""
