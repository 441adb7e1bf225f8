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


def test_the_pattern_file_example_compiles_at_the_models_geometry():
    """examples/sparse_forcing_accumulated.py is a `--pattern` file: the model re-lays it out
    at its own token grid and compiles it, keeping its accumulated update score."""
    import torch

    from models.attention import make_backend
    from models.config import load_config
    cfg = load_config("tiny")
    backend = make_backend(cfg, str(ROOT / "examples" / "sparse_forcing_accumulated.py"))
    assert backend.name == "sparse-forcing-accumulated"
    assert "0.95*previous" in str(backend.pattern.update)
    assert backend.pattern.layout.height == cfg.tokens_h and backend.program.schedule.capacity == 16
    assert backend.new_cache(1, "cpu", torch.float32).nbytes() > 0
