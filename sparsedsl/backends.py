"""Backend registry: `sparsedsl.compile` hands a schedule to a backend found here.

Backends register through the `sparsedsl.backends` entry-point group (codegen does,
in its pyproject), or at run time with `register_backend`. The front end never
imports a backend package by name, so a third party can add one. A factory
`factory(schedule, **options)` returns a program that follows the program protocol
(`sparsedsl.protocol.Program`); `make_program` checks that and raises BackendError.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

from .errors import BackendError, PatternError
from .protocol import Program, check_program
from .schedule import Schedule

ENTRY_POINT_GROUP = "sparsedsl.backends"

BackendFactory = Callable[..., Program]
_registry: dict[str, BackendFactory] = {}
_entry_points_loaded = False


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `factory(schedule, **options) -> Program` available as `backend=name` (the program
    is checked against the protocol when `sd.compile` builds it)."""
    if not isinstance(name, str) or not name or name == "auto":
        raise BackendError(f"backend name {name!r}: expected a non-empty string other than 'auto'")
    if not callable(factory):
        raise BackendError(f"backend '{name}': the factory must be callable "
                           f"(schedule, **options) -> program, got {type(factory).__name__}")
    _registry[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _registry:
            try:
                _registry[ep.name] = ep.load()
            except ImportError:  # a backend whose dependencies are missing is simply absent
                continue


def available_backends() -> list[str]:
    _load_entry_points()
    return sorted(_registry)


def resolve_backend(name: str) -> str:
    """The registered name `name` stands for ("auto": triton on a GPU, else torch, else the
    reference); PatternError if none is registered under it."""
    _load_entry_points()
    if name == "auto":
        import torch
        for candidate in (["triton"] if torch.cuda.is_available() else []) + ["torch", "reference"]:
            if candidate in _registry:
                return candidate
    if name not in _registry:
        raise PatternError("backend", name, "one of auto, " + ", ".join(sorted(_registry)))
    return name


def get_backend(name: str) -> BackendFactory:
    """The factory registered as `name` (unchecked; `make_program` checks what it builds)."""
    return _registry[resolve_backend(name)]


def make_program(name: str, schedule: Schedule, **options) -> Program:
    """`factory(schedule, **options)` of backend `name`, checked against the program protocol
    (BackendError naming the backend and the members it lacks)."""
    name = resolve_backend(name)
    program = _registry[name](schedule, **options)
    check_program(program, name)
    return program
