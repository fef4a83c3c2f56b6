"""Throughput of the whole DreamerV2 training loop: agent steps per second and where the time goes.

Builds the trainer exactly as ``examples/dreamerv2_atari.py`` does (``make_dreamerv2_trainer(config, logdir,
device=..., progress=False)``, then ``trainer.train()``) at a preset (``--preset``, default the paper's ``atari``) on
an Atari game, once per ``--num-envs`` value. After
``--prefill`` random steps (and the pretraining update) it times a stretch of ``--updates`` updates and splits
its wall-clock time into:

* ``env``: stepping the envs (``env.step_and_maybe_reset`` in the collector: with several envs, the wait for the
  ``ParallelEnv`` workers);
* ``policy``: the acting policy (encoder, posterior step, actor) in the collector;
* ``replay_write`` / ``replay_sample``: ``ReplayBuffer.extend`` / ``ReplayBuffer.sample``;
* ``update``: the optimisation stepper (world model, imagination, actor, critic);
* ``other``: the rest (the collector's own bookkeeping, hooks, logging).

With ``--eval-episodes N`` it then times N greedy episodes with one env, and with the preset's ``eval_envs``
stepped together (the policy acting for all of them at once), each after an untimed warm-up evaluation (a compiled
policy compiles for each batch size).

It also prints the peak resident memory (this process and its env workers, sampled every 50 ms). The last line
is JSON.

    python benchmarks/train_throughput.py                             # CPU, 1, 2 and 4 envs
    python benchmarks/train_throughput.py --num-envs 1 --updates 5 --threads 1
    python benchmarks/train_throughput.py --device cuda --num-envs 1 4 8 --compile --cudagraph --precision bf16

See ``benchmarks/README.md`` for the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from torchrl_dreamer.process import configure_process

configure_process()  # before torch, as the training command: idle OpenMP threads sleep, one allocator heap
import torch

from memory_soak import MB, Peaks
from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.trainers import make_dreamerv2_trainer, parse_threads

from _checks import check_device_args  # benchmarks/_checks.py, beside this script

PARTS = ("env", "policy", "replay_write", "replay_sample", "update")


class Timers:
    """Wall-clock seconds per part, counted only while :attr:`on`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on = False
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[part] += time.perf_counter() - start
            return out

        return timed


def run(num_envs: int, args: argparse.Namespace, device: torch.device) -> dict:
    base = DreamerV2Config.preset(args.preset)
    train_every = -(-base.train_every // num_envs) * num_envs  # a multiple of the env count
    config = base.replace(
        env=f"atari:{args.game}",
        action_repeat=4,
        num_envs=num_envs,
        train_every=train_every,
        prefill=args.prefill,
        total_steps=args.prefill + (args.updates + 1) * train_every,
        replay_capacity=args.prefill + args.updates * train_every + 1000,
        precision=args.precision,
        compile=args.compile,
        cudagraph=args.cudagraph,
        compile_policy=args.compile_policy,
        eval_every=10**9,
        video_every=10**9,
        checkpoint_every=10**9,
        log_every=10**9,
        final_eval_episodes=0,  # evaluations are timed apart (--eval-episodes)
    )
    logdir = Path(tempfile.mkdtemp(prefix="train_throughput-")) / "run"
    peaks = Peaks(0.05)
    peaks.start()
    trainer = make_dreamerv2_trainer(config, logdir, device=device, progress=False, threads=args.threads,
                                     parallel_envs=not args.serial_envs)
    timers = Timers(device)
    collector, replay = trainer.collector, trainer.replay_buffer
    collector.env.step_and_maybe_reset = timers.wrap("env", collector.env.step_and_maybe_reset)
    # the policy as the collector calls it (compiled, with --compile-policy): timed outside the compiled function
    collector._wrapped_policy_maybe_compiled = timers.wrap("policy", collector._wrapped_policy)
    replay.extend = timers.wrap("replay_write", replay.extend)
    replay.sample = timers.wrap("replay_sample", replay.sample)
    stepper = trainer.optimization_stepper
    stepper.step = timers.wrap("update", stepper.step)
    window = {}

    def start_window() -> None:
        # past the prefill and one batch of policy steps: the pretraining update and any compile are behind
        if not timers.on and trainer.steps >= config.prefill + 2 * config.train_every:
            timers.on = True
            window.update(start=time.perf_counter(), steps=trainer.steps, updates=trainer.updates)

    trainer.register_op("post_steps", start_window)
    evaluation = {}
    try:
        trainer.train()
        window["end"] = time.perf_counter()
        for envs in sorted({1, config.eval_envs}) if args.eval_episodes else ():
            # greedy episodes, one env at a time or several stepped together (the policy acting for all at once)
            trainer.evaluation.num_envs = envs
            trainer.evaluation.evaluate(envs, seed=1)  # untimed: a compiled policy compiles for this batch first
            start = time.perf_counter()
            result = trainer.evaluation.evaluate(args.eval_episodes, seed=0)
            seconds = time.perf_counter() - start
            evaluation[f"{envs}_envs"] = {"episodes": args.eval_episodes, "agent_steps": sum(result["lengths"]),
                                          "seconds": round(seconds, 2),
                                          "agent_steps_per_s": round(sum(result["lengths"]) / seconds, 1)}
    finally:
        peaks.stop()
        shutil.rmtree(logdir.parent, ignore_errors=True)
    if not window:
        raise SystemExit("the run ended before the timed stretch: raise --updates")
    wall = window["end"] - window["start"]
    steps, updates = trainer.steps - window["steps"], trainer.updates - window["updates"]
    shares = {part: round(seconds / wall, 4) for part, seconds in timers.seconds.items()}
    shares["other"] = round(1.0 - sum(timers.seconds.values()) / wall, 4)
    return {
        "num_envs": num_envs,
        "train_every": train_every,
        "agent_steps": steps,
        "updates": updates,
        "seconds": round(wall, 2),
        "agent_steps_per_s": round(steps / wall, 3),
        "s_per_update": round(timers.seconds["update"] / max(updates, 1), 3),
        "shares": shares,
        "peak_rss_mb": round(peaks.peak["total"] / MB, 1),
        "threads": torch.get_num_threads(),
        # the update's worker threads (one per thread for an eager CPU update; 1: one pass on torch's threads)
        "shards": getattr(trainer.optimization_stepper.shard_pool, "shards", 1),
        **({"evaluation": evaluation} if evaluation else {}),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 2, 4], help="env counts to run, one after the other")
    parser.add_argument("--game", default="Pong")
    parser.add_argument("--preset", default="atari", choices=sorted(PRESETS),
                        help="the preset's networks, batch and update ratio (train_every rounded up to a multiple of "
                             "the env count), on the Atari env with action repeat 4")
    parser.add_argument("--serial-envs", action="store_true", help="several envs stepped in this process (SerialEnv)")
    parser.add_argument("--compile-policy", action="store_true", help="compile the acting policy")
    parser.add_argument("--eval-episodes", type=int, default=0,
                        help="after the timed stretch, time this many greedy episodes with one env and with the "
                             "preset's eval_envs stepped together (0: none)")
    parser.add_argument("--prefill", type=int, default=1000, help="random agent steps before the first update")
    parser.add_argument("--updates", type=int, default=8, help="updates in the timed stretch (train_every agent steps each)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="compile the update (the first update compiles)")
    parser.add_argument("--cudagraph", action="store_true", help="capture the update's passes (CUDA only)")
    parser.add_argument(
        "--threads", type=parse_threads, default=None, metavar="INT",
        help="torch CPU threads of the learner, as the training command's flag (default: torch's, one per core)",
    )
    args = parser.parse_args(argv)
    check_device_args(parser, args)
    if any(n < 1 for n in args.num_envs) or args.updates < 1 or args.prefill < 50:
        parser.error("--num-envs and --updates must be >= 1 and --prefill >= 50 (one sequence)")
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"# atari:{args.game}, {args.preset} preset, {args.device}, {args.precision}, compile={args.compile}, "
          f"cudagraph={args.cudagraph}, threads {args.threads} ({threads} now), prefill {args.prefill}, "
          f"{args.updates} timed updates, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}")
    print(f"{'envs':>4} {'steps/s':>8} {'s/update':>8} " + " ".join(f"{p:>13}" for p in (*PARTS, "other"))
          + f" {'peak RSS MB':>11}", flush=True)
    runs = []
    for num_envs in args.num_envs:
        torch.set_num_threads(threads)  # closing a ParallelEnv changes the process's thread count
        result = run(num_envs, args, device)
        runs.append(result)
        print(f"{num_envs:>4} {result['agent_steps_per_s']:>8.2f} {result['s_per_update']:>8.2f} "
              + " ".join(f"{result['shares'][p] * 100:>12.1f}%" for p in (*PARTS, "other"))
              + f" {result['peak_rss_mb']:>11.0f}", flush=True)
    summary = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "game": args.game,
        "preset": args.preset,
        "precision": args.precision,
        "compile_policy": args.compile_policy,
        "serial_envs": args.serial_envs,
        "compile": args.compile,
        "cudagraph": args.cudagraph,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
        "runs": runs,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
