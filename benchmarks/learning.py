"""Does it learn? Train a list of tasks for a budget over several seeds; table, plot and random baselines.

Each (task, seed) is one run of the command users run, ``examples/dreamerv2_atari.py --preset <preset> --env <task>
--seed <k> --threads 1``, in ``<out>/<task>/seed<k>`` (``--jobs`` runs at a time, one CPU thread each; running the
same command again resumes unfinished runs and only rebuilds the tables of finished ones). The random baseline of each
task is the mean return of ``--random-episodes`` episodes of uniformly random actions in the same env.

    python benchmarks/learning.py                                     # CartPole-v1 and Acrobot-v1, 3 seeds, small
    python benchmarks/learning.py --tasks gym:CartPole-v1=475 --seeds 1 --steps 20000
    python benchmarks/learning.py --tasks minatar:Breakout=2 --steps 40000 --eval-episodes 20   # pixels
    python benchmarks/learning.py --preset atari100k --tasks atari:Boxing=12.1 atari:Krull=2665.5 --random-episodes 20

A task is ``<make_env name>=<threshold>``. Per run: the final greedy return (the run's final evaluation, when it
made one: ``--final-eval-episodes``, ``final_eval.json``; else the mean of the last 5 evaluations, each
``eval_episodes`` episodes of the actor's mode), the agent steps of the first evaluation at or above the
threshold, the lowest evaluation in the last third of the budget and the lowest from the first evaluation at the
threshold on (a run that stays learnt keeps both high), the largest ``critic_bound`` logged (above 1 the critic
diverged) and the minutes the run took (``wall_minutes.txt`` in its directory, summed over resumed sessions, and
its CPU minutes, ``cpu_minutes.txt``; both rewritten every minute, so a session killed outright loses at most one).
Writes ``<out>/learning.md`` (the table: per task the mean, std, min and max over seeds, next to the random
baseline; Atari games also beside the published scores: random, human, SimPLe and Rainbow at 400k frames,
DreamerV2's paper at 1M), ``learning.json`` and ``learning.png`` (the greedy return against frames, agent steps
where there is no action repeat, one panel per task, each seed and the mean, the final evaluations as dots and the
published scores as lines and markers). The last line printed is the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from torchrl_dreamer.process import configure_process

configure_process()  # before torch, as the training command: idle OpenMP threads sleep, one allocator heap
import torch

from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.envs import make_env
from torchrl_dreamer.record import last_logged_step, read_scalar

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "examples" / "dreamerv2_atari.py"
DEFAULT_TASKS = ("gym:CartPole-v1=475", "gym:Acrobot-v1=-100")
LAST_EVALS = 5
WALL_FILE = "wall_minutes.txt"  # written by this script: minutes of one CPU thread the run took, over all sessions
CPU_FILE = "cpu_minutes.txt"  # the same run's CPU time (user + system): its wall time less what other work took
SAVE_EVERY_S = 60  # both are rewritten this often while a run trains, so a session killed outright loses at most this
FINAL_EVAL_FILE = "final_eval.json"  # written by the trainer: the final evaluation's episodes (--final-eval-episodes)


def parse_task(text: str) -> tuple[str, float]:
    env, sep, threshold = text.rpartition("=")
    if not sep or not env:
        raise argparse.ArgumentTypeError(f"a task is <env>=<threshold>, e.g. gym:CartPole-v1=475; got {text!r}")
    try:
        return env, float(threshold)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the threshold of {text!r} is not a number") from None


def run_dir(out: Path, env: str, seed: int) -> Path:
    return out / env.replace(":", "-").replace("/", "-") / f"seed{seed}"


def random_baseline(env_name: str, episodes: int, config: DreamerV2Config, seed: int = 12345) -> dict:
    """Returns of ``episodes`` episodes of uniformly random actions (the env's action spec)."""
    env = make_env(env_name, **config.make_env_kwargs)
    env.set_seed(seed)
    torch.manual_seed(seed)  # the actions: the action spec's rand()
    returns = []
    try:
        while len(returns) < episodes:
            rollout = env.rollout(100_000, break_when_any_done=True)
            returns.append(float(rollout["next", "reward"].sum()))
    finally:
        env.close()
    return {"episodes": episodes, "mean": statistics.fmean(returns), "std": statistics.pstdev(returns)}


def train(jobs: list[tuple[str, int, Path]], args: argparse.Namespace) -> None:
    """Runs the command for each (env, seed, logdir), ``args.jobs`` at a time, one thread each."""
    pending, running = list(jobs), []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        _run_jobs(pending, running, env, args)
    finally:  # interrupted: stop the runs (each saves a checkpoint on SIGTERM; running this again resumes them)
        for run in running:
            run.read_cpu()
            run.proc.terminate()
            run.proc.wait()
            run.log.close()
            run.save_minutes(final=True)


def _run_jobs(pending: list, running: list, env: dict, args: argparse.Namespace) -> None:
    while pending or running:
        while pending and len(running) < args.jobs:
            name, seed, logdir = pending.pop(0)
            print(f"start  {name} seed {seed} -> {logdir}", flush=True)
            running.append(_Run.start(command_for(name, seed, logdir, args), name, seed, logdir, env))
        time.sleep(2)
        for run in list(running):
            run.read_cpu()  # before poll(), which reaps an exited process and its /proc entry
            if run.proc.poll() is None:
                run.save_minutes()
                continue
            run.log.close()
            running.remove(run)
            minutes = (time.perf_counter() - run.started) / 60
            status = "done" if run.proc.returncode == 0 else f"FAILED (exit {run.proc.returncode}, see stdout.log)"
            print(f"{status:<6} {run.name} seed {run.seed} in {minutes:.1f} min", flush=True)
            run.save_minutes(final=True)


def command_for(name: str, seed: int, logdir: Path, args: argparse.Namespace) -> list[str]:
    """The training command of one run (the command users run; run again, it resumes)."""
    command = [sys.executable, str(CLI), "--preset", args.preset, "--env", name, "--seed", str(seed),
               "--logdir", str(logdir), "--threads", "1", "--no-progress"]
    if args.steps:
        command += ["--total-steps", str(args.steps)]
    if args.eval_episodes:
        command += ["--eval-episodes", str(args.eval_episodes)]
    if args.final_eval_episodes is not None:
        command += ["--final-eval-episodes", str(args.final_eval_episodes)]
    return command + [flag for flags in args.set for flag in shlex.split(flags)]


def run_to_end(name: str, seed: int, logdir: Path, args: argparse.Namespace) -> int:
    """Runs one run's command to its end, recording its minutes as :func:`train` does; its exit code."""
    run = _Run.start(command_for(name, seed, logdir, args), name, seed, logdir, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while True:
            run.read_cpu()  # before poll(), which reaps an exited process and its /proc entry
            if run.proc.poll() is not None:
                break
            time.sleep(2)
            run.save_minutes()
    finally:
        if run.proc.poll() is None:
            run.proc.terminate()
            run.proc.wait()
        run.log.close()
        run.save_minutes(final=True)
    return run.proc.returncode


class _Run:
    """One training process and its minutes: wall and CPU, summed over sessions (``wall_minutes.txt``,
    ``cpu_minutes.txt``), rewritten every ``SAVE_EVERY_S`` while it trains so a killed session keeps them."""

    def __init__(self, proc: subprocess.Popen, log, name: str, seed: int, logdir: Path):
        self.proc, self.log, self.name, self.seed, self.logdir = proc, log, name, seed, logdir
        self.progress = last_logged_step(logdir)
        self.started = self.saved = time.perf_counter()
        self.cpu = 0.0
        self.previous = {file: float((logdir / file).read_text()) if (logdir / file).exists() else 0.0
                         for file in (WALL_FILE, CPU_FILE)}

    @classmethod
    def start(cls, command: list[str], name: str, seed: int, logdir: Path, env: dict) -> _Run:
        logdir.mkdir(parents=True, exist_ok=True)
        log = open(logdir / "stdout.log", "a")
        return cls(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log, name, seed,
                   logdir)

    def read_cpu(self) -> float:
        try:  # utime + stime of the process, all its threads (fields 14 and 15 of /proc/<pid>/stat, in ticks)
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
            self.cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") / 60
        except (OSError, IndexError, ValueError):  # exited (the last reading stands) or no /proc
            pass
        return self.cpu

    def save_minutes(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.saved < SAVE_EVERY_S:
            return
        self.saved = now
        trained = last_logged_step(self.logdir) > self.progress  # not a finished run that only resumed and stopped
        for file, minutes in ((WALL_FILE, (now - self.started) / 60), (CPU_FILE, self.cpu)):
            value = self.previous[file] + (minutes if trained else 0.0)
            if trained or (self.logdir / file).exists():
                (self.logdir / file).write_text(f"{value:.2f}\n")


def summarise_run(logdir: Path, threshold: float, budget: int) -> dict | None:
    try:
        steps, returns = read_scalar(logdir, "eval_return")
    except (FileNotFoundError, ValueError):
        return None
    config = json.loads((logdir / "config.json").read_text())
    steps = steps / config["action_repeat"]  # logged x-axes are frames
    above = [int(s) for s, r in zip(steps, returns) if r >= threshold]
    last_third = [float(r) for s, r in zip(steps, returns) if s >= budget * 2 / 3]
    after = [float(r) for s, r in zip(steps, returns) if above and s >= above[0]]
    try:
        bound = float(np.nanmax(read_scalar(logdir, "critic_bound")[1]))
    except (FileNotFoundError, ValueError):
        bound = math.nan
    wall = logdir / WALL_FILE
    final_eval = logdir / FINAL_EVAL_FILE
    final = json.loads(final_eval.read_text()) if final_eval.exists() else None
    return {
        # the final evaluation when the run made one, else the mean of the last evaluations
        "final": final["eval_return"] if final else float(returns[-LAST_EVALS:].mean()),
        "final_episodes": final["episodes"] if final else min(LAST_EVALS, len(returns)) * config["eval_episodes"],
        "final_returns": final["returns"] if final else None,
        "last_evals": float(returns[-LAST_EVALS:].mean()),
        "action_repeat": config["action_repeat"],
        "wall_minutes": float(wall.read_text()) if wall.exists() else None,
        "cpu_minutes": float(cpu.read_text()) if (cpu := logdir / CPU_FILE).exists() else None,
        "steps_to_threshold": above[0] if above else None,
        "min_last_third": min(last_third) if last_third else None,
        "min_after_threshold": min(after) if after else None,
        "max_critic_bound": bound,
        "last_step": last_logged_step(logdir) // config["action_repeat"],
        "curve": [[int(s), float(r)] for s, r in zip(steps, returns)],
    }


def _recorded_budget(logdirs: list[Path]) -> int | None:
    """The agent-step budget the runs were started with (``--tables-only`` over tasks of different budgets)."""
    configs = [d / "config.json" for d in logdirs if (d / "config.json").exists()]
    budgets = [json.loads(path.read_text())["total_steps"] for path in configs]
    return max(budgets) if budgets else None


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def atari_references(env: str) -> dict | None:
    """For an ``atari:<Game>`` task: random, human, SimPLe and Rainbow at 400k frames, DreamerV2's paper at 1M."""
    if not env.startswith("atari:"):
        return None
    from torchrl_dreamer.paper import baselines, paper_reference

    try:
        return {**baselines(env), "dreamerv2_1m": paper_reference(env, 1e6)["mean"]}
    except KeyError:
        return None


def _reference_table(results: list[dict]) -> list[str]:
    """The Atari tasks beside the published scores (one row per game)."""
    rows = [(task, atari_references(task["env"])) for task in results]
    rows = [(task, ref) for task, ref in rows if ref is not None]
    if not rows:
        return []

    def show(value: float) -> str:
        return "n/a" if value != value else f"{value:g}"

    lines = [
        "",
        "Atari beside the published scores: the final greedy return of each seed; random and human from the "
        "DreamerV2 paper; SimPLe and Rainbow at 400k frames (Atari 100k, without sticky actions); DreamerV2 in the "
        "paper at 1M frames (GPU, the paper's networks).",
        "",
        "| game | frames | seeds: final (episodes) | mean | random | human | SimPLe (4e5) | Rainbow (4e5) "
        "| DreamerV2 paper (1M) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, ref in rows:
        runs = [run for run in task["runs"] if run is not None]
        if not runs:
            continue
        per_seed = "; ".join(f"{run['final']:.1f} ({run['final_episodes']})" for run in runs)
        frames = task["budget"] * runs[0]["action_repeat"]
        lines.append(
            f"| {task['env'].removeprefix('atari:')} | {frames:,} | {per_seed} "
            f"| {statistics.fmean(run['final'] for run in runs):.1f} | {show(ref['random'])} | {show(ref['human_gamer'])} "
            f"| {show(ref['simple_4e5'])} | {show(ref['rainbow_4e5'])} | {show(ref['dreamerv2_1m'])} |"
        )
    return lines


def write_outputs(results: list[dict], out: Path, args: argparse.Namespace) -> None:
    lines = [
        f"Preset `{args.preset}`, {args.seeds} seed(s) per task, one CPU thread per run. Final: the mean greedy "
        f"return over the last {LAST_EVALS} evaluations (episodes per seed in brackets); steps: agent steps to the "
        "first evaluation at or above the threshold; wall: minutes per run on one thread (slowest seed; n/a where "
        "the run predates the record), and its CPU minutes in brackets (less than the wall where other work shared "
        "the cores); random: uniformly random actions.",
        "",
        "| task | budget (agent steps) | runs finished | final: mean (episodes) | std | min | max | threshold "
        "| seeds at threshold | steps to threshold (mean; per seed) | lowest eval in the last third "
        "| lowest eval once at threshold | max critic_bound | wall (min) | random |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in results:
        runs = [run for run in task["runs"] if run is not None]
        if not runs:
            lines.append(f"| {task['env']} | {task['budget']:,} | 0/{len(task['runs'])} | no evaluations yet | | | "
                         f"| {task['threshold']:g} | | | | | | | |")
            continue
        final = _stats([run["final"] for run in runs])
        reached = [run["steps_to_threshold"] for run in runs]
        hit = [s for s in reached if s is not None]
        per_seed = "; ".join(f"{s:,}" if s is not None else "never" for s in reached)
        mean_steps = f"{statistics.fmean(hit):,.0f}" if hit else "never"
        lows = [run["min_last_third"] for run in runs if run["min_last_third"] is not None]
        low = f"{min(lows):.1f}" if lows else "n/a"
        kept = [run["min_after_threshold"] for run in runs if run["min_after_threshold"] is not None]
        kept = f"{min(kept):.1f}" if kept else "n/a"
        finished = sum(run["last_step"] >= task["budget"] for run in runs)
        unfinished = ", ".join(f"seed {seed} at {run['last_step']:,}" for seed, run in zip(task["seeds"], task["runs"])
                               if run is not None and run["last_step"] < task["budget"])
        bound = float(np.nanmax([run["max_critic_bound"] for run in runs]))
        walls = [run["wall_minutes"] for run in runs if run["wall_minutes"] is not None]
        slowest = max((run for run in runs if run["wall_minutes"] is not None), key=lambda run: run["wall_minutes"],
                      default=None)
        cpu = f", CPU {slowest['cpu_minutes']:.1f}" if slowest and slowest["cpu_minutes"] is not None else ""
        wall = f"{max(walls):.1f} ({len(walls)} of {len(runs)}{cpu})" if walls else "n/a"
        episodes = min(run["final_episodes"] for run in runs)
        rand = task["random"]
        lines.append(
            f"| {task['env']} | {task['budget']:,} | {finished}/{len(task['runs'])}"
            f"{f' ({unfinished})' if unfinished else ''} | {final['mean']:.1f} ({episodes}) | {final['std']:.1f} "
            f"| {final['min']:.1f} | {final['max']:.1f} | {task['threshold']:g} | {len(hit)}/{len(runs)} "
            f"| {mean_steps} ({per_seed}) | {low} | {kept} | {bound:.3f} | {wall} "
            f"| {rand['mean']:.1f} ± {rand['std']:.1f} ({rand['episodes']} ep.) |"
        )
    lines += _reference_table(results)
    (out / "learning.md").write_text("\n".join(lines) + "\n")
    (out / "learning.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: matplotlib is not installed; pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, task in zip(axes[0], results):
        runs = [run for run in task["runs"] if run is not None]
        repeat = runs[0]["action_repeat"] if runs else 1
        for seed, run in zip(task["seeds"], task["runs"]):
            if run is not None:
                xs, ys = zip(*run["curve"])
                ax.plot([x * repeat for x in xs], ys, lw=1, alpha=0.6, label=f"seed {seed}")
                if run["final_returns"]:
                    ax.plot([xs[-1] * repeat], [run["final"]], "o", ms=4, color=ax.lines[-1].get_color())
        if runs:
            length = min(len(run["curve"]) for run in runs)
            xs = [run["curve"][i][0] * repeat for i in range(length) for run in runs[:1]]
            ys = [statistics.fmean(run["curve"][i][1] for run in runs) for i in range(length)]
            ax.plot(xs, ys, lw=2.2, color="black", label="mean")
        ax.axhline(task["threshold"], ls="--", color="green", lw=1, label="threshold")
        ax.axhline(task["random"]["mean"], ls=":", color="red", lw=1, label="random (measured)")
        ref = atari_references(task["env"])
        if ref is not None:
            ax.axhline(ref["human_gamer"], ls="--", color="purple", lw=1, label="human")
            for name, value, frames, marker in (("SimPLe", ref["simple_4e5"], 4e5, "s"),
                                                ("Rainbow", ref["rainbow_4e5"], 4e5, "^"),
                                                ("DreamerV2 paper", ref["dreamerv2_1m"], 1e6, "*")):
                if value == value:
                    ax.plot([frames], [value], marker, ms=8, label=f"{name} ({frames:.0e} frames)")
        ax.set_title(f"{task['env']} ({args.preset})")
        ax.set_xlabel("frames" if repeat > 1 else "agent steps")
        ax.set_ylabel("greedy return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning.png", dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments (``scripts/sweep.py`` takes the same)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", type=parse_task, default=[parse_task(t) for t in DEFAULT_TASKS],
                        metavar="ENV=THRESHOLD")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per task")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=None, help="agent steps per run (default: the preset's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--eval-episodes", type=int, default=None,
                        help="greedy episodes per evaluation (default: the preset's); the final return averages "
                             f"{LAST_EVALS} evaluations")
    parser.add_argument("--final-eval-episodes", type=int, default=None,
                        help="greedy episodes of a final evaluation of each run (default: the preset's); when a run "
                             "made one, it is the run's final return")
    parser.add_argument("--random-episodes", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="FLAGS",
                        help='more flags of the command for every run, e.g. --set="--replay stock"')
    parser.add_argument("--out", type=Path, default=Path("logs/learning"))
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the runs as they are")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.random_episodes < 1 or any(
            value is not None and value < 1 for value in (args.steps, args.eval_episodes)) or (
            args.final_eval_episodes is not None and args.final_eval_episodes < 0):
        parser.error("--seeds, --jobs, --random-episodes, --steps and --eval-episodes must be >= 1, "
                     "--final-eval-episodes >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = {env: DreamerV2Config.preset(args.preset, env=env) for env, _ in args.tasks}
    if not args.tables_only:
        train([(env, seed, run_dir(args.out, env, seed)) for seed in range(args.seeds) for env, _ in args.tasks], args)
    results = []
    for env, threshold in args.tasks:
        seeds = list(range(args.seeds))
        budget = args.steps or _recorded_budget([run_dir(args.out, env, seed) for seed in seeds]) \
            or configs[env].total_steps
        results.append({
            "env": env, "threshold": threshold, "budget": budget, "seeds": seeds,
            "random": random_baseline(env, args.random_episodes, configs[env]),
            "runs": [summarise_run(run_dir(args.out, env, seed), threshold, budget) for seed in seeds],
        })
    write_outputs(results, args.out, args)
    print((args.out / "learning.md").read_text())
    summary = {"preset": args.preset, "seeds": args.seeds, "tasks": [
        {key: task[key] for key in ("env", "threshold", "budget", "random")}
        | {"final": [run and run["final"] for run in task["runs"]],
           "steps_to_threshold": [run and run["steps_to_threshold"] for run in task["runs"]],
           "min_last_third": [run and run["min_last_third"] for run in task["runs"]],
           "min_after_threshold": [run and run["min_after_threshold"] for run in task["runs"]],
           "max_critic_bound": [run and run["max_critic_bound"] for run in task["runs"]]}
        for task in results
    ]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
