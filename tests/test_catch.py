"""Catch: rendering, dynamics, rewards, termination, and the returns of random and scripted policies."""
from __future__ import annotations

import pytest
import torch
from torchrl.envs.utils import check_env_specs, step_mdp

from torchrl_dreamer.envs import CatchEnv, make_env

LEFT, STAY, RIGHT = (torch.nn.functional.one_hot(torch.tensor(i), 3) for i in range(3))


def _follow_ball(td) -> torch.Tensor:
    ball_column, paddle = int(td["ball"][1]), int(td["paddle"][0])
    return LEFT if ball_column < paddle else RIGHT if ball_column > paddle else STAY


def _play(env, policy, episodes):
    returns = []
    for _ in range(episodes):
        td, total = env.reset(), 0.0
        while True:
            td["action"] = policy(td)
            td = env.step(td)
            total += td["next", "reward"].item()
            if td["next", "done"].item():
                break
            td = step_mdp(td)
        returns.append(total)
    return torch.tensor(returns)


def test_specs_and_shapes():
    env = CatchEnv(size=16, seed=0)
    check_env_specs(env)
    assert env.batch_size == torch.Size([])
    assert env.action_spec.shape == (3,) and env.action_spec.space.n == 3
    td = env.reset()
    assert td["pixels"].shape == (1, 16, 16) and td["pixels"].dtype == torch.uint8


def test_rendering():
    env = CatchEnv(size=8, seed=0)
    td = env.reset()
    pixels, column = td["pixels"][0], int(td["ball"][1])
    assert set(pixels.unique().tolist()) == {0, 255}
    assert pixels[0, column] == 255 and pixels[0].sum() == 255  # the ball alone on the top row
    assert pixels[-1].tolist() == [0, 0, 0, 255, 255, 255, 0, 0]  # centred 3-pixel paddle
    assert int((pixels == 255).sum()) == 4


def test_dynamics_ball_falls_and_paddle_moves_within_grid():
    env = CatchEnv(size=8, seed=1)
    td = env.reset()
    column = int(td["ball"][1])
    for row in range(1, 4):
        td["action"] = RIGHT
        td = step_mdp(env.step(td))
        assert td["ball"].tolist() == [row, column]
        assert int(td["paddle"][0]) == min(4 + row, 6)  # stops at the right wall (centre 6 on an 8-wide grid)
        assert td["pixels"][0, row, column] == 255
    td["action"] = STAY
    assert int(step_mdp(env.step(td))["paddle"][0]) == 6
    for _ in range(10):
        td["action"] = LEFT
        td = env.step(td)
        if td["next", "done"].item():
            break
        td = step_mdp(td)
    assert int(td["next", "paddle"][0]) >= 1


def test_rewards_and_termination():
    env = CatchEnv(size=16, seed=2)
    td = env.rollout(100, policy=lambda td: td.set("action", STAY))
    assert td.shape == (15,)  # the ball needs size - 1 steps to reach the bottom row
    assert not td["next", "done"][:-1].any()
    assert td["next", "terminated"][-1].item() and not td["next", "truncated"].any()
    assert (td["next", "reward"][:-1] == 0).all()
    caught = abs(int(td["next", "ball"][-1, 1]) - 8) <= 1
    assert td["next", "reward"][-1].item() == (1.0 if caught else -1.0)


def test_seed_is_deterministic():
    def columns(seed):
        env = CatchEnv(seed=seed)
        return [int(env.reset()["ball"][1]) for _ in range(10)]

    assert columns(4) == columns(4)
    assert columns(4) != columns(5)


def test_ball_columns_cover_the_grid():
    env = CatchEnv(size=8, seed=0)
    assert {int(env.reset()["ball"][1]) for _ in range(200)} == set(range(8))


def test_random_policy_mean_return():
    generator = torch.Generator().manual_seed(0)
    returns = _play(
        CatchEnv(size=16, seed=0), lambda td: (LEFT, STAY, RIGHT)[int(torch.randint(3, (), generator=generator))], 400
    )
    assert set(returns.tolist()) <= {-1.0, 1.0}
    assert -0.75 < returns.mean().item() < -0.5


@pytest.mark.parametrize("size", [5, 16])
def test_follow_the_ball_scores_one(size):
    returns = _play(CatchEnv(size=size, seed=0), _follow_ball, episodes=50)
    assert (returns == 1.0).all()


def test_make_env_catch():
    env = make_env("catch:10", seed=0)
    td = env.rollout(20)
    assert td["pixels"].shape == (9, 1, 10, 10)
    assert td["is_init"][0].item() and not td["is_init"][1:].any()
    assert make_env("catch").base_env.size == 16


def test_size_too_small():
    with pytest.raises(ValueError, match="size >= 3"):
        CatchEnv(size=2)


def test_catch_scale_draws_cells_as_blocks():
    from torchrl_dreamer.envs import CatchEnv

    small, big = CatchEnv(size=8, seed=3), CatchEnv(size=8, scale=2, seed=3)
    a, b = small.reset()["pixels"], big.reset()["pixels"]
    assert b.shape == (1, 16, 16)
    assert torch.equal(b, a.repeat_interleave(2, -1).repeat_interleave(2, -2))
    with pytest.raises(ValueError, match="scale"):
        CatchEnv(size=8, scale=0)


def test_vector_obs_adds_a_float_observation():
    env = CatchEnv(size=8, seed=0, vector_obs=True)
    check_env_specs(env)
    td = env.rollout(3, policy=lambda td: td.set("action", RIGHT))
    obs = td["next", "observation"]
    assert obs.dtype == torch.float32 and obs.shape == (3, 3)
    expected = torch.cat([td["next", "ball"], td["next", "paddle"]], -1).float() / 7
    torch.testing.assert_close(obs, expected)
    assert "observation" not in CatchEnv(size=8).observation_spec.keys()
    wrapped = make_env("catch", vector_obs=True, seed=0)
    check_env_specs(wrapped)
    assert wrapped.observation_spec["observation"].shape == (3,)
    assert make_env("catch:10", vector_obs=True).reset()["observation"].shape == (3,)
