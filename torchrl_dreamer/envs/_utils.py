"""Small helpers shared by the environment builders."""
from __future__ import annotations

import gymnasium as gym
import torch
from torchrl.data import Bounded
from torchrl.envs import EnvBase, GymWrapper, InitTracker, TransformedEnv


def declare_uint8_pixels(env: EnvBase, key: str = "pixels") -> None:
    """Replaces ``env``'s spec of ``key`` by a uint8 spec bounded in ``[0, 255]``, in place.

    Gym-like wrappers read uint8 image spaces as unbounded specs; declaring the range lets ``spec.is_in`` and
    ``spec.rand`` behave like the real frames.

    Example:
        >>> from torchrl_dreamer.envs.catch import CatchEnv
        >>> env = CatchEnv(size=4)
        >>> declare_uint8_pixels(env)
        >>> int(env.observation_spec["pixels"].space.high.max())
        255
    """
    spec = env.observation_spec.clone()
    spec[key] = Bounded(low=0, high=255, shape=spec[key].shape, dtype=torch.uint8, device=env.device)
    env.observation_spec = spec


def wrap_pixel_gym_env(gym_env: gym.Env, *, seed: int | None, device: torch.device | str) -> TransformedEnv:
    """A gymnasium env with a ``{"pixels": uint8 Box}`` observation as a TorchRL env: ``GymWrapper`` (one-hot
    discrete actions) with its pixels declared uint8 in ``[0, 255]`` (:func:`declare_uint8_pixels`), then
    ``InitTracker``, seeded when ``seed`` is given."""
    base = GymWrapper(gym_env, categorical_action_encoding=False, device=device)
    declare_uint8_pixels(base)
    env = TransformedEnv(base, InitTracker())
    if seed is not None:
        env.set_seed(seed)
    return env
