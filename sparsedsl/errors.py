"""The errors of the DSL: every rejected field says what it got and what is allowed
(PatternError); a backend that does not follow the program protocol raises BackendError;
a backend's check that cannot run where it is asked to raises
CheckEnvironmentError (here, so that the command line can tell it from a counterexample
without importing a backend)."""
from __future__ import annotations


class PatternError(ValueError):
    """A pattern field holds a value the DSL does not accept.

    The message always names the field, the value given and what is allowed, so
    the user can fix the declaration without reading the compiler.
    """

    def __init__(self, field: str, value: object, allowed: str, hint: str = ""):
        self.field = field
        self.value = value
        self.allowed = allowed
        message = f"{field} = {value!r} is not allowed: {allowed}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class BackendError(TypeError):
    """A registered backend is unusable: its factory is not callable, or what it built does not
    follow the program protocol (sparsedsl/protocol.py). The message names the backend and
    the members it lacks."""


class CheckEnvironmentError(RuntimeError):
    """The check cannot run here (no GPU for Triton, a missing package): not a counterexample."""


def require_int(field: str, value: object, minimum: int | None = None,
                maximum: int | None = None) -> int:
    """Check that `value` is a plain int (bools excluded) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PatternError(field, value, _int_range_text(minimum, maximum))
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise PatternError(field, value, _int_range_text(minimum, maximum))
    return value


def _int_range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"
