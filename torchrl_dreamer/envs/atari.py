"""Atari environments following the DreamerV2 evaluation protocol.

The emulator-level work (action repeat, max-pooling, no-op starts, grayscale, area resize) runs in gymnasium
wrappers, under TorchRL, where it is cheapest; the TorchRL side only converts to tensors and tracks episode starts.

Protocol (Hafner et al., 2021, "Mastering Atari with Discrete World Models", section 2 of the project spec):

=====================  ===========================================================================
sticky actions         ``repeat_action_probability=0.25``, applied by ALE on every emulator frame
no-op starts           1 to 30 NOOP frames after each reset (gymnasium/gym ``AtariPreprocessing``,
                       the wrapper the reference code uses)
action repeat          4 emulator frames per agent step (``frame_skip``; ``DreamerV2Config.action_repeat``
                       through ``make_env``), rewards summed, observation = max over the last two frames
observation            grayscale, ``cv2.INTER_AREA``-resized to 64x64, uint8 ``[1, 64, 64]``
action set             the full 18 actions (``full_action_space=False`` for the minimal set)
life loss              not a terminal
time limit             27,000 agent steps (108k frames at frame_skip 4), a truncation (``truncated=True``,
                       ``terminated=False``)
=====================  ===========================================================================
"""
from __future__ import annotations

import ale_py
import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import AtariPreprocessing, TimeLimit
from torchrl.envs import TransformedEnv

from torchrl_dreamer.envs._utils import wrap_pixel_gym_env

__all__ = ["make_atari_env", "make_atari_gymnasium_env"]

gym.register_envs(ale_py)


class _ChannelFirstPixels(gym.ObservationWrapper):
    """Returns ``{"pixels": obs}`` with the channel dimension first, so that TorchRL names the key ``"pixels"``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        shape = env.observation_space.shape
        self._gray = len(shape) == 2
        chw = (1, *shape) if self._gray else (shape[2], shape[0], shape[1])
        self.observation_space = gym.spaces.Dict(
            {"pixels": gym.spaces.Box(low=0, high=255, shape=chw, dtype=np.uint8)}
        )

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        if self._gray:
            return {"pixels": observation[None]}
        return {"pixels": np.ascontiguousarray(observation.transpose(2, 0, 1))}


def _gymnasium_id(game: str) -> str:
    env_id = f"ALE/{game}-v5"
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise ValueError(
            f"Unknown Atari game {game!r}: expected an ALE name in CamelCase such as 'Pong', 'Breakout' or "
            f"'MsPacman' (gymnasium id {env_id!r} is not registered)."
        ) from err
    return env_id


def make_atari_gymnasium_env(
    game: str,
    *,
    sticky_actions: float = 0.25,
    noop_max: int = 30,
    frame_skip: int = 4,
    size: int = 64,
    grayscale: bool = True,
    full_action_space: bool = True,
    max_episode_steps: int | None = 27000,
) -> gym.Env:
    """Builds the gymnasium-level Atari stack of the DreamerV2 protocol (no TorchRL).

    ALE runs with ``frameskip=1``; ``AtariPreprocessing`` repeats each action ``frame_skip`` times, sums the
    rewards, max-pools the last two frames, performs the no-op starts and the area resize; ``TimeLimit`` truncates
    after ``max_episode_steps`` agent steps. ALE's own frame limit is disabled so that only the agent-step limit
    applies.

    Args:
        game: ALE game name in CamelCase, e.g. ``"Pong"``.
        sticky_actions: ALE ``repeat_action_probability``. Defaults to 0.25.
        noop_max: maximum number of no-op frames at reset (0 disables them). Defaults to 30.
        frame_skip: emulator frames per agent step. Defaults to 4.
        size: side of the square observation. Defaults to 64.
        grayscale: grayscale (1 channel) or RGB (3 channels) observations. Defaults to True.
        full_action_space: the 18 legal actions, or the game's minimal set. Defaults to True.
        max_episode_steps: agent steps before truncation; ``None`` for no limit. Defaults to 27,000.

    Returns:
        A gymnasium env with a ``Dict`` observation ``{"pixels": uint8 [C, size, size]}`` and a ``Discrete``
        action space.

    Example:
        >>> env = make_atari_gymnasium_env("Pong", max_episode_steps=10)
        >>> obs, info = env.reset(seed=0)
        >>> obs["pixels"].shape, int(env.action_space.n)
        ((1, 64, 64), 18)
    """
    if isinstance(frame_skip, bool) or not isinstance(frame_skip, int) or frame_skip < 1:
        raise ValueError(f"frame_skip must be an integer >= 1, got {frame_skip!r}.")
    env = gym.make(
        _gymnasium_id(game),
        frameskip=1,
        repeat_action_probability=sticky_actions,
        full_action_space=full_action_space,
        obs_type="grayscale" if grayscale else "rgb",
        max_num_frames_per_episode=0,
        disable_env_checker=True,
    )
    env = AtariPreprocessing(
        env,
        noop_max=noop_max,
        frame_skip=frame_skip,
        screen_size=size,
        terminal_on_life_loss=False,
        grayscale_obs=grayscale,
        scale_obs=False,
    )
    if max_episode_steps is not None:
        env = TimeLimit(env, max_episode_steps=max_episode_steps)
    return _ChannelFirstPixels(env)


def make_atari_env(
    game: str,
    *,
    sticky_actions: float = 0.25,
    noop_max: int = 30,
    frame_skip: int = 4,
    size: int = 64,
    grayscale: bool = True,
    full_action_space: bool = True,
    max_episode_steps: int | None = 27000,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> TransformedEnv:
    """Builds a TorchRL Atari environment following the DreamerV2 protocol.

    Keys: ``"pixels"`` uint8 ``[C, size, size]`` (C = 1 in grayscale, 3 in RGB), ``"action"`` one-hot
    (``OneHot`` spec with 18 actions by default), ``("next", "reward")`` float32 ``[1]`` (the sum over the
    repeated frames, not clipped), ``"done"`` / ``"terminated"`` / ``"truncated"`` bool ``[1]`` and ``"is_init"``
    (``InitTracker``). Losing a life does not end the episode; reaching ``max_episode_steps`` sets ``truncated``
    and leaves ``terminated`` False.

    Args:
        game: ALE game name in CamelCase, e.g. ``"Pong"``, ``"Breakout"``, ``"MsPacman"``.
        sticky_actions: probability that ALE repeats the previous action on each frame. Defaults to 0.25.
        noop_max: maximum number of no-op frames at reset (0 disables them). Defaults to 30.
        frame_skip: action repeat, in emulator frames. Defaults to 4.
        size: side of the square observation. Defaults to 64.
        grayscale: grayscale (1 channel) or RGB (3 channels) observations. Defaults to True.
        full_action_space: the 18 legal actions (paper) or the game's minimal set. Defaults to True.
        max_episode_steps: agent steps before truncation; ``None`` for no limit. Defaults to 27,000.
        seed: seeds the emulator, the sticky actions and the no-op draws. Defaults to None.
        device: device of the output tensors. Defaults to ``"cpu"``.

    Returns:
        A ``TransformedEnv`` (``GymWrapper`` + ``InitTracker``) with batch size ``[]``.

    Example:
        >>> env = make_atari_env("Pong", seed=0)
        >>> td = env.rollout(3)
        >>> td["pixels"].shape, td["pixels"].dtype, td["action"].shape
        (torch.Size([3, 1, 64, 64]), torch.uint8, torch.Size([3, 18]))
    """
    gym_env = make_atari_gymnasium_env(
        game,
        sticky_actions=sticky_actions,
        noop_max=noop_max,
        frame_skip=frame_skip,
        size=size,
        grayscale=grayscale,
        full_action_space=full_action_space,
        max_episode_steps=max_episode_steps,
    )
    return wrap_pixel_gym_env(gym_env, seed=seed, device=device)
