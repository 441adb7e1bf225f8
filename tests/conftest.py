import os
import signal
import threading

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter; set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

# CI machines have 2 cores and no GPU: keep example counts small and deadlines off.
# "ci" (the default, and what CI=true runs under) is deterministic: derandomize=True seeds every
# test from a hash of its own source, and database=None stops replays of earlier failures from
# .hypothesis/ changing what a run executes. So every run of a commit draws the same examples
# and takes the same time. "dev" (HYPOTHESIS_PROFILE=dev) explores: random seeds, more examples.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, print_blob=True,
                          **_COMMON)
settings.register_profile("dev", max_examples=60, **_COMMON)
_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
_profile = os.environ.get("HYPOTHESIS_PROFILE") or "ci"
if _ci and _profile != "ci":
    # CI must be deterministic and bounded whatever the environment asks for.
    _profile = "ci"
settings.load_profile(_profile)

# Per-test wall-clock bound (pytest-timeout is not a dependency): a test that runs past
# SPARSEDSL_TEST_TIMEOUT seconds (default 600; 0 disables) fails instead of hanging CI.
# The error derives from BaseException so that hypothesis does not catch it as a failing
# example and start shrinking (which would run the slow test many more times).
TEST_TIMEOUT_S = float(os.environ.get("SPARSEDSL_TEST_TIMEOUT", "600"))


class TestTimeout(BaseException):
    """Raised in a test that ran past its wall-clock bound."""


def _can_alarm():
    return (TEST_TIMEOUT_S > 0 and hasattr(signal, "SIGALRM")
            and threading.current_thread() is threading.main_thread())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _can_alarm():
        yield
        return
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else TEST_TIMEOUT_S

    def on_alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran longer than {limit:g} s "
                          "(per-test bound: SPARSEDSL_TEST_TIMEOUT or @pytest.mark.timeout(s))")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
