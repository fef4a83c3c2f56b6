"""Environments a user might bring, built with TorchRL pieces only (imported by the tests as env factories)."""
from __future__ import annotations

import ale_py
import gymnasium as gym
import torch
from torchrl.envs import Compose, GrayScale, GymEnv, InitTracker, ToTensorImage, TransformedEnv

from torchrl_dreamer.envs import CatchEnv

gym.register_envs(ale_py)


def dict_catch() -> CatchEnv:
    """Catch with an image and a vector observation; no InitTracker (the library adds it)."""
    return CatchEnv(size=8, scale=2, vector_obs=True)


def pong_gray() -> TransformedEnv:
    """Atari Pong through TorchRL's GymEnv and stock transforms: 210 x 160 grayscale uint8 frames, channels first."""
    env = GymEnv("ALE/Pong-v5", frameskip=4, repeat_action_probability=0.25, categorical_action_encoding=False)
    return TransformedEnv(
        env,
        Compose(
            ToTensorImage(from_int=False, dtype=torch.uint8, in_keys=["pixels"]),
            GrayScale(in_keys=["pixels"]),
            InitTracker(),
        ),
    )


def pong_float() -> TransformedEnv:
    """Atari Pong with TorchRL's ToTensorImage at its defaults: float frames in [0, 1], channels first, grayscale."""
    env = GymEnv("ALE/Pong-v5", frameskip=4, repeat_action_probability=0.25, categorical_action_encoding=False)
    return TransformedEnv(env, Compose(ToTensorImage(in_keys=["pixels"]), GrayScale(in_keys=["pixels"])))
