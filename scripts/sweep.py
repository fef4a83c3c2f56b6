"""A sweep of games x seeds on Ray: each run an independent, resumable run of the training command, as a Ray task.

    python scripts/sweep.py --preset atari100k --tasks atari:Boxing=12.1 atari:Krull=2665.5 --seeds 3
    python scripts/sweep.py --ray-address auto --cpus-per-run 4 --tasks atari:Pong=14.6 --seeds 5 --out /shared/sweep

Each (task, seed) runs ``examples/dreamerv2_atari.py`` in ``<out>/<task>/seed<k>`` (the layout and the flags of
``benchmarks/learning.py``, whose arguments this takes), in a Ray task that reserves ``--cpus-per-run`` CPUs and is
retried once if its node dies. The command resumes a run from its checkpoint, so starting the sweep again resumes
its unfinished runs and leaves finished ones as they are. When every run has ended, ``benchmarks/learning.py
--tables-only`` builds the table and the curves (``<out>/learning.md``, ``learning.png``). On a cluster of several
nodes ``--out`` must be on a file system every node mounts. Ray is the ``[distributed]`` extra.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning  # noqa: E402  (benchmarks/learning.py: the runs' layout, command and table)

from torchrl_dreamer.trainers.distributed import init_ray, require_ray  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--ray-address", default=None, help="auto or HOST:PORT of a running cluster (default: local)")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs a run reserves (its --threads is 1)")
    parser.add_argument("--retries", type=int, default=1, help="reruns of a run whose node died")
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        learning.main(["--help"])
    ray = require_ray()
    args = learning.parse_args(rest)
    init_ray(ours.ray_address)
    ray.cloudpickle.register_pickle_by_value(learning)  # the tasks run its helper wherever they land

    @ray.remote(num_cpus=ours.cpus_per_run, max_retries=ours.retries)
    def run(name: str, seed: int, logdir: str) -> int:
        return learning.run_to_end(name, seed, Path(logdir), args)

    jobs = [(env, seed, learning.run_dir(args.out, env, seed)) for seed in range(args.seeds) for env, _ in args.tasks]
    pending = {run.remote(env, seed, str(logdir)): (env, seed) for env, seed, logdir in jobs}
    failed = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        env, seed = pending.pop(done[0])
        code = ray.get(done[0])
        failed += code != 0
        print(f"{'done' if code == 0 else f'FAILED (exit {code}, see stdout.log)':<6} {env} seed {seed}", flush=True)
    learning.main([*rest, "--tables-only"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
