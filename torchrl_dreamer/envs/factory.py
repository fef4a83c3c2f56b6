"""One entry point to build every environment the DreamerV2 examples and tests use, by name."""
from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.envs import Compose, EnvBase, InitTracker, Transform, TransformedEnv

from torchrl_dreamer.envs.atari import make_atari_env
from torchrl_dreamer.envs.catch import CatchEnv
from torchrl_dreamer.envs.minatar import make_minatar_env
from torchrl_dreamer.envs.suites import make_dmc_env, make_gym_env

__all__ = ["SUPPORTED_ENV_NAMES", "ActionRepeat", "make_env"]

SUPPORTED_ENV_NAMES = (
    '"atari:<Game>" (e.g. "atari:Pong"), '
    '"gym:<gymnasium id>" (e.g. "gym:CartPole-v1", "gym:Pendulum-v1"), '
    '"dmc:<domain>-<task>" (e.g. "dmc:walker-walk"), '
    '"minatar:<Game>" (e.g. "minatar:Breakout"), '
    '"catch" or "catch:<size>" (e.g. "catch:16")'
)


def _bad_name(name: str, why: str) -> ValueError:
    return ValueError(f"Cannot build env {name!r}: {why}. Supported names: {SUPPORTED_ENV_NAMES}.")


class ActionRepeat(Transform):
    """Repeats each action ``repeat`` times in the parent env, summing the rewards and stopping at ``done``.

    Unlike TorchRL's ``FrameSkipTransform`` it stops at the end of an episode and carries the state entries of each
    inner step into the next one, so that it also repeats stateless envs such as :class:`CatchEnv`.

    Example:
        >>> env = TransformedEnv(CatchEnv(size=16, seed=0), ActionRepeat(4))
        >>> env.rollout(100).shape  # 15 frames: 4 + 4 + 4 + 3
        torch.Size([4])
    """

    def __init__(self, repeat: int) -> None:
        super().__init__()
        if repeat < 1:
            raise ValueError(f"ActionRepeat needs repeat >= 1, got {repeat}.")
        self.repeat = repeat

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        parent = self.parent
        reward_key = parent.reward_key
        reward = next_tensordict.get(reward_key)
        state_keys = list(parent.full_observation_spec.keys(True, True))
        for _ in range(self.repeat - 1):
            if next_tensordict.get("done").any():
                break
            inner = tensordict.clone(False).update(next_tensordict.select(*state_keys, strict=False))
            next_tensordict = parent._step(inner)
            reward = reward + next_tensordict.get(reward_key)
        return next_tensordict.set(reward_key, reward)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        raise RuntimeError("ActionRepeat acts on env steps only: append it to a TransformedEnv.")


def make_env(
    name: str,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    action_repeat: int | None = None,
    **kwargs: Any,
) -> EnvBase:
    """Builds an environment from a ``"<suite>:<id>"`` name; every stack ends with ``InitTracker``.

    ========================  ===============================================================================
    name                      environment
    ========================  ===============================================================================
    ``atari:<Game>``          :func:`make_atari_env` (DreamerV2 Atari protocol), uint8 ``"pixels"`` [1, 64, 64]
    ``gym:<gymnasium id>``    :func:`make_gym_env`, float32 ``"observation"``, actions one-hot or in [-1, 1]
    ``dmc:<domain>-<task>``   :func:`make_dmc_env`, uint8 RGB ``"pixels"`` [3, 64, 64], action repeat 2 by default
    ``minatar:<Game>``        :func:`make_minatar_env` (MinAtar, an extra), uint8 ``"pixels"`` [C, 20, 20]
    ``catch`` / ``catch:N``   :class:`CatchEnv` on an N x N grid (default 16), uint8 ``"pixels"`` [1, N, N]
                              (``vector_obs=True`` adds a float32 ``"observation"`` [3])
    ========================  ===============================================================================

    Args:
        name: the environment name, in one of the forms above.
        seed: seed of the environment. Defaults to None.
        device: device of the output tensors. Defaults to ``"cpu"``.
        action_repeat: frames per agent step, for every suite: Atari's ``frame_skip`` (emulator frames, rewards
            summed, last two frames max-pooled), DMC's physics control steps, a gymnasium action repeat for
            ``gym:``, :class:`ActionRepeat` for ``catch``. ``None`` keeps the suite's default (Atari 4, DMC 2,
            gym and catch 1); :attr:`DreamerV2Config.make_env_kwargs` always sets it.
        **kwargs: forwarded to the suite's builder, e.g. ``full_action_space=False`` or ``max_episode_steps`` for
            Atari, ``gymnasium.make`` kwargs for ``gym:``, ``size`` / ``camera_id`` for ``dmc:``, ``scale`` /
            ``max_episode_steps`` for ``minatar:``, ``scale`` / ``vector_obs`` for ``catch``.

    Returns:
        A TorchRL env with batch size ``[]``, a one-hot ``"action"`` for discrete actions and ``"is_init"``.

    Raises:
        ValueError: for an unknown suite or a malformed name (the message lists the supported forms).
        ImportError: for ``dmc:`` names when dm_control is not installed, ``minatar:`` names without MinAtar.

    Example:
        >>> env = make_env("catch:8", seed=0)
        >>> sorted(env.rollout(3).keys())
        ['action', 'ball', 'done', 'is_init', 'next', 'paddle', 'pixels', 'terminated', 'truncated']
    """
    suite, _, rest = name.partition(":")
    if action_repeat is not None and (isinstance(action_repeat, bool) or not isinstance(action_repeat, int)
                                      or action_repeat < 1):
        raise ValueError(f"action_repeat must be an integer >= 1, got {action_repeat!r}.")
    for key in ("frame_skip", "frameskip"):
        if action_repeat is not None and key in kwargs:
            raise ValueError(f"Give action_repeat or {key}, not both (got {action_repeat} and {kwargs[key]}).")
    if suite == "atari":
        if not rest:
            raise _bad_name(name, "missing game after 'atari:'")
        if action_repeat is not None:
            kwargs["frame_skip"] = action_repeat
        return make_atari_env(rest, seed=seed, device=device, **kwargs)
    if action_repeat is not None and suite in ("gym", "dmc", "minatar"):
        kwargs["action_repeat"] = action_repeat
    if suite == "gym":
        if not rest:
            raise _bad_name(name, "missing gymnasium id after 'gym:'")
        return make_gym_env(rest, seed=seed, device=device, **kwargs)
    if suite == "dmc":
        domain, sep, task = rest.partition("-")
        if not (domain and sep and task) or "-" in task:
            raise _bad_name(name, "expected 'dmc:<domain>-<task>'")
        return make_dmc_env(domain, task, seed=seed, device=device, **kwargs)
    if suite == "minatar":
        if not rest:
            raise _bad_name(name, "missing game after 'minatar:'")
        return make_minatar_env(rest, seed=seed, device=device, **kwargs)
    if suite == "catch":
        if name == "catch":
            size = kwargs.pop("size", 16)
        elif rest.isdigit() and "size" not in kwargs:
            size = int(rest)
        else:
            raise _bad_name(name, "expected 'catch' or 'catch:<size>' with an integer size (not both)")
        catch = CatchEnv(size=size, seed=seed, device=device, **kwargs)
        if action_repeat is not None and action_repeat > 1:
            return TransformedEnv(catch, Compose(ActionRepeat(action_repeat), InitTracker()))
        return TransformedEnv(catch, InitTracker())
    raise _bad_name(name, f"unknown suite {suite!r}")
