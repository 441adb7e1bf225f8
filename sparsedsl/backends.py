"""Backend registry: `sparsedsl.compile` hands a schedule to a backend found here.

Backends register through the `sparsedsl.backends` entry-point group (codegen does,
in its pyproject), or at run time with `register_backend`. The front end never
imports a backend package by name, so a third party can add one.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Protocol

from .errors import PatternError
from .schedule import Schedule

ENTRY_POINT_GROUP = "sparsedsl.backends"


class Program(Protocol):
    schedule: Schedule

    def explain(self) -> str: ...


BackendFactory = Callable[..., Program]
_registry: dict[str, BackendFactory] = {}
_entry_points_loaded = False


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `factory(schedule, **options) -> Program` available as `backend=name`."""
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


def get_backend(name: str) -> BackendFactory:
    _load_entry_points()
    if name == "auto":
        import torch
        for candidate in (["triton"] if torch.cuda.is_available() else []) + ["torch", "reference"]:
            if candidate in _registry:
                return _registry[candidate]
    if name not in _registry:
        raise PatternError("backend", name, "one of auto, " + ", ".join(sorted(_registry)))
    return _registry[name]
