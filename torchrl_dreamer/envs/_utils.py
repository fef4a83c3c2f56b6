"""Small helpers shared by the environment builders."""
from __future__ import annotations

import torch
from torchrl.data import Bounded
from torchrl.envs import EnvBase


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
