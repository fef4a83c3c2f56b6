"""``benchmarks/update_speed.py`` as a user runs it, on a small batch: its warm-up and its JSON line; and
``benchmarks/learning.py`` on one short run: its table and the minutes it records per run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "update_speed.py"
LEARNING = SCRIPT.parent / "learning.py"


def _run(*args: str) -> tuple[dict, list[str]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch-size", "2", "--batch-length", "4", "--updates", "2", *args],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines


def test_update_speed_warms_up_until_the_heap_is_steady():
    result, lines = _run("--warmup", "1")
    warmup = [int(line.split(": ")[1].split()[0]) for line in lines if line.startswith("warm-up update")]
    assert len(warmup) == result["warmup_updates"] >= 1
    # it stopped at the first update that faulted (almost) nothing in, or at --max-warmup (20)
    assert warmup[-1] <= 2_000 or len(warmup) == 20
    assert all(faults > 2_000 for faults in warmup[:-1])
    assert result["page_faults_per_update"] >= 0
    assert result["ms_per_update"] > 0 and result["gflop_per_update"] > 0
    assert result["updates"] == 2 and result["batch"] == [2, 4]


def test_update_speed_max_warmup_caps_the_warmup():
    result, lines = _run("--warmup", "1", "--max-warmup", "1")
    assert result["warmup_updates"] == 1
    assert sum(line.startswith("warm-up update") for line in lines) == 1


def test_update_speed_refuses_bad_counts():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--updates", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--updates must be >= 1" in proc.stderr.strip().splitlines()[-1]


def test_learning_records_wall_and_cpu_minutes_once_per_trained_run(tmp_path):
    command = [sys.executable, str(LEARNING), "--preset", "debug", "--tasks", "gym:CartPole-v1=100", "--seeds", "1",
               "--steps", "400", "--jobs", "1", "--random-episodes", "2", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "gym-CartPole-v1" / "seed0"
    wall, cpu = (float((run / name).read_text()) for name in ("wall_minutes.txt", "cpu_minutes.txt"))
    assert 0 < cpu <= wall * 1.05 + 0.02  # one thread: its CPU time is at most its wall time
    row = next(line for line in (tmp_path / "learning.md").read_text().splitlines() if "CartPole" in line)
    assert f"{wall:.1f} (1 of 1, CPU {cpu:.1f})" in row
    # a finished run that only resumes and stops adds nothing
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [float((run / name).read_text()) for name in ("wall_minutes.txt", "cpu_minutes.txt")] == [wall, cpu]
