"""Environments: the DreamerV2 Atari protocol, gymnasium, DMC and MinAtar suites, the Catch test game, and
imagination in a world model."""
from __future__ import annotations

from torchrl_dreamer.envs.atari import make_atari_env, make_atari_gymnasium_env
from torchrl_dreamer.envs.catch import CatchEnv
from torchrl_dreamer.envs.factory import SUPPORTED_ENV_NAMES, make_env
from torchrl_dreamer.envs.minatar import MINATAR_GAMES, make_minatar_env
from torchrl_dreamer.envs.imagination import (
    DecodeObservation,
    DreamerV2ImaginationEnv,
    ImaginationHeads,
    InverseRewardTransform,
)
from torchrl_dreamer.envs.resolve import EnvFactory, EnvLike, load_factory, prepare_env
from torchrl_dreamer.envs.suites import make_dmc_env, make_gym_env

__all__ = [
    "MINATAR_GAMES",
    "SUPPORTED_ENV_NAMES",
    "CatchEnv",
    "DecodeObservation",
    "InverseRewardTransform",
    "DreamerV2ImaginationEnv",
    "ImaginationHeads",
    "EnvFactory",
    "EnvLike",
    "load_factory",
    "prepare_env",
    "make_atari_env",
    "make_atari_gymnasium_env",
    "make_dmc_env",
    "make_env",
    "make_gym_env",
    "make_minatar_env",
]
