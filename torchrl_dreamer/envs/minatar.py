"""MinAtar games (Young & Tian, 2019): miniature Atari on a 10 x 10 grid of object planes, as uint8 pixels.

MinAtar is a third-party package (``pip install "torchrl_dreamer[minatar]"``) that renders five Atari games
(Asterix, Breakout, Freeway, Seaquest, Space Invaders) as ``10 x 10 x C`` boolean images, one channel per kind of
object, with sticky actions (0.1) and the game's minimal action set. The agent must learn the dynamics from images,
as in Atari, at a cost that fits a CPU: this suite is the pixel task of ``benchmarks/learning.py``.

Each channel becomes a uint8 plane (0 or 255), channel first, under ``"pixels"``; the planes are enlarged
``scale`` times by pixel repetition (nearest neighbour, lossless) because the image encoder needs at least
``MIN_IMAGE_SIZE`` (16) pixels per side. MinAtar's own gymnasium registration is used (``MinAtar/<Game>-v1``,
minimal action set); gymnasium's ``TimeLimit`` bounds the episodes, since a good Breakout player never loses.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torchrl.envs import TransformedEnv

from torchrl_dreamer.envs._utils import wrap_pixel_gym_env

__all__ = ["MINATAR_GAMES", "make_minatar_env"]

MINATAR_GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")
MINATAR_INSTALL_HINT = 'pip install "torchrl_dreamer[minatar]"'


class _ObjectPlanes(gym.ObservationWrapper):
    """``bool [H, W, C]`` object planes -> ``{"pixels": uint8 [C, H * scale, W * scale]}`` in {0, 255}."""

    def __init__(self, env: gym.Env, scale: int) -> None:
        super().__init__(env)
        self.scale = scale
        height, width, channels = env.observation_space.shape
        self.observation_space = gym.spaces.Dict(
            {"pixels": gym.spaces.Box(0, 255, (channels, height * scale, width * scale), np.uint8)}
        )

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        planes = np.ascontiguousarray(observation.transpose(2, 0, 1), dtype=np.uint8) * np.uint8(255)
        if self.scale > 1:
            planes = planes.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        return {"pixels": planes}


def make_minatar_env(
    game: str,
    *,
    scale: int = 2,
    max_episode_steps: int | None = 10_000,
    action_repeat: int = 1,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> TransformedEnv:
    """Builds a TorchRL env around a MinAtar game.

    Keys: ``"pixels"`` uint8 ``[C, 10 * scale, 10 * scale]`` (one plane per object kind: 4 in Breakout, 6 in
    Space Invaders), ``"action"`` one-hot over the game's minimal action set, ``("next", "reward")`` float32 ``[1]``,
    ``"done"`` / ``"terminated"`` / ``"truncated"`` and ``"is_init"``.

    Args:
        game: one of :data:`MINATAR_GAMES`, e.g. ``"Breakout"``.
        scale: pixels per grid cell side (the encoder needs at least 16 pixels per side). Defaults to 2 (20 x 20).
        max_episode_steps: agent steps before truncation; ``None`` for MinAtar's own ending only. Defaults to 10,000.
        action_repeat: must be 1: MinAtar games run one frame per action (sticky actions included).
        seed: seeds the game and its sticky actions. Defaults to None.
        device: device of the output tensors. Defaults to ``"cpu"``.
        **kwargs: forwarded to MinAtar's environment, e.g. ``sticky_action_prob=0.0`` or
            ``difficulty_ramping=False``.

    Raises:
        ValueError: for an unknown game, a scale that gives frames under 16 pixels, or ``action_repeat != 1``.
        ImportError: when MinAtar is not installed (the message says how to install it).

    Example:
        >>> env = make_minatar_env("Breakout", seed=0)
        >>> td = env.rollout(3)
        >>> td["pixels"].shape, td["pixels"].dtype, td["action"].shape
        (torch.Size([3, 4, 20, 20]), torch.uint8, torch.Size([3, 3]))
    """
    from torchrl_dreamer.modules.networks import MIN_IMAGE_SIZE

    if game not in MINATAR_GAMES:
        raise ValueError(f"Unknown MinAtar game {game!r}; the games are {', '.join(MINATAR_GAMES)}.")
    if isinstance(scale, bool) or not isinstance(scale, int) or 10 * scale < MIN_IMAGE_SIZE:
        raise ValueError(f"scale must be an integer >= {-(-MIN_IMAGE_SIZE // 10)} (frames of at least "
                         f"{MIN_IMAGE_SIZE} pixels), got {scale!r}.")
    if action_repeat != 1:
        raise ValueError(f"MinAtar games take one action per frame: action_repeat must be 1, got {action_repeat!r}.")
    try:
        import minatar.gym
    except ImportError as err:
        raise ImportError(f"The minatar: suite needs MinAtar: {MINATAR_INSTALL_HINT}") from err
    env_id = f"MinAtar/{game}-v1"
    if env_id not in gym.registry:
        minatar.gym.register_envs()
    env = gym.make(env_id, max_episode_steps=max_episode_steps, disable_env_checker=True, **kwargs)
    return wrap_pixel_gym_env(_ObjectPlanes(env, scale), seed=seed, device=device)
