"""Train DreamerV2 on Atari (or any TorchRL env) with the paper's settings.

    python examples/dreamerv2_atari.py                       # Pong, paper preset
    python examples/dreamerv2_atari.py --game Boxing --device cuda --precision bf16
    python examples/dreamerv2_atari.py --preset atari100k --game Krull --threads 1   # Atari 100k on a CPU, < 2 h
    python examples/dreamerv2_atari.py --env gym:CartPole-v1 --preset debug
    python examples/dreamerv2_atari.py --env my_package.envs:make_env   # your own TorchRL env factory
    python examples/dreamerv2_atari.py --preset debug --logdir /tmp/dbg   # ~1 minute on a CPU

``--env`` takes a ``make_env`` name (``atari:<Game>``, ``gym:<id>``, ``dmc:<domain>-<task>``, ``minatar:<Game>``,
``catch``) or the import path ``package.module:function`` of a function that returns a TorchRL ``EnvBase`` (the
current directory is importable); ``InitTracker`` and the policy's recurrent-state primer are added when missing.

Every hyperparameter of the preset can be overridden with ``--<name> <value>``
(``--preset <name> --help`` lists each with its unit and that preset's value; out-of-range values are refused).
``--action-repeat`` is the frames per agent step the built-in envs perform (Atari frame skip, DMC/gym/catch
action repeat); a user env factory is not wrapped: there it only states the frames your env does per step, for the
logged frame counts. The ``debug`` preset is a smoke test (tiny networks on Catch).
Running the same command again on the same ``--logdir`` resumes from its checkpoint. Ctrl-C saves a checkpoint
before exiting.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
import warnings

from torchrl_dreamer.process import configure_process

# first, before torch loads OpenMP: idle OpenMP threads sleep, one allocator heap (torchrl_dreamer.process)
configure_process()

from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.data import DiskFullError
from torchrl_dreamer.trainers import (
    CheckpointError,
    CheckpointWriteError,
    NonFiniteUpdateError,
    RunLockedError,
    make_dreamerv2_trainer,
    parse_threads,
)

_SPECIAL = {"env", "seed", "num_envs", "precision", "env_kwargs", "compile", "cudagraph"}
DEBUG_STEPS_NOTE = 20_000  # the debug preset beyond this many agent steps gets a note: it is a smoke test


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _number(kind):
    def parse(text: str):
        value = float(text)  # accepts 5e7
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if kind is int:
            if value != int(value):
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
            return int(value)
        return value

    parse.__name__ = kind.__name__
    return parse


def _show(value) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, int):
        return f"{value:_}"
    return repr(value)


def _hyper_help(field: dataclasses.Field, preset: str) -> str:
    value = _show(PRESETS[preset].get(field.name, field.default))
    # argparse formats help with %: escape the descriptions
    return f"{field.metadata['help']} [{preset} preset: {value}]".replace("%", "%%")


class _OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line, like the command's other errors (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(preset: str = "atari") -> argparse.ArgumentParser:
    """The command line; ``--help`` shows each hyperparameter's description and its value in ``preset``."""
    if preset not in PRESETS:
        preset = "atari"
    parser = _OneLineParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    fields = {field.name: field for field in dataclasses.fields(DreamerV2Config)}
    run = parser.add_argument_group("run")
    run.add_argument("--preset", default="atari", choices=sorted(PRESETS),
                     help="hyperparameter preset: atari (paper, Atari), atari100k (Atari 100k on a CPU: the paper's "
                     "Atari protocol, CPU-sized networks, 100k agent steps in under 2 hours on one thread), dmc (paper, "
                     "DMC from pixels), small (CPU-sized networks, the paper's behaviour settings: small tasks such as "
                     "CartPole on a CPU), debug (a smoke test: tiny networks on Catch) [default: atari; --preset <name> "
                     "--help shows its values]")
    run.add_argument("--game", default=None, help="Atari game, e.g. Pong, Boxing, Freeway (sets --env atari:<game>)")
    run.add_argument("--env", default=None, help=_hyper_help(fields["env"], preset))
    run.add_argument("--logdir", default=None, help="run directory (default: logs/<env>-<preset>-seed<seed>)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="device of models and updates (auto: cuda when available) [default: auto]")
    run.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                     help=_hyper_help(fields["precision"], preset))
    run.add_argument("--seed", type=_number(int), default=None, metavar="INT", help=_hyper_help(fields["seed"], preset))
    run.add_argument("--num-envs", type=_number(int), default=None, metavar="INT",
                     help=_hyper_help(fields["num_envs"], preset))
    run.add_argument("--minimal-actions", action="store_true", help="Atari: minimal action set instead of all 18")
    run.add_argument("--serial-envs", action="store_true", help="step several envs in this process")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--threads", type=parse_threads, default=None, metavar="INT",
                     help="CPU threads of the learner (default: torch's, one per core). On the CPU the update runs as "
                          "that many shards of the batch, one thread each, which holds its speed beside the env "
                          "workers; a seeded run repeats bit for bit for a given count. OpenMP threads wait passively, "
                          "see OMP_WAIT_POLICY")
    run.add_argument("--compile", action="store_true", help=_hyper_help(fields["compile"], preset))
    run.add_argument("--cudagraph", action="store_true", help=_hyper_help(fields["cudagraph"], preset))
    run.add_argument("--keep-saved-config", action="store_true",
                     help="resume a run whose saved settings differ from this command's, with the saved ones")
    run.add_argument("--fresh-replay", action="store_true",
                     help="resume the models, optimisers and counters, but discard the saved replay and refill it "
                          "(when its files are damaged)")
    dist = parser.add_argument_group("past one machine (Ray: pip install -e \".[distributed]\")")
    dist.add_argument("--collectors", type=_number(int), default=None, metavar="N",
                      help="Ray collector workers, each stepping its env (one CPU each)")
    dist.add_argument("--learners", type=_number(int), default=None, metavar="G",
                      help="data-parallel learner ranks (gloo on CPUs, nccl on GPUs); --batch-size is split over them")
    dist.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                      help="join a running Ray cluster (default: start a local one)")
    dist.add_argument("--updates-per-command", type=_number(int), default=None, metavar="K",
                      help="updates per learner command: worker batches of K * train_every steps, K updates, one "
                           "weight publication (the same update ratio, fewer Ray calls; default 1)")
    hyper = parser.add_argument_group(f"hyperparameters (default: the preset's value, shown for --preset {preset})")
    hints = typing.get_type_hints(DreamerV2Config)
    for field in fields.values():
        if field.name in _SPECIAL:
            continue
        kind = hints[field.name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        if kind is bool:
            parse, metavar = _parse_bool, "BOOL"
        elif kind in (int, float):
            parse, metavar = _number(kind), kind.__name__.upper()
        else:
            parse, metavar = str, None if choices else "STR"
        hyper.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=parse, default=None,
                           choices=choices, metavar=metavar, help=_hyper_help(field, preset))
    return parser


class UsageError(Exception):
    """A bad command line: one line, exit status 2 (as argparse's own errors)."""


def make_config(args: argparse.Namespace) -> DreamerV2Config:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DreamerV2Config)
                 if f.name not in _SPECIAL and getattr(args, f.name) is not None}
    for name in ("seed", "num_envs", "precision"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for name in ("compile", "cudagraph"):
        if getattr(args, name):
            overrides[name] = True
    if args.game and args.env:
        raise UsageError("give either --game or --env, not both")
    if args.game:
        overrides["env"] = f"atari:{args.game}"
    elif args.env:
        overrides["env"] = args.env
    try:
        cfg = DreamerV2Config.preset(args.preset, **overrides)
        if args.minimal_actions:
            if not cfg.env.startswith("atari:"):
                raise UsageError("--minimal-actions applies to atari: environments only")
            cfg = cfg.replace(env_kwargs={**cfg.env_kwargs, "full_action_space": False})
    except (TypeError, ValueError) as err:  # one line naming the field, its value and the allowed range
        raise UsageError(str(err)) from None
    return cfg


def notes(cfg: DreamerV2Config, preset: str) -> list[str]:
    """One-line notes on a valid but probably unintended command."""
    lines = []
    if preset == "debug" and cfg.total_steps > DEBUG_STEPS_NOTE:
        lines.append(f"note: the debug preset is a smoke test (tiny networks), not a training setup: "
                     f"{cfg.total_steps:_} steps of it will not learn much; use --preset small on a CPU, atari or dmc on "
                     "a GPU")
    if not cfg.is_builtin_env and cfg.action_repeat != 1:
        lines.append(f"note: {cfg.env} is your own env factory: it is not wrapped, --action-repeat "
                     f"{cfg.action_repeat} only scales the logged frames (set it to the frames your env does per "
                     "step, 1 if it does not repeat actions)")
    return lines


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # the library's warnings as one line each (threads, spinning, ...)
    # the preset first, so that --help shows its values
    preset_parser = _OneLineParser(add_help=False, allow_abbrev=False)
    preset_parser.add_argument("--preset", default="atari")
    args = build_parser(preset_parser.parse_known_args(argv)[0].preset).parse_args(argv)
    try:
        cfg = make_config(args)
    except UsageError as err:  # every one-line error exits with 2, as argparse's own
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in notes(cfg, args.preset):
        print(line, file=sys.stderr)
    name = cfg.env.replace(":", "-").replace(".", "-")
    if args.logdir is not None and not args.logdir.strip():
        print("error: --logdir is empty; give a directory, or leave the flag out for logs/<env>-<preset>-seed<seed>.",
              file=sys.stderr)
        return 2
    logdir = args.logdir or f"logs/{name}-{args.preset}-seed{cfg.seed}"
    if args.collectors is not None or args.learners is not None or args.ray_address is not None \
            or args.updates_per_command is not None:
        return _train_on_ray(cfg, logdir, args)
    try:
        trainer = make_dreamerv2_trainer(
            cfg, logdir, device=args.device, progress=not args.no_progress, parallel_envs=not args.serial_envs,
            keep_saved_config=args.keep_saved_config, fresh_replay=args.fresh_replay, threads=args.threads,
        )
    except (OSError, CheckpointError, RunLockedError, ValueError, TypeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = trainer.config
    print(f"{'Resuming' if trainer.resumed else 'Starting'} DreamerV2 on {cfg.env} ({args.preset} preset) in "
          f"{trainer.logdir} on {trainer.device}, at {trainer.steps} / "
          f"{cfg.total_steps} agent steps", flush=True)
    try:
        result = trainer.train()
    except (CheckpointWriteError, NonFiniteUpdateError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["interrupted"]:
        print(f"Interrupted: checkpoint saved in {trainer.logdir}; run the same command to resume.")
    print(json.dumps(result))
    return 130 if result["interrupted"] else 0


def _train_on_ray(cfg: DreamerV2Config, logdir: str, args: argparse.Namespace) -> int:
    """The same run on TorchRL's Ray backends: collector workers, the replay as a service, DDP learner ranks."""
    try:
        from torchrl_dreamer.trainers.distributed import DistributedFailure, make_dreamerv2_ray_trainer

        trainer = make_dreamerv2_ray_trainer(
            cfg, logdir, collectors=args.collectors or 1, learners=args.learners or 1, ray_address=args.ray_address,
            learner_gpus=1 if args.device == "cuda" else 0, progress=not args.no_progress,
            keep_saved_config=args.keep_saved_config, updates_per_command=args.updates_per_command or 1,
        )
    except (OSError, ValueError, TypeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'Resuming' if trainer.resumed else 'Starting'} DreamerV2 on {cfg.env} on Ray ({args.collectors or 1} "
          f"collectors, {args.learners or 1} learners) in {trainer.logdir}, at "
          f"{trainer.collected_frames // cfg.action_repeat} / {cfg.total_steps} agent steps", flush=True)
    try:
        result = trainer.train()
    except DistributedFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
