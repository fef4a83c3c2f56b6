"""Train DreamerV2 on Atari (or any TorchRL env) with the paper's settings.

    python examples/dreamerv2_atari.py                       # Pong, paper preset
    python examples/dreamerv2_atari.py --game Boxing --device cuda --precision bf16
    python examples/dreamerv2_atari.py --env gym:CartPole-v1 --preset debug
    python examples/dreamerv2_atari.py --env my_package.envs:make_env   # your own TorchRL env factory
    python examples/dreamerv2_atari.py --preset debug --logdir /tmp/dbg   # ~1 minute on a CPU

``--env`` takes a ``make_env`` name (``atari:<Game>``, ``gym:<id>``, ``dmc:<domain>-<task>``, ``catch``) or the
import path ``package.module:function`` of a function that returns a TorchRL ``EnvBase`` (the current directory is
importable); ``InitTracker`` and the policy's recurrent-state primer are added when missing.

Every hyperparameter of the preset can be overridden with ``--<name> <value>``
(see ``--help``). Running the same command again on the same ``--logdir``
resumes from its checkpoint. Ctrl-C saves a checkpoint before exiting.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.trainers import CheckpointError, make_dreamerv2_trainer

_SPECIAL = {"env", "seed", "num_envs", "precision", "env_kwargs"}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _number(kind):
    def parse(text: str):
        value = float(text)  # accepts 5e7
        if kind is int:
            if value != int(value):
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
            return int(value)
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    run = parser.add_argument_group("run")
    run.add_argument("--preset", default="atari", choices=sorted(PRESETS), help="hyperparameter preset")
    run.add_argument("--game", default=None, help="Atari game, e.g. Pong, Boxing, Freeway (sets --env atari:<game>)")
    run.add_argument("--env", default=None, help='a make_env name ("atari:Pong", "gym:CartPole-v1", '
                     '"dmc:walker-walk", "catch") or an env factory "package.module:function"')
    run.add_argument("--logdir", default=None, help="run directory (default: logs/<env>-<preset>-seed<seed>)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--num-envs", type=int, default=None, help="parallel environments")
    run.add_argument("--minimal-actions", action="store_true", help="Atari: minimal action set instead of all 18")
    run.add_argument("--serial-envs", action="store_true", help="step several envs in this process")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    hyper = parser.add_argument_group("hyperparameters (default: the preset's value)")
    hints = typing.get_type_hints(DreamerV2Config)
    for field in dataclasses.fields(DreamerV2Config):
        if field.name in _SPECIAL:
            continue
        kind = hints[field.name]
        if kind is bool:
            parse = _parse_bool
        elif kind in (int, float):
            parse = _number(kind)
        else:
            parse = str
        hyper.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=parse, default=None)
    return parser


def make_config(args: argparse.Namespace) -> DreamerV2Config:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DreamerV2Config)
                 if f.name not in _SPECIAL and getattr(args, f.name) is not None}
    for name in ("seed", "num_envs", "precision"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.game and args.env:
        raise SystemExit("error: give either --game or --env, not both")
    if args.game:
        overrides["env"] = f"atari:{args.game}"
    elif args.env:
        overrides["env"] = args.env
    try:
        cfg = DreamerV2Config.preset(args.preset, **overrides)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    if args.minimal_actions:
        if not cfg.env.startswith("atari:"):
            raise SystemExit("error: --minimal-actions applies to atari: environments only")
        cfg = cfg.replace(env_kwargs={**cfg.env_kwargs, "full_action_space": False})
    for name in ("total_steps", "train_every", "batch_size", "batch_length", "num_envs", "replay_capacity"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = make_config(args)
    name = cfg.env.replace(":", "-").replace(".", "-")
    logdir = args.logdir or f"logs/{name}-{args.preset}-seed{cfg.seed}"
    try:
        trainer = make_dreamerv2_trainer(
            cfg, logdir, device=args.device, progress=not args.no_progress, parallel_envs=not args.serial_envs
        )
    except (OSError, CheckpointError, ValueError, TypeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = trainer.config
    print(f"{'Resuming' if trainer.resumed else 'Starting'} DreamerV2 on {cfg.env} ({args.preset} preset) in "
          f"{trainer.logdir} on {trainer.device}, at {trainer.steps} / "
          f"{cfg.total_steps} agent steps", flush=True)
    result = trainer.train()
    if result["interrupted"]:
        print(f"Interrupted: checkpoint saved in {trainer.logdir}; run the same command to resume.")
    print(json.dumps(result))
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
