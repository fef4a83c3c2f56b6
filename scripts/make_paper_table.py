"""Build the packaged table of DreamerV2 Atari learning curves from the paper's raw scores.

Reads the per-seed evaluation curves published with DreamerV2 (Hafner et al., 2021, "Mastering Atari with Discrete
World Models") and the per-game Atari baselines, and writes one compact CSV that ships inside the package
(``torchrl_dreamer/data/paper_atari_dreamerv2.csv``), read at run time by :mod:`torchrl_dreamer.paper`.

One row per game and 1M-frame bin (1M to 200M), with the statistics across seeds at that bin::

    game,task,mframes,mean,std,min,max,nseeds,random,human_gamer
    Pong,atari_pong,1,-18.27,1.11,-19.3,-15.7,8,-20.7,14.6

``game`` is the ALE name used by ``atari:Pong``, ``task`` the paper's snake-case name, ``mframes`` the bin in
millions of environment frames, ``std`` the population standard deviation across seeds (``ddof=0``), and
``random`` / ``human_gamer`` the per-game baselines used for human-normalised scores, ``simple_4e5`` /
``rainbow_4e5`` the Atari 100k (400k frames) scores of SimPLe and Rainbow where they were published (empty
otherwise; those ran without sticky actions), all repeated on every row of a game so the package needs a single
file. Only the ``dreamerv2`` method is kept (the raw file also holds runs of a
``nosched`` variant). Runs that stop early contribute fewer seeds to later bins; the 200M bin holds only the runs
that logged a 200th evaluation.

Usage (from the repository root)::

    python scripts/make_paper_table.py
    python scripts/make_paper_table.py --scores PATH/atari-dreamerv2.json --baselines PATH/baselines.json \
        --check PATH/atari-dreamerv2-by-frames.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "paper_scores"
OUTPUT = REPO_ROOT / "torchrl_dreamer" / "data" / "paper_atari_dreamerv2.csv"
FIELDS = ("game", "task", "mframes", "mean", "std", "min", "max", "nseeds", "random", "human_gamer", "simple_4e5",
          "rainbow_4e5")
# the Atari 100k baselines (400k frames, deterministic Atari without sticky actions): SimPLe and Rainbow, as
# baselines.json names them; empty where a game was not evaluated
SHORT_BUDGET_BASELINES = {"simple_4e5": "simple_determ_4e5", "rainbow_4e5": "rainbow_determ_4e5"}

# ALE names that are not the CamelCase of the paper's snake-case task name.
ALE_NAME_EXCEPTIONS = {"james_bond": "Jamesbond"}


def ale_name(task: str) -> str:
    """Map a paper task name to its ALE CamelCase name.

    Args:
        task: Paper task name, e.g. ``"atari_ms_pacman"``.

    Returns:
        The ALE game name, e.g. ``"MsPacman"`` (as in ``atari:MsPacman`` or ``ALE/MsPacman-v5``).

    Example:
        >>> ale_name("atari_private_eye")
        'PrivateEye'
    """
    snake = task.removeprefix("atari_")
    return ALE_NAME_EXCEPTIONS.get(snake, "".join(part.capitalize() for part in snake.split("_")))


def fmt(value: float) -> str:
    """Format a number with at most two decimals and no trailing zeros (``-18.27``, ``8``, ``0.5``)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def curve_stats(runs: list[dict]) -> dict[int, dict[str, float]]:
    """Statistics across seeds of one game's evaluation returns, per 1M-frame bin.

    Args:
        runs: The game's runs, each with ``xs`` (frames, multiples of 1M) and ``ys`` (evaluation return).

    Returns:
        ``{million_frames: {"mean", "std", "min", "max", "nseeds"}}`` over the bins any seed reached.
    """
    by_bin: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for frames, value in zip(run["xs"], run["ys"]):
            mframes = round(frames / 1e6)
            if not math.isclose(frames, mframes * 1e6):
                raise ValueError(f"{run['task']} seed {run['seed']}: {frames} frames is not a 1M bin")
            by_bin[mframes].append(float(value))
    stats = {}
    for mframes in sorted(by_bin):
        values = np.asarray(by_bin[mframes])
        stats[mframes] = {
            "mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max(),
            "nseeds": len(values),
        }
    return stats


def build_rows(scores: list[dict], baselines: dict[str, dict], method: str = "dreamerv2") -> list[dict]:
    """All CSV rows, sorted by game then frames.

    Args:
        scores: The raw list of runs (``task``, ``method``, ``seed``, ``xs``, ``ys``).
        baselines: Per-task baseline scores; ``random`` and ``human_gamer`` are used.
        method: Which method's runs to keep. Default: ``"dreamerv2"``.

    Returns:
        A list of dicts keyed by :data:`FIELDS`, values already formatted as strings.
    """
    runs_by_task: dict[str, list[dict]] = defaultdict(list)
    for run in scores:
        if run["method"] == method:
            runs_by_task[run["task"]].append(run)
    if not runs_by_task:
        raise ValueError(f"no runs with method {method!r}")
    rows = []
    for task in sorted(runs_by_task, key=ale_name):
        if task not in baselines:
            raise KeyError(f"no baselines for {task}")
        game_info = {
            "game": ale_name(task), "task": task,
            "random": fmt(baselines[task]["random"]), "human_gamer": fmt(baselines[task]["human_gamer"]),
            **{column: fmt(baselines[task][name]) if name in baselines[task] else ""
               for column, name in SHORT_BUDGET_BASELINES.items()},
        }
        for mframes, stat in curve_stats(runs_by_task[task]).items():
            rows.append({
                **game_info, "mframes": str(mframes), "nseeds": str(stat["nseeds"]),
                **{key: fmt(stat[key]) for key in ("mean", "std", "min", "max")},
            })
    return rows


def check_against(rows: list[dict], by_frames_csv: Path, tolerance: float = 0.01) -> list[str]:
    """Compare the computed means and seed counts with the paper's summary table.

    Args:
        rows: Rows from :func:`build_rows`.
        by_frames_csv: CSV with a ``task`` column (``pong``) and ``mean_<N>M_frames`` / ``nseeds_<N>M`` columns.
        tolerance: Largest accepted absolute difference of the means (the summary rounds to two decimals).

    Returns:
        One line per mismatch (empty when everything agrees).
    """
    ours = {(row["task"].removeprefix("atari_"), int(row["mframes"])): row for row in rows}
    mismatches, compared = [], 0
    with open(by_frames_csv, newline="") as file:
        for ref in csv.DictReader(file):
            for column, value in ref.items():
                if not column.startswith("mean_"):
                    continue
                mframes = int(column.removeprefix("mean_").removesuffix("M_frames"))
                row = ours.get((ref["task"], mframes))
                if row is None:
                    mismatches.append(f"{ref['task']} {mframes}M: missing from the table")
                    continue
                compared += 1
                if abs(float(row["mean"]) - float(value)) > tolerance:
                    mismatches.append(f"{ref['task']} {mframes}M: mean {row['mean']} vs {value}")
                seeds = ref.get(f"nseeds_{mframes}M")
                if seeds is not None and int(row["nseeds"]) != int(seeds):
                    mismatches.append(f"{ref['task']} {mframes}M: nseeds {row['nseeds']} vs {seeds}")
    print(f"checked {compared} means against {by_frames_csv.name}: {len(mismatches)} mismatches")
    return mismatches


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", type=Path, default=DATA_DIR / "atari-dreamerv2.json")
    parser.add_argument("--baselines", type=Path, default=DATA_DIR / "baselines.json")
    parser.add_argument("--check", type=Path, default=DATA_DIR / "atari-dreamerv2-by-frames.csv",
                        help="summary CSV to compare the means with (skipped if the file does not exist)")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    rows = build_rows(json.loads(args.scores.read_text()), json.loads(args.baselines.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    games = len({row["game"] for row in rows})
    print(f"wrote {len(rows)} rows for {games} games to {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    if args.check.exists():
        for line in check_against(rows, args.check):
            print("  mismatch:", line)


if __name__ == "__main__":
    main()
