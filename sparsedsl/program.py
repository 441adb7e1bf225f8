"""The built-in backend: a program that runs the float64 reference (always available)."""
from __future__ import annotations

from . import reference
from .explain import explain
from .schedule import Schedule


class ReferenceProgram:
    """A compiled pattern executed by the float64 reference: slow, exact, for checking."""

    backend = "reference"
    source = None  # nothing is generated

    def __init__(self, schedule: Schedule, **_options):
        self.schedule = schedule

    def explain(self, **kwargs) -> str:
        return explain(self.schedule, **kwargs)

    def new_state(self, batch: int = 1) -> reference.RolloutState:
        return reference.new_state(self.schedule, batch)

    def attention(self, state, q, k, v, scale=None):
        out, lse, _ = reference.attention(self.schedule, state, q, k, v, scale)
        return out, lse

    def commit(self, state, q, k, v):
        return reference.commit(self.schedule, state, q, k, v)

    def __repr__(self) -> str:
        return f"ReferenceProgram({self.schedule.pattern_name}, key={self.schedule.key})"
