"""The Ray path's costs on this machine: collection with 1 and 2 Ray collectors, its overhead against the local path
on the same work, and the policy lag (``pip install -e ".[distributed]"``).

Every figure is a run of the command users run (``examples/dreamerv2_atari.py``), timed from its start to its exit:

* **collection**: ``--collectors 1`` and ``--collectors 2`` with a prefill as long as the run (random actions, no
  update): agent steps per second through the Ray collectors into the replay service, less the start-up (measured
  as the same command with a 1-step budget);
* **overhead**: the ``small`` preset (or ``--preset``) on the same env and budget, locally (one process, its env in
  it) and on Ray (1 collector, 1 learner): wall minutes of each and their ratio (the start-up excluded the same way);
* **policy lag**: the mean and largest ``policy_lag`` the learner logged in the Ray run (updates between the
  weights that collected a sampled row and the learner's).

Pairs alternate (local, Ray, local, Ray, ...) so that both see the same machine. Prints a table; the last line is JSON.

``--pieces`` measures instead the per-piece costs a cluster projection needs, at a preset's sizes (default the
paper's ``atari``): the acting policy per agent step on one CPU thread (an Atari env rolled out with and without
it), and the replay service's ``sample`` of ``batch_size x batch_length`` rows and ``extend`` of ``train_every``
steps, called through a client from another process, with the service holding ``--rows`` Atari rows.

    python benchmarks/distributed.py                                   # CartPole-v1, 3,000 steps, 2 repeats
    python benchmarks/distributed.py --env gym:Acrobot-v1 --steps 5000 --repeats 3
    python benchmarks/distributed.py --pieces --preset atari --env atari:Boxing
    python benchmarks/distributed.py --overhead-only --steps 10000 --repeats 1 --updates-per-command 4
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "examples" / "dreamerv2_atari.py"


def run(args: argparse.Namespace, logdir: Path, steps: int, *extra: str) -> float:
    """Seconds the CLI takes for ``steps`` agent steps (its own start-up included)."""
    command = [sys.executable, str(CLI), "--preset", args.preset, "--env", args.env, "--total-steps", str(steps),
               "--logdir", str(logdir), "--no-progress", "--eval-every", str(10**9), "--video-every", str(10**9),
               "--seed", str(args.seed), *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def lag(logdir: Path) -> tuple[float, float]:
    rows = list(csv.reader(open(logdir / "scalars" / "policy_lag.csv")))
    highest = list(csv.reader(open(logdir / "scalars" / "policy_lag_max.csv")))
    return statistics.fmean(float(r[1]) for r in rows), max(float(r[1]) for r in highest)


def pieces(args: argparse.Namespace) -> dict:
    """Per-piece costs at ``args.preset``'s sizes (see the module docstring)."""
    import torch
    from tensordict import TensorDict

    from torchrl_dreamer.config import DreamerV2Config
    from torchrl_dreamer.envs import make_env, prepare_env
    from torchrl_dreamer.trainers.distributed import init_ray, make_replay_service

    torch.set_num_threads(1)
    config = DreamerV2Config.preset(args.preset, env=args.env)
    env = make_env(args.env, **config.make_env_kwargs)
    models = config.make_models(env.observation_spec, env.action_spec, device="cpu")
    env = prepare_env(env, models.policy.make_tensordict_primer())
    env.set_seed(args.seed)
    steps = 300
    timings = {"env": [], "env_and_policy": []}
    with torch.no_grad():
        env.rollout(20, models.policy, break_when_any_done=False)  # warm-up
        for _ in range(args.repeats):
            for name, policy in (("env", None), ("env_and_policy", models.policy)):
                start = time.perf_counter()
                env.rollout(steps, policy, break_when_any_done=False)
                timings[name].append((time.perf_counter() - start) / steps * 1e3)
    env_ms, both_ms = min(timings["env"]), min(timings["env_and_policy"])
    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        service = make_replay_service(config.replace(replay_capacity=args.rows + 1000), tmp, models.world_model.obs_keys)
        client = service.client()
        chunk = 1000
        obs = torch.randint(0, 256, (1, chunk, *env.observation_spec["pixels"].shape), dtype=torch.uint8)
        done = torch.zeros(1, chunk, 1, dtype=torch.bool)
        done[:, -1] = True
        action = torch.zeros(1, chunk, env.action_spec.shape[-1])
        for k in range(args.rows // chunk):
            batch = TensorDict({"pixels": obs, "action": action, "is_init": torch.arange(chunk).eq(0).view(1, -1, 1),
                                ("collector", "traj_ids"): torch.full((1, chunk), k),
                                "policy_version": torch.zeros(1, chunk, dtype=torch.long),
                                "next": {"pixels": obs, "reward": torch.zeros(1, chunk, 1), "done": done,
                                         "terminated": done, "truncated": torch.zeros_like(done)}}, [1, chunk])
            client.extend(batch)
        sample_ms, extend_ms = [], []
        small = batch[:, : config.train_every].clone()
        small["collector", "traj_ids"].fill_(10**6)
        for _ in range(20):
            start = time.perf_counter()
            client.sample(config.batch_size)
            sample_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            client.extend(small)
            extend_ms.append((time.perf_counter() - start) * 1e3)
        service.shutdown()
    result = {"preset": args.preset, "env": args.env, "env_ms_per_step": env_ms,
              "policy_ms_per_step": both_ms - env_ms, "replay_rows": args.rows,
              "sample_ms": statistics.median(sample_ms), "sample_shape": [config.batch_size, config.batch_length],
              "extend_ms": statistics.median(extend_ms), "extend_steps": config.train_every}
    print(f"{args.preset} preset on {args.env}, one CPU thread: the env {env_ms:.2f} ms per agent step, the policy "
          f"{both_ms - env_ms:.2f} ms; the replay service ({args.rows:,} rows): sample of {config.batch_size} x "
          f"{config.batch_length} in {result['sample_ms']:.1f} ms, extend of {config.train_every} steps in "
          f"{result['extend_ms']:.1f} ms (medians of 20, through a client)")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="gym:CartPole-v1")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=3000, help="agent steps of each timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pieces", action="store_true", help="the per-piece costs instead (see above)")
    parser.add_argument("--updates-per-command", type=int, default=1, help="the Ray run's --updates-per-command")
    parser.add_argument("--overhead-only", action="store_true", help="only the local and Ray runs (no collection)")
    parser.add_argument("--rows", type=int, default=50_000, help="--pieces: rows in the replay service")
    args = parser.parse_args(argv)
    if args.pieces:
        return pieces(args)
    collect, overhead, lags = {1: [], 2: []}, {"local": [], "ray": []}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for repeat in range(args.repeats):
            for workers in () if args.overhead_only else (1, 2):  # collection only: the prefill covers the run
                flags = ("--collectors", str(workers), "--prefill", str(args.steps + 1))
                start_up = run(args, tmp / f"s{repeat}{workers}", 1, *flags)
                seconds = run(args, tmp / f"c{repeat}{workers}", args.steps, *flags)
                collect[workers].append(args.steps / max(seconds - start_up, 1e-9))
            ray_flags = ("--collectors", "1", "--learners", "1", "--updates-per-command", str(args.updates_per_command))
            for path, flags in (("local", ("--threads", "1")), ("ray", ray_flags)):
                start_up = run(args, tmp / f"o{repeat}{path}0", 1, *flags)
                seconds = run(args, tmp / f"o{repeat}{path}", args.steps, *flags)
                overhead[path].append(seconds - start_up)
                if path == "ray":
                    lags.append(lag(tmp / f"o{repeat}{path}"))
            collection = "" if args.overhead_only else \
                f"collection {collect[1][-1]:.0f} / {collect[2][-1]:.0f} steps/s (1 / 2 collectors); "
            print(f"repeat {repeat}: {collection}{args.preset} preset: local {overhead['local'][-1]:.1f} s, Ray "
                  f"{overhead['ray'][-1]:.1f} s", flush=True)
    result = {
        "env": args.env, "preset": args.preset, "steps": args.steps, "repeats": args.repeats,
        "collect_steps_per_s": {str(k): statistics.fmean(v) for k, v in collect.items() if v},
        "updates_per_command": args.updates_per_command,
        "seconds": {k: statistics.fmean(v) for k, v in overhead.items()},
        "ray_over_local": statistics.fmean(overhead["ray"]) / statistics.fmean(overhead["local"]),
        "policy_lag_mean": statistics.fmean(m for m, _ in lags), "policy_lag_max": max(x for _, x in lags),
    }
    if not args.overhead_only:
        print(f"| collectors | agent steps/s |\n|---|---|\n| 1 | {result['collect_steps_per_s']['1']:.0f} |\n"
              f"| 2 | {result['collect_steps_per_s']['2']:.0f} |")
    print(f"{args.preset} preset, {args.steps} agent steps: local {result['seconds']['local']:.1f} s, Ray (1 collector, "
          f"1 learner) {result['seconds']['ray']:.1f} s: {result['ray_over_local']:.2f}x; policy lag "
          f"{result['policy_lag_mean']:.2f} updates on average, {result['policy_lag_max']:.0f} at most")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
