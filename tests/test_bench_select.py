"""bench/select_probe.py --cpu-smoke: the select probe's code path runs on the CPU (torch path,
tiny sizes) and prints its three tables (select, importance, moba program.attention)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "select_probe.py"


def rows(text: str, title: str) -> list[list[str]]:
    part = text.split(title, 1)[1].split("###", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_cpu_smoke_prints_the_tables(tmp_path):
    out_md = tmp_path / "probe.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out_md)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "command: `PYTHONPATH=. python bench/select_probe.py --cpu-smoke --out" in out
    select = rows(out, "### select_topk")
    assert len(select) == 3 and all(float(r[5]) > 0 for r in select)      # torch ms
    importance = rows(out, "### block_importance")
    assert len(importance) == 2 and all(float(r[3]) > 0 for r in importance)
    program = rows(out, "### moba program.attention")
    assert [r[0] for r in program] == ["1", "2", "3"]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in program)
    assert "### moba program.attention" in out_md.read_text()


def test_probe_needs_a_gpu_or_cpu_smoke():
    if __import__("torch").cuda.is_available():
        return
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 2 and "--cpu-smoke" in result.stderr
