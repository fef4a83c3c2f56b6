"""The paper's short-budget protocol in one command: train for a frame budget, then compare with the paper.

    python examples/short_budget.py --game Boxing --frames 1e6
    python examples/short_budget.py --preset atari100k --game Boxing --frames 4e5 --seeds 0 1 2   # CPU, Atari 100k
    python examples/short_budget.py --game Pong --frames 2e6 --seeds 0 1 2 --device cuda --precision bf16
    python examples/short_budget.py --env catch --preset debug --frames 2000 --eval-points 2   # seconds on a CPU

For each seed, DreamerV2 trains with the chosen preset (default: the paper's ``atari`` preset, which starts with
50k agent steps of random prefill) for ``--frames`` environment frames (frames = action repeat x agent steps, 4 on
Atari) through :func:`~torchrl_dreamer.trainers.make_dreamerv2_trainer`, evaluating the greedy policy (actor mode) with
``--eval-episodes`` episodes at ``--eval-points`` evenly spaced points. The run of seed ``k`` lives in
``<logdir>/seed<k>``; running the same command again resumes it (a larger ``--frames`` extends it) and rebuilds the
tables.

Outputs in ``<logdir>``: ``results.md`` and ``results.csv``, one row per seed and evaluation point (plus the mean
over seeds when there are several): frames, agent steps, our mean return with its standard deviation over the
episodes and their number, the paper's mean and [min, max] over its 8 seeds at the nearest 1M-frame bin (points
below 1M frames show the 1M bin, marked as such; ``n/a`` for non-Atari environments), the wall-clock time spent up
to that point (resumes included) and the frames per second.

Per-run files used for the table (all under ``<logdir>/seed<k>/scalars``, lines ``frames,value``):
``eval_return.csv`` (written by the trainer's evaluation hook), ``eval_return_std.csv`` and ``wall_clock.csv``
(written by this script's :class:`ShortBudgetRecords` hook after each evaluation).
"""
from __future__ import annotations

from torchrl_dreamer.process import configure_process

configure_process()  # before torch, as the training command: idle OpenMP threads sleep, one allocator heap

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from torchrl.trainers import Trainer, TrainerHookBase

from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.paper import baselines, paper_reference
from torchrl_dreamer.trainers import CheckpointError, DreamerV2Trainer, make_dreamerv2_trainer

COLUMNS = ["seed", "frames", "agent_steps", "return_mean", "return_std", "episodes", "paper_mean", "paper_min",
           "paper_max", "paper_frames", "paper_note", "wall_clock_s", "fps", "point"]
_FIRST_BIN = 1_000_000


# ---- training -------------------------------------------------------------------------------------------------
class ShortBudgetRecords(TrainerHookBase):
    """After each evaluation, logs the standard deviation of its episode returns (``eval_return_std``) and the
    wall-clock seconds spent on the run so far (``wall_clock``, summed over resumes: the hook's state is
    checkpointed with the run)."""

    def __init__(self, trainer: DreamerV2Trainer):
        self.trainer = trainer
        self._seen: dict | None = None
        self._offset, self._start = 0.0, time.perf_counter()

    @property
    def wall_clock(self) -> float:
        return self._offset + time.perf_counter() - self._start

    def __call__(self) -> None:
        last = self.trainer.evaluation.last
        if last is None or last is self._seen:
            return
        self._seen = last
        frames = int(self.trainer.collected_frames)
        self.trainer.logger.log_scalar("eval_return_std", float(np.std(last["returns"])), step=frames)
        self.trainer.logger.log_scalar("wall_clock", self.wall_clock, step=frames)

    def state_dict(self) -> dict[str, float]:
        return {"wall_clock": self.wall_clock}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._offset, self._start = float(state_dict["wall_clock"]), time.perf_counter()

    def register(self, trainer: Trainer, name: str = "short_budget") -> None:
        trainer.register_op("post_steps", self)
        trainer.register_module(name, self)


def make_config(args: argparse.Namespace, seed: int) -> DreamerV2Config:
    """The preset with the game/env, seed, precision and the frame-budget schedules of ``args``."""
    if args.game and args.env:
        raise SystemExit("error: give either --game or --env, not both")
    overrides: dict[str, Any] = {"seed": seed}
    if args.game or args.env:
        overrides["env"] = f"atari:{args.game}" if args.game else args.env
    if args.precision:
        overrides["precision"] = args.precision
    cfg = DreamerV2Config.preset(args.preset, **overrides)
    total_steps = math.ceil(args.frames / cfg.action_repeat)
    if total_steps < 1 or args.eval_points < 1 or args.eval_episodes < 1:
        raise SystemExit("error: --frames, --eval-points and --eval-episodes must be positive")
    eval_every = max(1, total_steps // args.eval_points)
    return cfg.replace(total_steps=total_steps, eval_every=eval_every, eval_episodes=args.eval_episodes)


def train_seed(cfg: DreamerV2Config, logdir: Path, *, device: str, progress: bool) -> DreamerV2Trainer:
    trainer = make_dreamerv2_trainer(cfg, logdir, device=device, progress=progress)
    ShortBudgetRecords(trainer).register(trainer)
    steps = trainer.steps
    if steps >= cfg.total_steps:
        print(f"{logdir}: already trained for {steps * cfg.action_repeat} frames "
              f"(budget {cfg.total_steps * cfg.action_repeat})")
        return trainer
    # evenly spaced evaluations of the current budget, also when --frames grew
    trainer.evaluation.every.every = cfg.eval_every
    trainer.evaluation.every.next = (steps // cfg.eval_every + 1) * cfg.eval_every
    print(f"{'Resuming' if trainer.resumed else 'Starting'} {cfg.env} seed {cfg.seed} in {logdir} on "
          f"{trainer.device}: {steps} / {cfg.total_steps} agent steps, {cfg.eval_episodes} evaluation episodes every "
          f"{cfg.eval_every} agent steps", flush=True)
    result = trainer.train()
    if result["interrupted"]:
        raise KeyboardInterrupt
    return trainer


# ---- tables -------------------------------------------------------------------------------------------------
def read_scalar_csv(path: str | Path) -> dict[int, float]:
    """``frames,value`` lines -> ``{frames: value}`` sorted by frames; the last line wins for repeated frames."""
    values: dict[int, float] = {}
    path = Path(path)
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        parts = line.strip().split(",")
        if len(parts) != 2:
            continue
        try:
            values[int(float(parts[0]))] = float(parts[1])
        except ValueError:  # a header or a line cut by a kill
            continue
    return dict(sorted(values.items()))


def paper_columns(env: str, frames: int) -> dict[str, Any]:
    """The paper's mean, min, max at the nearest 1M-frame bin (the 1M bin below 1M frames), or n/a."""
    empty = {"paper_mean": None, "paper_min": None, "paper_max": None, "paper_frames": None}
    if not env.startswith("atari:"):
        return {**empty, "paper_note": "n/a (not an Atari game)"}
    budget, note = frames, ""
    if frames < _FIRST_BIN:
        budget, note = _FIRST_BIN, "1M-frame bin (point below 1M frames)"
    try:
        ref = paper_reference(env, budget)
    except (KeyError, ValueError) as err:
        return {**empty, "paper_note": f"n/a ({str(err).strip(chr(34))})"}
    return {"paper_mean": ref["mean"], "paper_min": ref["min"], "paper_max": ref["max"],
            "paper_frames": ref["frames"], "paper_note": note}


def build_rows(run_dir: str | Path, *, env: str, seed: int | str, action_repeat: int, episodes: int) -> list[dict]:
    """One table row per evaluation point of a run directory (see ``COLUMNS``), and one for its final evaluation
    (``final_eval.json``, the preset's ``final_eval_episodes``) when it made one."""
    scalars = Path(run_dir) / "scalars"
    returns = read_scalar_csv(scalars / "eval_return.csv")
    stds = read_scalar_csv(scalars / "eval_return_std.csv")
    clocks = read_scalar_csv(scalars / "wall_clock.csv")
    rows = []
    for frames, mean in returns.items():
        clock = clocks.get(frames)
        rows.append({
            "seed": seed, "frames": frames, "agent_steps": frames // action_repeat, "return_mean": mean,
            "return_std": stds.get(frames), "episodes": episodes, **paper_columns(env, frames),
            "wall_clock_s": clock, "fps": frames / clock if clock else None, "point": "evaluation",
        })
    final_path = Path(run_dir) / "final_eval.json"
    if final_path.exists():
        final = json.loads(final_path.read_text())
        frames = final["steps"] * action_repeat
        clock = max(clocks.values()) if clocks else None
        rows.append({
            "seed": seed, "frames": frames, "agent_steps": final["steps"], "return_mean": final["eval_return"],
            "return_std": float(np.std(final["returns"])), "episodes": final["episodes"],
            **paper_columns(env, frames), "wall_clock_s": clock, "fps": frames / clock if clock else None,
            "point": "final",
        })
    return rows


def mean_over_seeds(rows: Iterable[dict]) -> list[dict]:
    """Rows ``seed="mean"`` per frame count: mean of the seeds' means, std across those means, summed episodes."""
    by_frames: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        by_frames.setdefault((row["frames"], row["point"]), []).append(row)
    merged = []
    for (frames, point), group in sorted(by_frames.items(), key=lambda item: (item[0][0], item[0][1] == "final")):
        means = [r["return_mean"] for r in group]
        clocks = [r["wall_clock_s"] for r in group if r["wall_clock_s"]]
        merged.append({
            **{k: group[0][k] for k in COLUMNS if k.startswith("paper_")},
            "seed": f"mean of {len(group)}", "frames": frames, "agent_steps": group[0]["agent_steps"],
            "return_mean": float(np.mean(means)), "return_std": float(np.std(means)),
            "episodes": sum(r["episodes"] for r in group),
            "wall_clock_s": float(np.mean(clocks)) if clocks else None,
            "fps": frames / float(np.mean(clocks)) if clocks else None, "point": point,
        })
    return merged


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def baseline_notes(env: str) -> list[str]:
    """The game's published baselines, one line: random and human (the paper's), SimPLe and Rainbow at 400k
    frames (Atari 100k), where published."""
    if not env.startswith("atari:"):
        return []
    try:
        ref = baselines(env)
    except KeyError:
        return []
    parts = [f"random {_fmt(ref['random'])}", f"human {_fmt(ref['human_gamer'])}"]
    parts += [f"{name} at 400k frames {_fmt(ref[key])}" for name, key in (("SimPLe", "simple_4e5"),
                                                                          ("Rainbow", "rainbow_4e5"))
              if ref[key] == ref[key]]
    return ["baselines: " + ", ".join(parts) + " (the 400k-frame ones ran without sticky actions)"]


def write_tables(rows: list[dict], out_dir: str | Path, *, title: str, notes: Iterable[str] = ()) -> tuple[Path, Path]:
    """Writes ``results.csv`` (``COLUMNS``) and ``results.md`` in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "| seed | point | frames | agent steps | return (mean ± std) | episodes | paper mean "
                  "| paper [min, max] | wall-clock | FPS |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ours = _fmt(row["return_mean"], 2)
        if row["return_std"] is not None:
            ours += f" ± {_fmt(row['return_std'], 2)}"
        if row["paper_mean"] is None:
            paper_mean, paper_range = "n/a", "n/a"
        else:
            paper_mean = _fmt(row["paper_mean"])
            if row["paper_note"]:
                paper_mean += f" ({row['paper_frames'] // _FIRST_BIN}M ref.)"
            paper_range = f"[{_fmt(row['paper_min'])}, {_fmt(row['paper_max'])}]"
        lines.append(f"| {row['seed']} | {row['point']} | {_fmt(row['frames'])} | {_fmt(row['agent_steps'])} | {ours} | "
                     f"{row['episodes']} | {paper_mean} | {paper_range} | {_duration(row['wall_clock_s'])} | "
                     f"{_fmt(row['fps'], 0)} |")
    if any(row["paper_note"] and row["paper_mean"] is not None for row in rows):
        lines += ["", "Paper: DreamerV2's 8 seeds at the nearest 1M-frame bin. " + "; ".join(
            sorted({row["paper_note"] for row in rows if row["paper_note"] and row["paper_mean"] is not None}))]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


# ---- command line -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--game", default=None, help="Atari game (Boxing, Pong, ...): --env atari:<game>")
    parser.add_argument("--env", default=None, help='any make_env name instead of --game, e.g. "catch"')
    parser.add_argument("--frames", type=float, default=1e6, help="budget in environment frames (default 1e6)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds, trained one after another")
    parser.add_argument("--eval-points", type=int, default=4, help="evenly spaced evaluations (default 4)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="greedy episodes per evaluation (default 10)")
    parser.add_argument("--preset", default="atari", choices=sorted(PRESETS), help="hyperparameters (default atari)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: the preset's")
    parser.add_argument("--logdir", default=None, help="default: runs/short/<env>-<preset>")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.game or args.env):
        args.game = "Pong"
    configs = [make_config(args, seed) for seed in args.seeds]
    env = configs[0].env
    logdir = Path(args.logdir or f"runs/short/{env.replace(':', '-')}-{args.preset}").expanduser()
    logdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    interrupted, device = False, args.device
    for cfg in configs:
        run_dir = logdir / f"seed{cfg.seed}"
        if not interrupted:
            try:
                trainer = train_seed(cfg, run_dir, device=args.device, progress=not args.no_progress)
                device = str(trainer.device)
            except KeyboardInterrupt:
                interrupted = True
            except (OSError, CheckpointError, ValueError, TypeError, ImportError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        rows += build_rows(run_dir, env=env, seed=cfg.seed, action_repeat=cfg.action_repeat,
                           episodes=cfg.eval_episodes)
    if len(configs) > 1 and rows:
        rows += mean_over_seeds(rows)
    cfg = configs[0]
    title = f"DreamerV2 short budget: {env}, {_fmt(int(args.frames))} frames"
    notes = [f"preset `{args.preset}`, seeds {args.seeds}, precision {cfg.precision}, device "
             f"{device}",
             f"{cfg.total_steps:,} agent steps (action repeat {cfg.action_repeat}), prefill {cfg.prefill:,}, "
             f"one update every {cfg.train_every} agent steps",
             f"greedy evaluation (actor mode): {cfg.eval_episodes} episodes every {cfg.eval_every:,} agent steps",
             "wall-clock: time spent on the run up to the point (resumes summed); FPS: frames / wall-clock",
             *([f"final: {cfg.final_eval_episodes} greedy episodes when training ends"] if cfg.final_eval_episodes else []),
             *baseline_notes(env)]
    md_path, csv_path = write_tables(rows, logdir, title=title, notes=notes)
    print(md_path.read_text())
    print(f"Wrote {md_path} and {csv_path}")
    if interrupted:
        print("Interrupted: run the same command to resume.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
