import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_pattern_example_runs_and_checks(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["custom_pattern.py"])
    runpy.run_path(str(EXAMPLES / "custom_pattern.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "column-memory" in out
    assert "match the reference at every step" in out
