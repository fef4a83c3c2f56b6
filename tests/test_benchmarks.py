"""``benchmarks/update_speed.py`` as a user runs it, on a small batch: its warm-up and its JSON line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "update_speed.py"


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
