"""Hardening of the front end: bounded costs, clear errors, flags that do what they say."""
import time

import pytest

import sparsedsl as sd
from sparsedsl.cli import main
from sparsedsl.errors import PatternError

LAY = sd.VideoLayout(8, 10, tile=(4, 4), chunk_frames=2)


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# --- 6: costs that do not grow with a huge argument --------------------------------------
def test_lowering_with_a_huge_window_is_fast():
    start = time.perf_counter()
    pattern = sd.Pattern(LAY, window=sd.LocalWindow(frames=1000))
    schedule = sd.lower(pattern, num_heads=2, head_dim=16)
    pattern2 = sd.Pattern(LAY, window=sd.LocalWindow(frames=100_000, neighborhood=sd.TopK(k=3)))
    schedule2 = sd.lower(pattern2, num_heads=2, head_dim=16)
    assert time.perf_counter() - start < 10
    # the closed form agrees with the small-window definitions
    nb = LAY.blocks_per_frame
    assert schedule.shapes.max_visits_at(3) == 3 * 2 * nb + LAY.chunk_blocks
    assert schedule.shapes.max_visits_at(10**6) == 1000 * nb + LAY.chunk_blocks
    assert schedule2.shapes.max_visits_at(10**6) == 3 + LAY.chunk_blocks


@pytest.mark.parametrize("window", [None, 2, 5])
@pytest.mark.parametrize("nbhd", [sd.All(), sd.Radius(1, 1, 1), sd.Radius(1, 1, 1) | sd.TopK(k=2),
                                  sd.Radius(3, 0, 0) & sd.TopK(fraction=0.5), sd.TopK(k=3)],
                         ids=str)
def test_closed_form_matches_the_definitions(window, nbhd):
    pattern = sd.Pattern(LAY, sink=sd.Sink(1), window=sd.LocalWindow(window, nbhd))
    s = sd.lower(pattern, num_heads=2, head_dim=16)
    for step in range(9):
        counts = [len(s.visits(step, qb, persistent=[],
                               topk=s.topk_candidates(step, qb)[:s.topk_count(step, qb)]))
                  for qb in range(LAY.chunk_blocks)]
        assert s.shapes.max_visits_at(step) == max(counts), step
        assert s.shapes.total_visits_at(step) == sum(counts), step


def test_flops_at_a_huge_horizon_is_closed_form():
    pattern = sd.presets.get("sparse-forcing")
    s = sd.lower(pattern)
    start = time.perf_counter()
    small = s.shapes.flops(240)
    huge = s.shapes.flops(10**9)
    assert time.perf_counter() - start < 5
    per_step = s.shapes.steady_state_flops_per_step()
    assert huge - s.shapes.flops(10**9 - 3 * 1000) == per_step * 1000
    assert small == sum(int(s.shapes.total_visits.subs(sd.shapes.t, k))
                        for k in range(s.shapes.steps(240))) * s.shapes.flops_per_block_visit \
        * s.shapes.num_heads


def test_explain_huge_horizon_is_a_clear_error(capsys):
    assert main(["explain", "sparse-forcing", "--horizon", "1000000000"]) == 2
    err = one_error_line(capsys)
    assert "--horizon" in err and "1000000000" in err


def test_explain_huge_rollout_is_a_clear_error(tmp_path, capsys):
    assert main(["explain", "sparse-forcing", "--png", str(tmp_path / "m.png"),
                 "--rollout", "100000"]) == 2
    err = one_error_line(capsys)
    assert "--rollout" in err and "100000" in err


def test_explain_function_rejects_huge_horizon():
    s = sd.lower(sd.presets.get("sparse-forcing"))
    with pytest.raises(PatternError, match="horizon"):
        from sparsedsl.explain import explain
        explain(s, horizons={"far": 10**9})


# --- 7: unwritable output paths ------------------------------------------------------------
def test_png_under_a_regular_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["explain", "sliding-tile", "--horizon", "21",
                 "--png", str(blocker / "out.png")]) == 2
    err = one_error_line(capsys)
    assert str(blocker / "out.png") in err


def test_demo_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--steps", "1", "--batch", "1", "--out", str(blocker / "d")]) == 2
    err = one_error_line(capsys)
    assert str(blocker / "d") in err


def test_compile_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    pytest.importorskip("codegen")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compile", "sliding-tile", "--heads", "2", "--head-dim", "16",
                 "--out", str(blocker / "k")]) == 2
    err = one_error_line(capsys)
    assert str(blocker / "k") in err


# --- 8: one head-dim range -----------------------------------------------------------------
def test_lowering_rejects_head_dim_the_kernels_cannot_take():
    with pytest.raises(PatternError, match=r"head_dim = 512 .*256"):
        sd.lower(sd.Pattern(LAY), head_dim=512)
    sd.lower(sd.Pattern(LAY), head_dim=256)


@pytest.mark.parametrize("command", ["compile", "explain", "check"])
def test_cli_rejects_head_dim_512(command, capsys):
    assert main([command, "sliding-tile", "--head-dim", "512"]) == 2
    err = capsys.readouterr().err
    assert "--head-dim" in err and "512" in err and "256" in err


# --- 9: check: environment errors, every flag honoured ------------------------------------
def test_check_triton_without_cuda_is_an_environment_error(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["check", "sliding-tile", "--backend", "triton", "--examples", "1"]) == 2
    err = one_error_line(capsys)
    assert "triton" in err.lower() and "cuda" in err.lower()
    assert "counterexample" not in err


def test_check_honours_heads_and_head_dim(monkeypatch, capsys):
    pytest.importorskip("codegen")
    import codegen.check as check
    seen = []
    original = check.check_rollout

    def spy(schedule, *args, **kwargs):
        seen.append((schedule.num_heads, schedule.head_dim))
        return original(schedule, *args, **kwargs)

    monkeypatch.setattr(check, "check_rollout", spy)
    assert main(["check", "sliding-tile", "--backend", "torch", "--examples", "2",
                 "--heads", "3", "--head-dim", "8"]) == 0
    assert seen and all(h == 3 and d == 8 for h, d in seen), seen


def test_check_head_dim_3_is_checked_not_ignored(monkeypatch):
    pytest.importorskip("codegen")
    import codegen.check as check
    seen = []
    monkeypatch.setattr(check, "check_rollout",
                        lambda schedule, *a, **k: seen.append(schedule.head_dim))
    check.property_check(sd.presets.get("sliding-tile"), examples=2, backend="torch",
                         num_heads=2, head_dim=3)
    assert seen and set(seen) == {3}


# --- 11: string scores --------------------------------------------------------------------
def test_update_parses_string_scores():
    from sparsedsl.update import age, importance, previous
    assert Update_score("importance*2") == 2 * importance
    assert Update_score("importance + previous/2 - age/100") == importance + previous / 2 - age / 100
    with pytest.raises(PatternError, match="update.score.*unknown symbols: x"):
        sd.Update(score="importance + x")
    with pytest.raises(PatternError, match="update.score"):
        sd.Update(score="importance +")


def Update_score(text):
    return sd.Update(score=text).score


# --- 12: rollouts(steps) -------------------------------------------------------------------
@pytest.mark.parametrize("steps", [-1, 0, 1.5, True])
def test_rollouts_rejects_nonpositive_steps(steps):
    from sparsedsl import testing as sdt
    with pytest.raises(PatternError, match="steps"):
        sdt.rollouts(steps=steps)


# --- 16: progress bars only on a terminal --------------------------------------------------
def test_demo_writes_no_carriage_returns_when_redirected(monkeypatch, capsys):
    assert main(["demo", "--steps", "2", "--batch", "1", "--no-full-size"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    assert "\r" not in captured.out
