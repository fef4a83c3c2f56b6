"""One entry point to build every environment the DreamerV2 examples and tests use, by name."""
from __future__ import annotations

from typing import Any

import torch
from torchrl.envs import EnvBase, InitTracker, TransformedEnv

from torchrl_dreamer.envs.atari import make_atari_env
from torchrl_dreamer.envs.catch import CatchEnv
from torchrl_dreamer.envs.suites import make_dmc_env, make_gym_env

__all__ = ["SUPPORTED_ENV_NAMES", "make_env"]

SUPPORTED_ENV_NAMES = (
    '"atari:<Game>" (e.g. "atari:Pong"), '
    '"gym:<gymnasium id>" (e.g. "gym:CartPole-v1", "gym:Pendulum-v1"), '
    '"dmc:<domain>-<task>" (e.g. "dmc:walker-walk"), '
    '"catch" or "catch:<size>" (e.g. "catch:16")'
)


def _bad_name(name: str, why: str) -> ValueError:
    return ValueError(f"Cannot build env {name!r}: {why}. Supported names: {SUPPORTED_ENV_NAMES}.")


def make_env(name: str, *, seed: int | None = None, device: torch.device | str = "cpu", **kwargs: Any) -> EnvBase:
    """Builds an environment from a ``"<suite>:<id>"`` name; every stack ends with ``InitTracker``.

    ========================  ===============================================================================
    name                      environment
    ========================  ===============================================================================
    ``atari:<Game>``          :func:`make_atari_env` (DreamerV2 Atari protocol), uint8 ``"pixels"`` [1, 64, 64]
    ``gym:<gymnasium id>``    :func:`make_gym_env`, float32 ``"observation"``, actions one-hot or in [-1, 1]
    ``dmc:<domain>-<task>``   :func:`make_dmc_env`, uint8 RGB ``"pixels"`` [3, 64, 64], action repeat 2
    ``catch`` / ``catch:N``   :class:`CatchEnv` on an N x N grid (default 16), uint8 ``"pixels"`` [1, N, N]
                              (``vector_obs=True`` adds a float32 ``"observation"`` [3])
    ========================  ===============================================================================

    Args:
        name: the environment name, in one of the forms above.
        seed: seed of the environment. Defaults to None.
        device: device of the output tensors. Defaults to ``"cpu"``.
        **kwargs: forwarded to the suite's builder, e.g. ``full_action_space=False`` or ``max_episode_steps`` for
            Atari, ``gymnasium.make`` kwargs for ``gym:``, ``action_repeat`` / ``size`` for ``dmc:``, ``scale`` /
            ``vector_obs`` for ``catch``.

    Returns:
        A TorchRL env with batch size ``[]``, a one-hot ``"action"`` for discrete actions and ``"is_init"``.

    Raises:
        ValueError: for an unknown suite or a malformed name (the message lists the supported forms).
        ImportError: for ``dmc:`` names when dm_control is not installed.

    Example:
        >>> env = make_env("catch:8", seed=0)
        >>> sorted(env.rollout(3).keys())
        ['action', 'ball', 'done', 'is_init', 'next', 'paddle', 'pixels', 'terminated', 'truncated']
    """
    suite, _, rest = name.partition(":")
    if suite == "atari":
        if not rest:
            raise _bad_name(name, "missing game after 'atari:'")
        return make_atari_env(rest, seed=seed, device=device, **kwargs)
    if suite == "gym":
        if not rest:
            raise _bad_name(name, "missing gymnasium id after 'gym:'")
        return make_gym_env(rest, seed=seed, device=device, **kwargs)
    if suite == "dmc":
        domain, sep, task = rest.partition("-")
        if not (domain and sep and task) or "-" in task:
            raise _bad_name(name, "expected 'dmc:<domain>-<task>'")
        return make_dmc_env(domain, task, seed=seed, device=device, **kwargs)
    if suite == "catch":
        if name == "catch":
            size = kwargs.pop("size", 16)
        elif rest.isdigit() and "size" not in kwargs:
            size = int(rest)
        else:
            raise _bad_name(name, "expected 'catch' or 'catch:<size>' with an integer size (not both)")
        return TransformedEnv(CatchEnv(size=size, seed=seed, device=device, **kwargs), InitTracker())
    raise _bad_name(name, f"unknown suite {suite!r}")
