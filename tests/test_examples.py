"""The examples run as users run them (a subprocess from the repo root) and finish cleanly."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, args, expect", [
    ("custom_pattern.py", [], "column-memory"),
    ("generate_with_cache.py", ["--chunks", "8"], "resumed at chunk 4: identical outputs"),
])
def test_example_runs(script, args, expect, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout
