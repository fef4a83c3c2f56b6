"""examples/short_budget.py: the results table (unit) and the whole command on a tiny Catch budget (subprocess)."""
from __future__ import annotations

import csv
import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchrl_dreamer.paper import paper_reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "short_budget.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("short_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


short_budget = _load_script()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _write_scalars(run_dir: Path, name: str, text: str) -> None:
    (run_dir / "scalars").mkdir(parents=True, exist_ok=True)
    (run_dir / "scalars" / f"{name}.csv").write_text(text)


def test_read_scalar_csv_keeps_the_last_duplicate(tmp_path):
    path = tmp_path / "eval_return.csv"
    path.write_text("500,1.0\n250,0.5\n500,2.0\n750,3")  # unsorted, a repeated point, a line cut by a kill
    assert short_budget.read_scalar_csv(path) == {250: 0.5, 500: 2.0, 750: 3.0}
    assert short_budget.read_scalar_csv(tmp_path / "missing.csv") == {}


def test_table_for_boxing_has_the_paper_columns(tmp_path):
    run = tmp_path / "seed0"
    # a resumed run re-logged the 1M point: the last line wins
    _write_scalars(run, "eval_return", "250000,3.0\n500000,9.5\n1000000,20.0\n1000000,31.0\n1600000,60.0\n")
    _write_scalars(run, "eval_return_std", "250000,1.5\n500000,2.0\n1000000,4.0\n1600000,5.0\n")
    _write_scalars(run, "wall_clock", "250000,100.0\n500000,200.0\n1000000,400.0\n1600000,800.0\n")
    rows = short_budget.build_rows(run, env="atari:Boxing", seed=0, action_repeat=4, episodes=10)

    assert [r["frames"] for r in rows] == [250_000, 500_000, 1_000_000, 1_600_000]
    assert [r["agent_steps"] for r in rows] == [62_500, 125_000, 250_000, 400_000]
    assert [r["return_mean"] for r in rows] == [3.0, 9.5, 31.0, 60.0]
    assert [r["return_std"] for r in rows] == [1.5, 2.0, 4.0, 5.0]
    at_1m, at_2m = paper_reference("Boxing", 1e6), paper_reference("Boxing", 2e6)
    assert round(at_1m["mean"]) == 38 and round(at_2m["mean"]) == 85  # the spec's figures
    for row in rows[:3]:  # below 1M frames: the 1M bin, marked; at 1M: the 1M bin, unmarked
        assert (row["paper_mean"], row["paper_min"], row["paper_max"]) == (at_1m["mean"], at_1m["min"], at_1m["max"])
        assert row["paper_frames"] == 1_000_000
    assert "below 1M" in rows[0]["paper_note"] and "below 1M" in rows[1]["paper_note"]
    assert rows[2]["paper_note"] == ""
    assert rows[3]["paper_mean"] == at_2m["mean"] and rows[3]["paper_frames"] == 2_000_000  # 1.6M -> 2M bin
    assert at_1m["min"] <= at_1m["mean"] <= at_1m["max"]
    assert rows[2]["wall_clock_s"] == 400.0 and rows[2]["fps"] == pytest.approx(2500.0)

    md_path, csv_path = short_budget.write_tables(rows, tmp_path, title="Boxing")
    table = _read_csv(csv_path)
    assert list(table[0]) == short_budget.COLUMNS and len(table) == 4
    assert float(table[2]["paper_mean"]) == pytest.approx(at_1m["mean"]) and table[2]["return_mean"] == "31.0"
    text = md_path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| seed"))
    for title in ("frames", "return (mean ± std)", "paper mean", "paper [min, max]", "wall-clock", "FPS"):
        assert title in header
    body = [line for line in text.splitlines() if line.startswith("| 0 |")]
    assert len(body) == 4
    assert "(1M ref.)" in body[0] and "(1M ref.)" not in body[2]
    assert f"{at_1m['mean']:.1f}" in body[2] and "31.00 ± 4.00" in body[2]


def test_final_evaluation_row_and_the_published_baselines(tmp_path):
    """A run with a final evaluation (the atari100k preset's 100 episodes) gets a "final" row; the notes give the
    game's random, human, SimPLe and Rainbow scores at 400k frames."""
    for seed, final in ((0, [10.0, 14.0]), (1, [4.0, 6.0])):
        run = tmp_path / f"seed{seed}"
        _write_scalars(run, "eval_return", "200000,1.0\n400000,3.0\n")
        _write_scalars(run, "wall_clock", "200000,100.0\n400000,250.0\n")
        (run / "final_eval.json").write_text(json.dumps(
            {"steps": 100_000, "episodes": 2, "eval_return": sum(final) / 2, "returns": final}))
    rows = []
    for seed in (0, 1):
        rows += short_budget.build_rows(tmp_path / f"seed{seed}", env="atari:Boxing", seed=seed, action_repeat=4,
                                        episodes=4)
    assert [(r["point"], r["frames"]) for r in rows[:3]] == [("evaluation", 200_000), ("evaluation", 400_000),
                                                            ("final", 400_000)]
    assert rows[2]["return_mean"] == 12.0 and rows[2]["episodes"] == 2 and rows[2]["return_std"] == 2.0
    merged = short_budget.mean_over_seeds(rows)
    assert [(r["point"], r["frames"], r["return_mean"]) for r in merged] == [
        ("evaluation", 200_000, 1.0), ("evaluation", 400_000, 3.0), ("final", 400_000, 8.5)]
    assert short_budget.baseline_notes("atari:Boxing") == [
        "baselines: random 0.1, human 12.1, SimPLe at 400k frames 9.1, Rainbow at 400k frames 0.2 (the 400k-frame "
        "ones ran without sticky actions)"]
    assert short_budget.baseline_notes("catch") == []


def test_table_without_paper_scores_and_mean_over_seeds(tmp_path):
    for seed, values in ((0, "100,-0.5\n200,0.5\n"), (1, "100,-1.0\n200,1.0\n")):
        _write_scalars(tmp_path / f"seed{seed}", "eval_return", values)
    rows = []
    for seed in (0, 1):
        rows += short_budget.build_rows(tmp_path / f"seed{seed}", env="catch", seed=seed, action_repeat=1, episodes=5)
    assert all(r["paper_mean"] is None and r["paper_note"].startswith("n/a") for r in rows)
    assert all(r["return_std"] is None and r["fps"] is None for r in rows)
    merged = short_budget.mean_over_seeds(rows)
    assert [(m["frames"], m["return_mean"], m["episodes"]) for m in merged] == [(100, -0.75, 10), (200, 0.75, 10)]
    md_path, _ = short_budget.write_tables(rows + merged, tmp_path, title="catch")
    assert md_path.read_text().count("| n/a | n/a |") == 6


def _run(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny networks: one thread is fastest on a shared CPU
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)


@pytest.mark.slow
def test_short_budget_command_on_catch_and_resume(tmp_path):
    logdir = tmp_path / "short"
    common = ["--env", "catch", "--preset", "debug", "--eval-points", "2", "--eval-episodes", "3",
              "--logdir", logdir, "--device", "cpu", "--no-progress"]
    proc = _run(*common, "--frames", "300", "--seeds", "0", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_csv(logdir / "results.csv")
    assert list(rows[0]) == short_budget.COLUMNS
    # debug preset: action repeat 1, one update every 10 steps; evaluations every 300 // 2 = 150 steps
    assert [(r["seed"], int(r["frames"])) for r in rows] == [
        ("0", 150), ("0", 300), ("1", 150), ("1", 300), ("mean of 2", 150), ("mean of 2", 300)]
    for row in rows:
        assert -1.0 <= float(row["return_mean"]) <= 1.0 and float(row["return_std"]) >= 0
        assert row["episodes"] == ("6" if row["seed"].startswith("mean") else "3")
        assert row["paper_mean"] == "" and row["paper_note"].startswith("n/a")
        assert float(row["wall_clock_s"]) > 0 and float(row["fps"]) > 0
    md = (logdir / "results.md").read_text()
    assert md.count("| n/a | n/a |") == 6 and "| mean of 2 | evaluation | 300 |" in md
    assert {row["point"] for row in rows} == {"evaluation"}  # the debug preset makes no final evaluation
    for seed in (0, 1):
        assert (logdir / f"seed{seed}" / "checkpoint.tdz").exists()
        evals = short_budget.read_scalar_csv(logdir / f"seed{seed}" / "scalars" / "eval_return.csv")
        assert list(evals) == [150, 300]

    # same logdir, larger budget: seed 0 resumes from its checkpoint and adds the 600-frame evaluation
    again = _run(*common, "--frames", "600", "--seeds", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming catch seed 0" in again.stdout
    rows = _read_csv(logdir / "results.csv")
    assert [int(r["frames"]) for r in rows] == [150, 300, 600] and {r["seed"] for r in rows} == {"0"}
    clocks = [float(r["wall_clock_s"]) for r in rows]
    assert clocks == sorted(clocks)  # the wall clock continues across the resume

    # a finished run is not trained again; another env in the same logdir is refused
    done = _run(*common, "--frames", "600", "--seeds", "0")
    assert done.returncode == 0 and "already trained" in done.stdout
    other = _run(*common[2:], "--env", "catch:32", "--frames", "600", "--seeds", "0")
    assert other.returncode != 0 and "holds a run on 'catch'" in other.stderr
