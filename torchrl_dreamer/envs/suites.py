"""Vector-observation gymnasium environments and pixel DeepMind Control Suite environments for DreamerV2."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import DtypeObservation, FlattenObservation, RescaleAction
from torchrl.envs import Compose, DoubleToFloat, GymWrapper, InitTracker, PermuteTransform, TransformedEnv

from torchrl_dreamer.envs._utils import declare_uint8_pixels

__all__ = ["make_dmc_env", "make_gym_env"]

DMC_INSTALL_HINT = 'pip install "torchrl_dreamer[dmc]"'


class _ActionRepeat(gym.Wrapper):
    """Repeats each action ``repeat`` times, summing the rewards and stopping at the end of the episode."""

    def __init__(self, env: gym.Env, repeat: int) -> None:
        super().__init__(env)
        self.repeat = repeat

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            observation, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return observation, total, terminated, truncated, info


def make_gym_env(
    env_id: str,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    action_repeat: int = 1,
    **kwargs: Any,
) -> TransformedEnv:
    """Builds a TorchRL env around a vector-observation gymnasium env.

    Observations are flattened (``Discrete`` and ``Dict`` spaces included) into a float32 vector under
    ``"observation"``; ``Discrete`` actions are one-hot; ``Box`` actions are rescaled to ``[-1, 1]``. The
    gymnasium time limit of the registered env (e.g. 500 steps for CartPole) becomes ``truncated=True``; it counts
    gymnasium steps, so with ``action_repeat=2`` a CartPole episode lasts at most 250 agent steps.

    Args:
        env_id: a registered gymnasium id, e.g. ``"CartPole-v1"`` or ``"Pendulum-v1"``.
        seed: seed of the env. Defaults to None.
        device: device of the output tensors. Defaults to ``"cpu"``.
        action_repeat: gymnasium steps per agent step (the action repeated, rewards summed, stopping at the end of
            the episode; the observation is the last one). Defaults to 1.
        **kwargs: forwarded to ``gymnasium.make``.

    Returns:
        A ``TransformedEnv`` (``GymWrapper`` + ``InitTracker``) with batch size ``[]`` and keys ``"observation"``,
        ``"action"``, ``("next", "reward")`` float32 ``[1]``, ``"done"``, ``"terminated"``, ``"truncated"``,
        ``"is_init"``.

    Raises:
        ValueError: for an unknown id, or for image observations (use the ``atari:`` or ``dmc:`` suites).

    Example:
        >>> env = make_gym_env("Pendulum-v1", seed=0)
        >>> env.action_spec.space.low, env.action_spec.space.high
        (tensor([-1.]), tensor([1.]))
        >>> env.rollout(4)["observation"].dtype
        torch.float32
    """
    if isinstance(action_repeat, bool) or not isinstance(action_repeat, int) or action_repeat < 1:
        raise ValueError(f"action_repeat must be an integer >= 1, got {action_repeat!r}.")
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise ValueError(f"Unknown gymnasium id {env_id!r} ({err}).") from err
    env = gym.make(env_id, **kwargs)
    if action_repeat > 1:
        env = _ActionRepeat(env, action_repeat)
    space = env.observation_space
    if isinstance(space, gym.spaces.Box) and len(space.shape) > 1:
        raise ValueError(
            f"gym:{env_id} has image-like observations of shape {space.shape}; the 'gym:' suite is for vector "
            "observations (use 'atari:<Game>', 'minatar:<Game>' or 'dmc:<domain>-<task>' for pixels)."
        )
    if not isinstance(space, gym.spaces.Box):
        env = FlattenObservation(env)
    if env.observation_space.dtype != np.float32:
        env = DtypeObservation(env, np.float32)
    action_space = env.action_space
    if isinstance(action_space, gym.spaces.Box) and not (
        np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)
    ):
        ones = np.ones(action_space.shape, dtype=action_space.dtype)
        env = RescaleAction(env, -ones, ones)
    wrapped = TransformedEnv(
        GymWrapper(env, categorical_action_encoding=False, device=device), InitTracker()
    )
    if seed is not None:
        wrapped.set_seed(seed)
    return wrapped


def make_dmc_env(
    domain: str,
    task: str,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    action_repeat: int = 2,
    size: int = 64,
    camera_id: int | None = None,
) -> TransformedEnv:
    """Builds a pixel DeepMind Control Suite env with the DreamerV2 ``dmc`` preset.

    Action repeat 2 (rewards summed), RGB frames rendered at ``size x size`` and returned channel-first as uint8
    ``[3, size, size]`` under ``"pixels"`` (no proprioceptive entries); actions are the suite's ``[-1, 1]`` boxes,
    in float32 like the reward (dm_control's float64 is cast at the TorchRL boundary).
    As in the reference code, the quadruped uses camera 2 and every other domain camera 0.

    Args:
        domain: suite domain, e.g. ``"walker"`` or ``"ball_in_cup"``.
        task: task of the domain, e.g. ``"walk"`` or ``"catch"``.
        seed: seed of the task's random state. Defaults to None.
        device: device of the output tensors. Defaults to ``"cpu"``.
        action_repeat: physics control steps per agent step. Defaults to 2.
        size: side of the rendered square frame. Defaults to 64.
        camera_id: camera to render; None picks the reference's choice. Defaults to None.

    Returns:
        A ``TransformedEnv`` (``DMControlWrapper`` + ``PermuteTransform`` + ``DoubleToFloat`` + ``InitTracker``).

    Raises:
        ImportError: when dm_control (the optional ``dmc`` extra) is not installed.

    Example:
        >>> env = make_dmc_env("walker", "walk", seed=0)  # doctest: +SKIP
        >>> env.rollout(2)["pixels"].shape  # doctest: +SKIP
        torch.Size([2, 3, 64, 64])
    """
    try:
        from dm_control import suite
    except ImportError as err:
        raise ImportError(
            f"The 'dmc:' suite needs the optional dm_control dependency: {DMC_INSTALL_HINT}"
        ) from err
    from torchrl.envs import DMControlWrapper

    if camera_id is None:
        camera_id = 2 if domain == "quadruped" else 0
    base = DMControlWrapper(
        suite.load(domain, task),
        from_pixels=True,
        pixels_only=True,
        render_kwargs={"height": size, "width": size},
        camera_id=camera_id,
        frame_skip=action_repeat,
        device=device,
    )
    declare_uint8_pixels(base)
    transforms = Compose(
        PermuteTransform((-1, -3, -2), in_keys=["pixels"]),  # dm_control renders [H, W, 3]: channels first
        DoubleToFloat(in_keys_inv=["action"]),  # float64 reward and action specs -> float32
        InitTracker(),
    )
    env = TransformedEnv(base, transforms)
    if seed is not None:
        env.set_seed(seed)
    return env
