"""Environment factories: the DreamerV2 Atari protocol on real ALE games, gymnasium and DMC stacks, names."""
from __future__ import annotations

import os
import sys

import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch
from torchrl.envs.utils import check_env_specs, step_mdp

from torchrl_dreamer.config import BUILTIN_SUITES
from torchrl_dreamer.envs import EnvFactory, factory, make_atari_env, make_env


def _gym_env(env):
    """The gymnasium env under a TorchRL stack (its ``unwrapped`` gives the ALE env)."""
    return env.base_env._env


def _one_hot(index: int, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), n)


def _area_resize(frame: np.ndarray, size: int = 64) -> np.ndarray:
    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------- Atari protocol


def test_atari_keys_dtypes_and_pixel_range():
    env = make_atari_env("Pong", seed=0)
    td = env.rollout(40)
    pixels = td["pixels"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (40, 1, 64, 64)
    assert td["next", "pixels"].shape == (40, 1, 64, 64)
    assert pixels.max() > pixels.min()  # a real frame, not a blank one
    spec = env.observation_spec["pixels"]
    assert spec.dtype == torch.uint8 and int(spec.space.low.min()) == 0 and int(spec.space.high.max()) == 255
    assert spec.is_in(pixels[0])
    assert td["action"].shape == (40, 18) and (td["action"].sum(-1) == 1).all()
    assert td["next", "reward"].dtype == torch.float32 and td["next", "reward"].shape == (40, 1)
    for key in ("done", "terminated", "truncated"):
        assert td["next", key].dtype == torch.bool and td["next", key].shape == (40, 1)
    assert td["is_init"][0].item() and not td["is_init"][1:].any()


def test_atari_rgb_is_channel_first():
    td = make_atari_env("Pong", grayscale=False, seed=0).rollout(3)
    assert td["pixels"].shape == (3, 3, 64, 64) and td["pixels"].dtype == torch.uint8


def test_atari_max_pools_last_two_frames_and_sums_rewards():
    """Replays every agent step on the raw emulator (frameskip 1) and rebuilds the observation and reward by hand."""
    env = make_atari_env("Pong", sticky_actions=0.0, seed=0)
    ale_env = _gym_env(env).unwrapped
    ale, action_set = ale_env.ale, ale_env._action_set
    generator = torch.Generator().manual_seed(0)
    td = env.reset()
    pooling_mattered = reward_before_last_frame = 0
    for _ in range(400):
        action = int(torch.randint(18, (), generator=generator))
        state = ale.cloneState()
        frames, rewards = [], []
        for _ in range(4):
            rewards.append(ale.act(action_set[action]))
            frames.append(ale.getScreenGrayscale())
        ale.restoreState(state)
        expected = _area_resize(np.maximum(frames[-2], frames[-1]))

        td["action"] = _one_hot(action, 18)
        td = env.step(td)
        np.testing.assert_array_equal(td["next", "pixels"][0].numpy(), expected)
        assert td["next", "reward"].item() == sum(rewards)

        pooling_mattered += not np.array_equal(expected, _area_resize(frames[-1]))
        reward_before_last_frame += any(r != 0 for r in rewards[:-1])
        td = step_mdp(td)
        if pooling_mattered > 5 and reward_before_last_frame:
            break
    # Without these the checks above could not tell pooling or summing from their absence.
    assert pooling_mattered > 5
    assert reward_before_last_frame > 0


@pytest.mark.parametrize("full, n_actions", [(True, 18), (False, 6)])
def test_atari_action_count(full, n_actions):
    env = make_env("atari:Pong", full_action_space=full)
    assert env.action_spec.shape == (n_actions,)
    assert env.action_spec.space.n == n_actions
    assert _gym_env(env).action_space.n == n_actions


def test_atari_defaults_are_the_paper_protocol():
    env = make_atari_env("Pong")
    preprocessing = _gym_env(env).env.env  # _ChannelFirstPixels -> TimeLimit -> AtariPreprocessing
    assert isinstance(preprocessing, gym.wrappers.AtariPreprocessing)
    assert preprocessing.frame_skip == 4 and preprocessing.noop_max == 30
    assert not preprocessing.terminal_on_life_loss and preprocessing.grayscale_obs
    assert _gym_env(env).unwrapped._frameskip == 1  # the repeat happens once, in the preprocessing
    assert _gym_env(env).env._max_episode_steps == 27000


@pytest.mark.parametrize("sticky", [0.25, 0.0])
def test_atari_sticky_actions_configured_in_ale(sticky):
    kwargs = {} if sticky == 0.25 else {"sticky_actions": sticky}  # 0.25 must be the default
    env = make_atari_env("Pong", **kwargs)
    ale = _gym_env(env).unwrapped.ale
    assert ale.getFloat("repeat_action_probability") == pytest.approx(sticky)


def test_atari_truncates_at_time_limit():
    env = make_atari_env("Pong", max_episode_steps=50, seed=0)
    td = env.rollout(100)
    assert td.shape == (50,)
    assert td["next", "truncated"][-1].item() and td["next", "done"][-1].item()
    assert not td["next", "terminated"].any()
    assert not td["next", "done"][:-1].any()


def test_atari_life_loss_is_not_terminal():
    env = make_atari_env("Breakout", seed=0)
    ale = _gym_env(env).unwrapped.ale
    generator = torch.Generator().manual_seed(0)
    td = env.reset()
    lives = ale.lives()
    for _ in range(2000):
        td["action"] = _one_hot(int(torch.randint(18, (), generator=generator)), 18)
        td = env.step(td)
        if ale.lives() < lives:
            break
        td = step_mdp(td)
    assert ale.lives() < lives, "no life was lost"
    assert ale.lives() > 0
    assert not td["next", "terminated"].item() and not td["next", "done"].item()


def test_atari_noop_starts():
    env = make_atari_env("Pong", seed=0)
    ale = _gym_env(env).unwrapped.ale
    frames, observations = [], set()
    for _ in range(12):
        observations.add(env.reset()["pixels"].numpy().tobytes())
        frames.append(ale.getEpisodeFrameNumber())
    assert all(1 <= f <= 30 for f in frames)
    assert len(set(frames)) > 3
    assert len(observations) > 1

    no_noop = make_atari_env("Pong", noop_max=0, seed=0)
    no_noop.reset()
    assert _gym_env(no_noop).unwrapped.ale.getEpisodeFrameNumber() == 0


def test_atari_seed_is_deterministic():
    actions = torch.nn.functional.one_hot(torch.randint(18, (30,), generator=torch.Generator().manual_seed(1)), 18)

    def play(seed):
        env = make_atari_env("Pong", seed=seed)
        td, pixels = env.reset(), []
        for action in actions:
            td["action"] = action
            td = env.step(td)
            pixels.append(td["next", "pixels"])
            td = step_mdp(td)
        return torch.stack(pixels), _gym_env(env).unwrapped.ale.getEpisodeFrameNumber()

    first, second = play(3), play(3)
    assert torch.equal(first[0], second[0]) and first[1] == second[1]


def test_atari_unknown_game():
    with pytest.raises(ValueError, match="Unknown Atari game"):
        make_atari_env("NotAGame")


# ---------------------------------------------------------------- specs of every stack


@pytest.mark.parametrize(
    "name", ["atari:Pong", "gym:CartPole-v1", "gym:Pendulum-v1", "minatar:Breakout", "catch", "catch:8"]
)
def test_check_env_specs(name):
    env = make_env(name, seed=0)
    check_env_specs(env)
    td = env.rollout(5)
    assert "is_init" in td.keys() and td["is_init"][0].item()
    assert td["next", "reward"].dtype == torch.float32 and td["next", "reward"].shape == (td.shape[0], 1)


def test_gym_cartpole_one_hot_and_float_observation():
    env = make_env("gym:CartPole-v1", seed=0)
    assert env.action_spec.shape == (2,) and env.action_spec.space.n == 2
    td = env.rollout(5)
    assert td["observation"].dtype == torch.float32 and td["observation"].shape == (5, 4)
    assert (td["action"].sum(-1) == 1).all()


def test_gym_pendulum_actions_rescaled_to_unit_box():
    env = make_env("gym:Pendulum-v1", seed=0)
    spec = env.action_spec
    assert spec.dtype == torch.float32
    assert torch.equal(spec.space.low, -torch.ones(1)) and torch.equal(spec.space.high, torch.ones(1))
    # +1 in the TorchRL env is the maximal torque (+2) of the raw env, from the same physical state.
    td = env.reset()
    raw = gym.make("Pendulum-v1").unwrapped
    raw.reset(seed=0)
    raw.state = _gym_env(env).unwrapped.state.copy()
    expected, *_ = raw.step(np.array([2.0], dtype=np.float32))
    td["action"] = torch.ones(1)
    np.testing.assert_allclose(env.step(td)["next", "observation"].numpy(), expected, rtol=1e-6)


def test_gym_rejects_image_observations():
    with pytest.raises(ValueError, match="vector"):
        make_env("gym:ALE/Pong-v5")


# ---------------------------------------------------------------- names and errors


@pytest.mark.parametrize(
    "name",
    ["pong", "foo:bar", "atari", "atari:", "gym:", "dmc:walker", "dmc:-walk", "dmc:a-b-c", "minatar:", "catch:big",
     "catch:"],
)
def test_bad_names_list_supported_forms(name):
    with pytest.raises(ValueError, match="Supported names") as info:
        make_env(name)
    for form in ("atari:<Game>", "gym:<gymnasium id>", "dmc:<domain>-<task>", "minatar:<Game>", "catch:<size>"):
        assert form in str(info.value)


def test_every_builtin_suite_is_built_by_make_env():
    # the config and the env resolver read BUILTIN_SUITES; make_env must know each of them
    for suite in BUILTIN_SUITES:
        with pytest.raises(ValueError) as info:
            make_env(f"{suite}:")
        assert "unknown suite" not in str(info.value)
    assert EnvFactory("minatar:Breakout").description == "minatar:Breakout"  # a suite, not a module:function


# ---------------------------------------------------------------- MinAtar


def test_minatar_object_planes_as_uint8_pixels():
    for scale in (2, 4):
        env = make_env("minatar:Breakout", seed=0, scale=scale)
        assert env.action_spec.space.n == 3  # the minimal action set
        td = env.rollout(4)
        assert td["pixels"].shape == (4, 4, 10 * scale, 10 * scale) and td["pixels"].dtype == torch.uint8
        game = _gym_env(env).unwrapped.game  # MinAtar's own state after the last step: bool [10, 10, 4]
        planes = torch.from_numpy(game.state()).permute(2, 0, 1).to(torch.uint8) * 255
        assert planes.sum() > 0
        assert torch.equal(td["next", "pixels"][-1], planes.repeat_interleave(scale, 1).repeat_interleave(scale, 2))


def test_minatar_truncates_at_time_limit():
    env = make_env("minatar:Breakout", seed=0, max_episode_steps=3)
    td = env.rollout(10, break_when_any_done=True)
    assert td.shape == (3,) and td["next", "truncated"][-1].item() and not td["next", "terminated"][-1].item()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"scale": 1}, "scale must be an integer >= 2"), ({"action_repeat": 4}, "action_repeat must be 1")],
)
def test_minatar_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env("minatar:Breakout", **kwargs)
    with pytest.raises(ValueError, match="Unknown MinAtar game 'Pong'; the games are Asterix, Breakout"):
        make_env("minatar:Pong")


def test_missing_minatar_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "minatar.gym", None)
    with pytest.raises(ImportError, match=r'pip install "torchrl_dreamer\[minatar\]"'):
        make_env("minatar:Breakout")


def test_unknown_gym_id():
    with pytest.raises(ValueError, match="Unknown gymnasium id"):
        make_env("gym:NotAnEnv-v0")


def test_missing_dm_control_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dm_control", None)  # makes the import fail even when installed
    with pytest.raises(ImportError, match=r'pip install "torchrl_dreamer\[dmc\]"'):
        make_env("dmc:walker-walk")


def test_dmc_name_is_parsed_and_forwarded(monkeypatch):
    calls = []
    monkeypatch.setattr(factory, "make_dmc_env", lambda *args, **kwargs: calls.append((args, kwargs)))
    make_env("dmc:ball_in_cup-catch", seed=3, size=32)
    assert calls == [(("ball_in_cup", "catch"), {"seed": 3, "device": "cpu", "size": 32})]


def test_dmc_pixels_from_dm_control(monkeypatch):
    if "MUJOCO_GL" not in os.environ:
        monkeypatch.setenv("MUJOCO_GL", "egl")  # headless rendering
    pytest.importorskip("dm_control")
    env = make_env("dmc:walker-walk", seed=0)
    check_env_specs(env)
    td = env.rollout(3)
    assert td["pixels"].shape == (3, 3, 64, 64) and td["pixels"].dtype == torch.uint8
    assert td["action"].dtype == torch.float32 and td["next", "reward"].dtype == torch.float32
    assert (env.action_spec.space.low == -1).all() and (env.action_spec.space.high == 1).all()
    physics = env.base_env._env.physics
    control_timestep = env.base_env._env._env.control_timestep()
    assert physics.data.time == pytest.approx(3 * 2 * control_timestep)  # action repeat 2
