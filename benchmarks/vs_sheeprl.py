"""This project's DreamerV2 beside sheeprl's on CartPole-v1, at matched sizes and budget: agent steps and wall time.

For each seed, two runs side by side, one CPU thread each, so that both see the same machine: this project's
command (``examples/dreamerv2_atari.py --preset small``) and sheeprl's DreamerV2 (``sheeprl exp=dreamer_v2``) with
the sizes and schedule of the ``small`` preset:

==========================  ========================================================================================
matched                      16 x 16 latents, GRU and hidden layers of 128, MLPs of 2 x 128, batch 16 x 32, horizon
                             15, gamma 0.99, lambda 0.95, one update per 10 agent steps after 2,500 random ones, a
                             learned discount (sheeprl: ``use_continues=True``; without it CartPole gives no signal)
each its own                 learning rates, KL and entropy scales, pretraining updates, initialisation (sheeprl's
                             defaults; this project's ``small`` preset)
==========================  ========================================================================================

sheeprl needs its own Python environment (it pins other packages): ``python -m venv .venv-sheeprl &&
.venv-sheeprl/bin/pip install torch==2.13.0 sheeprl==0.8.4`` and pass ``--sheeprl-python .venv-sheeprl/bin/python``.

Per run: the agent steps of the first training episode with a return of at least ``--threshold`` (both log every
training episode; this project also evaluates its greedy policy: the steps of its first evaluation at the
threshold), and the wall-clock minutes. Runs already finished in ``--out`` are not run again (the table is rebuilt
from their logs). Writes ``<out>/vs_sheeprl.md`` and prints the table; the last line is JSON.

    python benchmarks/vs_sheeprl.py --sheeprl-python .venv-sheeprl/bin/python
    python benchmarks/vs_sheeprl.py --sheeprl-python .venv-sheeprl/bin/python --seeds 3 --steps 10000
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "examples" / "dreamerv2_atari.py"
WALL_FILE = "wall_minutes.txt"
# sheeprl's DreamerV2 at the small preset's sizes and schedule (see the module docstring)
SHEEPRL_MATCHED = [
    "exp=dreamer_v2", "env=gym", "env.id=CartPole-v1", "env.num_envs=1", "env.capture_video=False",
    "env.sync_env=True", "algo.cnn_keys.encoder=[]", "algo.cnn_keys.decoder=[]", "algo.mlp_keys.encoder=[state]",
    "algo.mlp_keys.decoder=[state]", "algo.per_rank_batch_size=16", "algo.per_rank_sequence_length=32",
    "algo.replay_ratio=0.1", "algo.learning_starts=2500", "algo.dense_units=128", "algo.mlp_layers=2",
    "algo.world_model.discrete_size=16", "algo.world_model.stochastic_size=16",
    "algo.world_model.recurrent_model.recurrent_state_size=128", "algo.world_model.transition_model.hidden_size=128",
    "algo.world_model.representation_model.hidden_size=128", "algo.world_model.use_continues=True",
    "algo.gamma=0.99", "algo.lmbda=0.95", "algo.horizon=15", "algo.run_test=False", "buffer.checkpoint=False",
    "checkpoint.every=100000000", "metric.log_every=1000", "fabric.accelerator=cpu", "model_manager.disabled=True",
]
_EPISODE = re.compile(r"policy_step=(\d+), reward_env_0=([-\d.e+]+)")


def sheeprl_command(python: str, seed: int, steps: int) -> list[str]:
    return [python, "-c", "from sheeprl.cli import run; run()", *SHEEPRL_MATCHED, f"algo.total_steps={steps}",
            f"buffer.size={steps}", f"seed={seed}", "root_dir=vs_sheeprl", f"run_name=seed{seed}"]


def ours_command(seed: int, steps: int, logdir: Path) -> list[str]:
    return [sys.executable, str(CLI), "--preset", "small", "--env", "gym:CartPole-v1", "--seed", str(seed),
            "--total-steps", str(steps), "--threads", "1", "--no-progress", "--logdir", str(logdir)]


def sheeprl_episodes(log: Path) -> list[tuple[int, float]]:
    """``(agent step, return)`` of every training episode sheeprl printed."""
    return [(int(m.group(1)), float(m.group(2))) for m in _EPISODE.finditer(log.read_text())] if log.exists() else []


def ours_episodes(logdir: Path, name: str = "train_return") -> list[tuple[int, float]]:
    path = logdir / "scalars" / f"{name}.csv"
    if not path.exists():
        return []
    rows = [row for row in csv.reader(path.open()) if row and row[0][:1].isdigit()]
    return [(int(float(step)), float(value)) for step, value in rows]


def first_at(points: list[tuple[int, float]], threshold: float) -> int | None:
    return next((step for step, value in points if value >= threshold), None)


def finished(kind: str, run_dir: Path, steps: int) -> bool:
    if not (run_dir / WALL_FILE).exists():
        return False
    if kind == "ours":
        points = ours_episodes(run_dir, "fps") or ours_episodes(run_dir)
        return bool(points) and max(step for step, _ in points) >= steps * 0.99
    episodes = sheeprl_episodes(run_dir / "stdout.log")
    return bool(episodes) and "Error" not in (run_dir / "stdout.log").read_text()[-2000:]


def run_pair(seed: int, args: argparse.Namespace) -> None:
    """This project and sheeprl on one seed, side by side, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = []
    for kind in ("ours", "sheeprl"):
        run_dir = args.out / kind / f"seed{seed}"
        if finished(kind, run_dir, args.steps):
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        command = ours_command(seed, args.steps, run_dir / "run") if kind == "ours" else \
            sheeprl_command(args.sheeprl_python, seed, args.steps)
        log = open(run_dir / "stdout.log", "w")
        jobs.append((kind, run_dir, log, time.perf_counter(),
                     subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir if kind ==
                                      "sheeprl" else ROOT)))
    for kind, run_dir, log, start, proc in jobs:
        proc.wait()
        log.close()
        minutes = (time.perf_counter() - start) / 60
        print(f"{kind} seed {seed}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} in "
              f"{minutes:.1f} min", flush=True)
        if proc.returncode == 0:
            (run_dir / WALL_FILE).write_text(f"{minutes:.2f}\n")


def summarise(args: argparse.Namespace) -> dict:
    rows = {"ours": [], "sheeprl": []}
    for seed in range(args.seeds):
        for kind in rows:
            run_dir = args.out / kind / f"seed{seed}"
            episodes = ours_episodes(run_dir / "run") if kind == "ours" else sheeprl_episodes(run_dir / "stdout.log")
            wall = run_dir / WALL_FILE
            rows[kind].append({
                "seed": seed,
                "steps_to_threshold": first_at(episodes, args.threshold),
                "greedy_steps_to_threshold": first_at(ours_episodes(run_dir / "run", "eval_return"), args.threshold)
                if kind == "ours" else None,
                "episodes": len(episodes),
                "wall_minutes": float(wall.read_text()) if wall.exists() else None,
            })
    return rows


def table(rows: dict, args: argparse.Namespace) -> str:
    def show(values: list) -> str:
        known = [v for v in values if v is not None]
        mean = f"{statistics.fmean(known):,.0f}" if len(known) == len(values) and known else "n/a"
        return mean + " (" + "; ".join("never" if v is None else f"{v:,.0f}" for v in values) + ")"

    lines = [
        f"CartPole-v1, {args.seeds} seeds, {args.steps:,} agent steps per run, matched sizes (see "
        "benchmarks/vs_sheeprl.py); each pair of runs side by side, one CPU thread each. Steps: the agent steps of the "
        f"first training episode with a return >= {args.threshold:g} (mean; per seed).",
        "",
        "| | steps to threshold (training episodes) | greedy evaluation at threshold | wall minutes per run |",
        "|---|---|---|---|",
    ]
    for kind, name in (("ours", "torchrl_dreamer (small)"), ("sheeprl", "sheeprl 0.8.4 DreamerV2")):
        runs = rows[kind]
        greedy = show([r["greedy_steps_to_threshold"] for r in runs]) if kind == "ours" else "(not evaluated)"
        lines.append(f"| {name} | {show([r['steps_to_threshold'] for r in runs])} | {greedy} "
                     f"| {show([r['wall_minutes'] for r in runs])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sheeprl-python", default=None,
                        help="the Python of an environment with sheeprl 0.8.4 installed (needed to run sheeprl)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10_000, help="agent steps per run")
    parser.add_argument("--threshold", type=float, default=475.0)
    parser.add_argument("--out", type=Path, default=Path("logs/vs_sheeprl"))
    parser.add_argument("--tables-only", action="store_true", help="rebuild the table from the runs as they are")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    if not args.tables_only:
        if args.sheeprl_python is None:
            parser.error("--sheeprl-python is needed to run sheeprl (or --tables-only)")
        args.out = args.out.absolute()
        for seed in range(args.seeds):
            run_pair(seed, args)
    rows = summarise(args)
    text = table(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vs_sheeprl.md").write_text(text)
    print(text)
    summary = {"seeds": args.seeds, "steps": args.steps, "threshold": args.threshold, **rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
