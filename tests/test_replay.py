"""Tests of the DreamerV2 replay buffer (torchrl_dreamer.data).

Synthetic envs write tiny uint8 images that encode (env id, episode id, step), so every sampled window can be
checked for contiguity, episode membership, the final-observation rows and FIFO eviction. Collector tests run the
Catch game, whose ``ball`` falls one row per step: within an episode the ball row advances by exactly 1 and its
column stays, which exposes any sequence spliced from two trajectories.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector, MultiAsyncCollector
from torchrl.envs import InitTracker, RewardScaling, SerialEnv, TransformedEnv

from torchrl_dreamer.data import DreamerReplayBuffer, make_replay_buffer, transitions_to_rows
from torchrl_dreamer.envs import CatchEnv

NUM_ACTIONS = 3
FILL = 9
STORED_KEYS = {"pixels", "action", "is_init", ("next", "reward"), ("next", "terminated"), ("next", "truncated"),
               ("next", "done")}


def encode(env: int, episode: int, step: int, shape=(1, 8, 8)) -> torch.Tensor:
    image = torch.full(shape, FILL, dtype=torch.uint8)
    flat = image.view(-1)
    flat[:5] = torch.tensor([env, episode // 256, episode % 256, step // 256, step % 256], dtype=torch.uint8)
    return image


def decode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = pixels.flatten(-3).long()
    return flat[..., 0], flat[..., 1] * 256 + flat[..., 2], flat[..., 3] * 256 + flat[..., 4]


class FakeEnvs:
    """Parallel envs with scripted episode lengths (cycled per env), yielding collector-like batches.

    Transition t of episode k in env e: pixels encode (e, k, t), next pixels (e, k, t + 1), action one-hot of
    t % 3, reward 1000 e + t + 1, episode end after ``length`` steps (terminated on even k, truncated on odd k),
    trajectory id ``e + num_envs * k`` (unique, as a collector's). ``order`` lists the rows in the order the buffer
    writes them (leading index after leading index), so ``position`` gives each row's absolute position.
    """

    def __init__(self, lengths, *, pixel_shape=(1, 8, 8), extras=True, traj_ids=True, episode_offset=0):
        self.lengths = lengths
        self.num_envs = len(lengths)
        self.pixel_shape = pixel_shape
        self.extras = extras
        self.traj_ids = traj_ids
        self.episode = [episode_offset] * self.num_envs
        self.count = [0] * self.num_envs
        self.step = [0] * self.num_envs
        self.episode_length = {}
        self.final_next_pixels = {}
        self.order = []  # (env, episode, step) of every row, in write order

    def batch(self, num_steps: int, *, flat: bool = False) -> TensorDict:
        batch = torch.stack([self._env_steps(env, num_steps) for env in range(self.num_envs)], 0)
        return batch[0] if flat else batch

    def _env_steps(self, env: int, num_steps: int) -> TensorDict:
        fields = {key: [] for key in ("pixels", "next_pixels", "action", "reward", "is_init", "done", "term", "traj")}
        for _ in range(num_steps):
            episode, t = self.episode[env], self.step[env]
            length = self.lengths[env][self.count[env] % len(self.lengths[env])]
            self.episode_length[(env, episode)] = length
            done = t + 1 == length
            fields["pixels"].append(encode(env, episode, t, self.pixel_shape))
            fields["next_pixels"].append(encode(env, episode, t + 1, self.pixel_shape))
            fields["action"].append(torch.nn.functional.one_hot(torch.tensor(t % NUM_ACTIONS), NUM_ACTIONS).float())
            fields["reward"].append(float(1000 * env + t + 1))
            fields["is_init"].append(t == 0)
            fields["done"].append(done)
            fields["term"].append(done and episode % 2 == 0)
            fields["traj"].append(env + self.num_envs * episode)
            self.order.append((env, episode, t))
            if done:
                self.order.append((env, episode, length))
                self.final_next_pixels[(env, episode)] = fields["next_pixels"][-1]
                self.episode[env] += 1
                self.count[env] += 1
                self.step[env] = 0
            else:
                self.step[env] += 1
        done = torch.tensor(fields["done"]).unsqueeze(-1)
        term = torch.tensor(fields["term"]).unsqueeze(-1)
        td = TensorDict(
            {
                "pixels": torch.stack(fields["pixels"]),
                "action": torch.stack(fields["action"]),
                "is_init": torch.tensor(fields["is_init"]).unsqueeze(-1),
                "next": {
                    "pixels": torch.stack(fields["next_pixels"]),
                    "reward": torch.tensor(fields["reward"]).unsqueeze(-1),
                    "terminated": term,
                    "truncated": done & ~term,
                    "done": done,
                },
            },
            batch_size=[num_steps],
        )
        if self.traj_ids:
            td["collector", "traj_ids"] = torch.tensor(fields["traj"])
        if self.extras:  # policy outputs and collector info: must be ignored by the buffer
            td["state"] = torch.randn(num_steps, 4)
            td["next", "step_count"] = torch.zeros(num_steps, 1, dtype=torch.long)
        return td

    def position(self, env: int, episode: int, step: int) -> int:
        if len(getattr(self, "_positions", ())) != len(self.order):
            self._positions = {row: pos for pos, row in enumerate(self.order)}
        return self._positions[(env, episode, step)]


def check_rows(sample: TensorDict, envs: FakeEnvs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asserts every row holds what its (env, episode, step) transition says; returns them."""
    env, episode, step = decode(sample["pixels"])
    assert (sample["pixels"].flatten(-3)[..., 5:] == FILL).all()
    length = torch.tensor([envs.episode_length[(e, k)] for e, k in zip(env.flatten().tolist(),
                                                                         episode.flatten().tolist())])
    length = length.reshape(env.shape)
    assert (step <= length).all()
    final = step == length
    expected_action = torch.nn.functional.one_hot(step % NUM_ACTIONS, NUM_ACTIONS).float() * (~final).unsqueeze(-1)
    assert torch.equal(sample["action"], expected_action)
    expected_reward = torch.where(final, 0.0, 1000.0 * env + step + 1)
    assert torch.equal(sample["next", "reward"].squeeze(-1), expected_reward)
    done = step + 1 == length
    assert torch.equal(sample["next", "done"].squeeze(-1), done)
    assert torch.equal(sample["next", "terminated"].squeeze(-1), done & (episode % 2 == 0))
    assert torch.equal(sample["next", "truncated"].squeeze(-1), done & (episode % 2 == 1))
    for b, t in final.nonzero().tolist():
        key = (int(env[b, t]), int(episode[b, t]))
        assert torch.equal(sample["pixels"][b, t], envs.final_next_pixels[key]), "final row != next obs of done step"
    return env, episode, step


def check_windows(sample: TensorDict, envs: FakeEnvs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asserts every sequence is consecutive rows of one episode, is_init exactly at episode starts.

    A window's first row keeps its stored flag: True only where the episode starts (the world model starts every
    sequence from the zero state anyway; the losses then know the reward entering it is zero, and mask it otherwise).
    """
    env, episode, step = check_rows(sample, envs)
    assert (env == env[:, :1]).all() and (episode == episode[:, :1]).all(), "a window crosses envs or episodes"
    assert (step.diff(dim=1) == 1).all(), "rows of a window are not consecutive steps"
    is_init = sample["is_init"].squeeze(-1)
    assert not is_init[:, 1:].any(), "is_init inside a window of one episode"
    assert is_init[:, 0][step[:, 0] == 0].all(), "an episode's first row lost its is_init"
    # a window that starts inside an episode is not marked (rows that continue an episode across a restore start a
    # new episode of the table, stored with is_init)
    assert not is_init[:, 0][step[:, 0] > 0].all(), "windows starting inside episodes are marked as episode starts"
    return env, episode, step


def make(tmp_path, **kwargs) -> DreamerReplayBuffer:
    kwargs.setdefault("scratch_dir", tmp_path / "replay")
    kwargs.setdefault("seed", 0)
    return make_replay_buffer(**kwargs)


# ---- rows ------------------------------------------------------------------------------------------------------
def test_transitions_to_rows_adds_final_rows():
    envs = FakeEnvs([[3, 2]], extras=False)
    steps = envs.batch(6, flat=True)  # episodes 0 (3 steps), 1 (2 steps), start of 2
    rows, starts = transitions_to_rows(steps, obs_keys=("pixels",))
    assert rows.shape == (8,)  # 6 transitions + 2 final rows
    _, episode, step = decode(rows["pixels"])
    assert [(0, k, s) for k, s in zip(episode.tolist(), step.tolist())] == envs.order
    assert starts.tolist() == [0, 4, 7]
    assert rows["is_init"].squeeze(-1).tolist() == [True, False, False, False, True, False, False, True]
    for final in (3, 6):
        assert rows["action"][final].abs().sum() == 0 and rows["next", "reward"][final].item() == 0
        assert not rows["next", "done"][final].any() and not rows["next", "terminated"][final].any()
    assert torch.equal(rows["pixels"][3], steps["next", "pixels"][2])
    assert torch.equal(rows["pixels"][6], steps["next", "pixels"][4])
    # a batch that continues an episode keeps is_init False on its first row...
    steps = envs.batch(1, flat=True)
    rows, starts = transitions_to_rows(steps, obs_keys=("pixels",), continues_episode=True)
    assert starts.tolist() == [] and not rows["is_init"].any()
    # ...one that cannot continue any episode starts one there
    rows, starts = transitions_to_rows(steps, obs_keys=("pixels",), continues_episode=False)
    assert starts.tolist() == [0] and rows["is_init"].squeeze(-1).tolist() == [True]


# ---- TorchRL API -----------------------------------------------------------------------------------------------
def test_is_a_torchrl_replay_buffer_extend_add_sample(tmp_path):
    from torchrl.data import TensorDictReplayBuffer

    rb = make(tmp_path, capacity=1000, seq_len=10, batch_size=6)
    assert isinstance(rb, TensorDictReplayBuffer)
    envs = FakeEnvs([[30], [25]], extras=False)
    slots = rb.extend(envs.batch(20))  # a random-policy batch (no policy keys)...
    assert slots.tolist() == list(range(40)) and rb.write_count == 40
    envs.extras = True
    rb.extend(envs.batch(20))  # ...and a policy batch with extra keys share one schema
    for step in envs.batch(5).unbind(1):  # a collector's extend_buffer=False path: one [E] step at a time
        rb.add(step)
    rb.add(envs.batch(1)[1, 0])  # one step of one env (batch [])
    assert rb.write_count == 40 + 40 + 10 + 1
    assert len(rb) == rb.write_count + 2  # + the final rows of the 2 finished episodes
    sample = rb.sample()
    assert sample.batch_size == torch.Size([6, 10])
    assert set(sample.keys(include_nested=True, leaves_only=True)) == STORED_KEYS | {"index"}
    assert sample["pixels"].dtype == torch.uint8 and sample["pixels"].shape == (6, 10, 1, 8, 8)
    assert sample["action"].dtype == torch.float32 and sample["action"].shape == (6, 10, NUM_ACTIONS)
    assert sample["next", "reward"].dtype == torch.float32 and sample["next", "reward"].shape == (6, 10, 1)
    for key in ("is_init", ("next", "terminated"), ("next", "truncated"), ("next", "done")):
        assert sample[key].dtype == torch.bool and sample[key].shape == (6, 10, 1)
    assert sample["index"].shape == (6, 10) and sample.device == torch.device("cpu")
    assert torch.equal(rb.storage[sample["index"].flatten()]["pixels"], sample["pixels"].flatten(0, 1))
    check_windows(sample, envs)
    with pytest.warns(UserWarning, match="conflicting batch_sizes"):  # TorchRL's warning, once
        assert rb.sample(batch_size=3).shape == (3, 10)
    data, info = rb.sample(return_info=True)
    assert torch.equal(info["index"], data["index"])


def test_iteration_and_transforms_see_sequences(tmp_path):
    seen = []

    def record_shape(td):
        seen.append(td.batch_size)
        return td.set("pixels_float", td["pixels"].float() / 255)

    rb = make(tmp_path, capacity=200, seq_len=5, batch_size=4, transform=record_shape)
    envs = FakeEnvs([[12]])
    rb.extend(envs.batch(30))
    rb.insert_transform(0, RewardScaling(loc=0.0, scale=2.0, in_keys=[("next", "reward")]))
    batches = []
    for batch in rb:  # TorchRL iteration: endless sampling of batch_size sequences
        batches.append(batch)
        if len(batches) == 3:
            break
    batches.append(next(iter(rb)))
    assert seen == [torch.Size([4, 5])] * 4
    for batch in batches:
        assert batch.shape == (4, 5) and batch["pixels_float"].dtype == torch.float32
        final = batch["action"].sum(-1) == 0
        _, _, step = decode(batch["pixels"])
        assert torch.equal(batch["next", "reward"].squeeze(-1), torch.where(final, 0.0, 2.0 * (step + 1)))


def test_state_dict_round_trip_and_write_count(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=5, batch_size=4, seed=3)
    envs = FakeEnvs([[12], [7]])
    rb.extend(envs.batch(30))
    state = rb.state_dict()
    expected = [rb.sample() for _ in range(2)]
    torch.save(state, tmp_path / "trainer_checkpoint.pt")  # as a trainer checkpoint would hold it
    state = torch.load(tmp_path / "trainer_checkpoint.pt", weights_only=True)
    resumed = make(tmp_path, capacity=100, seq_len=5, batch_size=4, seed=4)
    resumed.load_state_dict(state)
    assert len(resumed) == len(rb) and resumed.write_count == rb.write_count == 60
    assert resumed.num_episodes == rb.num_episodes
    for sample in expected:
        assert _same(resumed.sample(), sample)
    with pytest.raises(ValueError, match="capacity"):
        make(tmp_path, capacity=90, seq_len=5).load_state_dict(state)


# ---- episodes by trajectory id ---------------------------------------------------------------------------------
@pytest.mark.parametrize("traj_ids", [True, False])
def test_parallel_envs_interleave_but_never_mix(tmp_path, traj_ids):
    lengths = [[7, 12, 5], [9, 4, 15], [11]]
    capacity = 150
    rb = make(tmp_path, capacity=capacity, seq_len=6, batch_size=32)
    envs = FakeEnvs(lengths, traj_ids=traj_ids)  # without ids each leading index is one stream
    seen, finals = set(), 0
    for _ in range(20):  # batches of 8 steps: episodes span several extend calls and interleave; eviction kicks in
        rb.extend(envs.batch(8))
        sample = rb.sample()
        env, episode, step = check_windows(sample, envs)
        seen |= set(env[:, 0].tolist())
        finals += int((sample["action"].sum(-1) == 0).sum())  # final rows (checked above) have no action
        for e, k, s in zip(env.flatten().tolist(), episode.flatten().tolist(), step.flatten().tolist()):
            assert len(envs.order) - capacity <= envs.position(e, k, s), "sampled a row evicted by the FIFO"
    assert seen == {0, 1, 2} and finals > 0
    assert len(rb) == capacity


def test_new_trajectory_id_or_is_init_starts_an_episode(tmp_path):
    rb = make(tmp_path, capacity=500, seq_len=4, batch_size=64)
    envs = FakeEnvs([[100]])
    rb.extend(envs.batch(10))
    batch = envs.batch(10)
    batch["collector", "traj_ids"][:, 5:] = 77  # the id changes mid-episode without is_init
    rb.extend(batch)
    assert rb.num_episodes == 2 and len(rb) == 20
    assert rb.storage[15]["is_init"].item(), "the first row of the new id starts an episode"
    _, episode, step = decode(rb.sample()["pixels"])
    assert ((step < 15).all(-1) | (step >= 15).all(-1)).all(), "a window spans the id change"
    # a restarted collector reuses the id of an open episode, but starts with is_init: a new episode
    restarted = FakeEnvs([[100]], episode_offset=1)
    batch = restarted.batch(8)
    batch["collector", "traj_ids"][:] = 77
    rb.extend(batch)
    assert rb.num_episodes == 3 and len(rb) == 28
    for _ in range(3):
        sample = rb.sample()
        _, episode, step = decode(sample["pixels"])
        assert (episode == episode[:, :1]).all() and (step.diff(dim=1) == 1).all()


def test_ongoing_episode_is_sampleable(tmp_path):
    rb = make(tmp_path, capacity=500, seq_len=8, batch_size=16)
    envs = FakeEnvs([[100]])
    rb.extend(envs.batch(5))
    with pytest.raises(RuntimeError, match="seq_len=8"):
        rb.sample()
    assert not rb.can_sample()
    rb.extend(envs.batch(5))  # 10 rows of an ongoing episode, split over two extends
    assert rb.can_sample()
    _, episode, step = check_windows(rb.sample(), envs)
    assert (episode == 0).all() and (step[:, -1] <= 9).all() and (step[:, -1] == 9).any()


# ---- sampling --------------------------------------------------------------------------------------------------
def _start_counts(rb: DreamerReplayBuffer, num_samples: int, num_starts: int) -> torch.Tensor:
    starts = torch.cat([decode(rb.sample()["pixels"])[2][:, 0] for _ in range(num_samples)])
    return torch.bincount(starts, minlength=num_starts).double()


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("prioritize_ends", [True, False])
def test_start_distribution(tmp_path, prioritize_ends):
    # One episode of 40 transitions -> L = 41 rows; windows of 10 rows -> starts 0..31.
    seq_len, length = 10, 41
    rb = make(tmp_path, capacity=200, seq_len=seq_len, batch_size=500, prioritize_ends=prioritize_ends)
    envs = FakeEnvs([[40]])
    rb.extend(envs.batch(40))
    assert len(rb) == length
    num_starts = length - seq_len + 1
    counts = _start_counts(rb, 20, num_starts)
    assert counts.shape == (num_starts,)
    # reference: start = min(randint(0, L - seq_len + 1 + seq_len), L - seq_len)
    prioritized = torch.full((num_starts,), 1.0 / (length + 1), dtype=torch.float64)
    prioritized[-1] = (seq_len + 1) / (length + 1)
    uniform = torch.full((num_starts,), 1.0 / num_starts, dtype=torch.float64)
    chi2_critical = 61.1  # chi-square 0.999 quantile, 31 degrees of freedom
    right, wrong = (prioritized, uniform) if prioritize_ends else (uniform, prioritized)
    assert _chi2(counts, right) < chi2_critical
    assert _chi2(counts, wrong) > 10 * chi2_critical


def test_episodes_are_picked_uniformly(tmp_path):
    # episodes of 11 and 41 rows: each picked with probability 1/2 (not proportionally to length)
    rb = make(tmp_path, capacity=500, seq_len=5, batch_size=1000)
    envs = FakeEnvs([[10, 40]])
    rb.extend(envs.batch(50))
    episode = decode(rb.sample()["pixels"])[1][:, 0]
    assert abs(float((episode == 0).double().mean()) - 0.5) < 0.05


def check_joined(sample: TensorDict, envs: FakeEnvs, seq_len: int) -> int:
    """Asserts every sequence is a window of a long episode, or whole short episodes joined at is_init rows.

    Returns the number of joins.
    """
    env, episode, step = check_rows(sample, envs)
    is_init = sample["is_init"].squeeze(-1)
    assert torch.equal(is_init[:, 0], step[:, 0] == 0), "a window's first row keeps its stored episode-start flag"
    same = (env[:, 1:] == env[:, :-1]) & (episode[:, 1:] == episode[:, :-1]) & (step[:, 1:] == step[:, :-1] + 1)
    assert torch.equal(~is_init[:, 1:], same), "is_init must mark exactly where a new segment starts"
    joined = is_init[:, 1:].any(-1)
    for b in joined.nonzero().squeeze(-1).tolist():  # a joined sequence: whole episodes from their first row
        for t in is_init[b].nonzero().squeeze(-1).tolist():
            assert step[b, t] == 0
        first_length = envs.episode_length[(int(env[b, 0]), int(episode[b, 0]))] + 1
        assert first_length < seq_len
    return int(is_init[:, 1:].sum())


@pytest.mark.parametrize("by_length", [False, True])
def test_episodes_drawn_uniformly_or_by_length(tmp_path, by_length):
    """The reference draws each episode equally often; episodes_by_length makes every stored row equally likely."""
    envs = FakeEnvs([[9, 89]])  # episodes of 10 and 90 rows
    rb = make(tmp_path, capacity=500, seq_len=5, batch_size=2000, episodes_by_length=by_length)
    rb.extend(envs.batch(98))
    _, episode, _ = decode(rb.sample()["pixels"][:, 0])
    long_share = float((episode == 1).double().mean())
    assert abs(long_share - (0.9 if by_length else 0.5)) < 0.04, long_share


def test_short_episodes_are_joined_without_strict_length(tmp_path):
    envs = FakeEnvs([[3, 20, 2]])  # episodes of 4, 21 and 3 rows
    strict = make(tmp_path, capacity=500, seq_len=8, batch_size=200, scratch_dir=tmp_path / "strict")
    loose = make(tmp_path, capacity=500, seq_len=8, batch_size=200, strict_length=False, scratch_dir=tmp_path / "l")
    batch = envs.batch(50)  # two cycles: 6 whole episodes
    strict.extend(batch)
    loose.extend(batch)
    short = {k for (_, k), length in envs.episode_length.items() if length + 1 < 8}
    env, episode, step = check_windows(strict.sample(), envs)
    assert not set(episode.flatten().tolist()) & short, "strict_length never samples short episodes"
    sample = loose.sample()
    assert check_joined(sample, envs, 8) > 0
    _, episode, _ = decode(sample["pixels"])
    assert set(episode[:, 1:][sample["is_init"][:, 1:, 0]].tolist()) == set(range(6))  # joins draw any episode
    first = episode[:, 0]
    assert set(first.tolist()) & short and set(first.tolist()) - short
    # uniform over all episodes, short ones included
    assert abs(float(torch.isin(first, torch.tensor(sorted(short))).double().mean()) - 2 / 3) < 0.1


# ---- FIFO eviction -------------------------------------------------------------------------------------------
def test_fifo_eviction(tmp_path):
    rb = make(tmp_path, capacity=40, seq_len=8, batch_size=64)
    envs = FakeEnvs([[15]])  # 16 rows per episode
    rb.extend(envs.batch(45))  # 48 rows: positions 0..7 (episode 0, steps 0..7) are overwritten
    assert len(rb) == 40 and rb.num_episodes == 3
    env, episode, step = check_windows(rb.sample(), envs)
    assert (step[episode == 0] >= 8).all()
    assert (step[:, 0][episode[:, 0] == 0] == 8).all()  # its 8 remaining rows form exactly one window
    assert (episode[:, 0] == 0).any()
    rb.extend(envs.batch(2))  # 2 more rows: episode 0 keeps 6 rows < seq_len, no longer sampleable
    assert len(rb) == 40 and rb.num_episodes == 4
    for _ in range(5):
        env, episode, step = check_windows(rb.sample(), envs)
        assert (episode != 0).all()
    rb.extend(envs.batch(30))  # 82 rows in all: positions 42..81 stay
    assert len(rb) == 40
    assert rb.num_episodes == 4  # 0, 1 are gone; 2 keeps 6 rows; 3 and 4 are whole; 5 is ongoing (2 rows)
    episodes = torch.cat([decode(rb.sample()["pixels"])[1][:, 0] for _ in range(5)])
    assert set(episodes.tolist()) == {3, 4}


def test_fifo_eviction_trims_interleaved_episodes(tmp_path):
    rb = make(tmp_path, capacity=60, seq_len=4, batch_size=256, prioritize_ends=False)
    envs = FakeEnvs([[5], [50]])
    for _ in range(4):
        rb.extend(envs.batch(10))  # env 0 writes 12 rows, then env 1 writes 10 rows, per batch
    assert len(envs.order) == 88 and len(rb) == 60
    env, episode, step = (torch.cat(x) for x in zip(*(check_windows(rb.sample(), envs) for _ in range(5))))
    positions = torch.tensor([envs.position(*row) for row in zip(env.flatten().tolist(), episode.flatten().tolist(),
                                                                   step.flatten().tolist())])
    assert positions.min() >= 28  # only the last 60 rows
    env1 = env[:, 0] == 1
    assert (episode[env1] == 0).all() and step[env1].min() == 10  # env 1 lost its first batch's rows 0..9
    assert step[env1].max() == 39


def test_batch_longer_than_capacity(tmp_path):
    rb = make(tmp_path, capacity=10, seq_len=4, batch_size=8)
    envs = FakeEnvs([[7]])
    rb.extend(envs.batch(25))  # 28 rows into a storage of 10: only the last 10 stay
    assert len(rb) == 10
    _, episode, step = check_windows(rb.sample(), envs)
    assert min(envs.position(0, k, t) for k, t in zip(episode.flatten().tolist(), step.flatten().tolist())) >= 18


# ---- errors --------------------------------------------------------------------------------------------------
def test_errors(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=10, batch_size=4)
    with pytest.raises(RuntimeError, match="no episode has that many stored rows"):
        rb.sample()
    batch = FakeEnvs([[20], [20]]).batch(4)
    with pytest.raises(KeyError, match="'action'"):
        rb.extend(batch.exclude("action"))
    with pytest.raises(KeyError, match="'next', 'pixels'"):
        rb.extend(batch.exclude(("next", "pixels")))
    with pytest.raises(KeyError, match="is_init"):
        rb.extend(batch.exclude("is_init"))
    with pytest.raises(ValueError, match="add"):
        rb.extend(batch[0, 0])
    with pytest.raises(TypeError):
        rb.extend(torch.zeros(3))
    assert len(rb) == 0 and rb.write_count == 0
    rb.extend(batch)
    with pytest.raises(RuntimeError, match="longest 4"):
        rb.sample()
    with pytest.raises(ValueError):
        make(tmp_path, capacity=10, seq_len=50, scratch_dir=tmp_path / "small")
    with pytest.raises(KeyError, match="observation"):
        make(tmp_path, obs_keys=("observation",), scratch_dir=tmp_path / "vec").extend(batch[0])


def test_vector_observations(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=4, batch_size=3, obs_keys=("observation",))
    steps = FakeEnvs([[6]], extras=False).batch(10, flat=True)
    steps["observation"] = steps["pixels"].flatten(-3).float()
    steps["next", "observation"] = steps["next", "pixels"].flatten(-3).float()
    rb.extend(steps.exclude("pixels", ("next", "pixels")))
    sample = rb.sample()
    assert set(sample.keys()) == {"observation", "action", "is_init", "next", "index"}
    assert sample["observation"].dtype == torch.float32 and sample["observation"].shape == (3, 4, 64)
    assert (sample["observation"][..., 4].diff(dim=1) == 1).all()


# ---- collectors ----------------------------------------------------------------------------------------------
def make_catch(size: int = 8, scale: int = 1, seed: int = 0) -> TransformedEnv:
    return TransformedEnv(CatchEnv(size=size, scale=scale, seed=seed), InitTracker())


def count_splices(sample: TensorDict) -> torch.Tensor:
    """Per sequence: rows that follow their predecessor without is_init yet do not continue its Catch episode.

    The ball falls one row per step in a fixed column; the grid size is read from the number of lit pixels (the
    multi-worker test renders size 6 at scale 3 and size 9 at scale 2, both 18 x 18).
    """
    ball, is_init = sample["ball"], sample["is_init"].squeeze(-1)
    pixels = sample.get("pixels", torch.zeros(*sample.shape, 1, 1, 1))
    grid = (pixels > 0).flatten(-3).sum(-1) > 20
    falls = (ball[:, 1:, 0] == ball[:, :-1, 0] + 1) & (ball[:, 1:, 1] == ball[:, :-1, 1])
    follows = falls & (grid[:, 1:] == grid[:, :-1])
    return (~is_init[:, 1:] & ~follows).sum(-1)


@pytest.mark.parametrize("num_envs", [1, 2])
@pytest.mark.parametrize("extend_buffer", [True, False])
def test_collector_writes_into_the_buffer(tmp_path, extend_buffer, num_envs):
    rb = make(tmp_path, capacity=1000, seq_len=8, batch_size=64, obs_keys=("pixels", "ball"))
    env = make_catch() if num_envs == 1 else SerialEnv(2, [partial(make_catch, seed=0), partial(make_catch, seed=1)])
    collector = Collector(env, None, frames_per_batch=32, total_frames=320, replay_buffer=rb,
                          extend_buffer=extend_buffer)
    for batch in collector:
        assert batch is None  # the collector wrote into the buffer
    collector.shutdown()
    assert rb.write_count == 320
    assert len(rb) == 320 + num_envs * (320 // num_envs // 7)  # + one final row per finished episode
    sample = rb.sample()
    assert set(sample.keys(include_nested=True, leaves_only=True)) == STORED_KEYS | {"ball", "index"}
    # Catch size 8: 7 steps, 8 rows per episode, so every strict window of 8 is one whole episode
    assert (sample["ball"][..., 0] == torch.arange(8)).all()
    assert (sample["ball"][..., 1] == sample["ball"][:, :1, 1]).all()
    assert torch.equal(sample["is_init"].squeeze(-1), torch.arange(8).eq(0).expand(64, 8))
    assert sample["next", "terminated"][:, 6].all() and not sample["next", "done"][:, 7].any()


def test_short_episodes_from_a_collector(tmp_path):
    # Catch size 6: episodes of 6 rows, shorter than seq_len 16
    strict = make(tmp_path, capacity=500, seq_len=16, batch_size=64, obs_keys=("ball",), scratch_dir=tmp_path / "s")
    loose = make(tmp_path, capacity=500, seq_len=16, batch_size=64, obs_keys=("ball",), strict_length=False,
                 scratch_dir=tmp_path / "l")
    for batch in Collector(make_catch(size=6), None, frames_per_batch=25, total_frames=100):
        strict.extend(batch)
        loose.extend(batch)
    assert len(strict) == len(loose) == 100 + 20 and strict.num_episodes == 20
    assert not strict.can_sample()  # never sampled with strict_length
    with pytest.raises(RuntimeError, match="seq_len=16"):
        strict.sample()
    sample = loose.sample()
    ball, is_init = sample["ball"], sample["is_init"].squeeze(-1)
    assert torch.equal(is_init, ball[..., 0] == 0), "joined episodes start at their first row, with is_init"
    assert (is_init.sum(-1) == 3).all()  # 6 + 6 + 4 rows
    assert count_splices(sample).sum() == 0


@pytest.mark.parametrize("strict_length", [True, False])
def test_multi_worker_collector_never_splices_envs(tmp_path, strict_length):
    # two workers, two different games (Catch 6 and 9, both rendered 18 x 18), batches extended in this process
    seq_len = 5 if strict_length else 16
    rb = make(tmp_path, capacity=600, seq_len=seq_len, batch_size=500, obs_keys=("pixels", "ball"),
              strict_length=strict_length)
    collector = MultiAsyncCollector(
        [partial(make_catch, size=6, scale=3, seed=0), partial(make_catch, size=9, scale=2, seed=1)],
        None, frames_per_batch=14, total_frames=980,  # batches end mid-episode in both games
    )
    for batch in collector:
        rb.extend(batch)
    collector.shutdown()
    assert rb.write_count == 980 and len(rb) == 600  # FIFO eviction with interleaved episodes
    sample = torch.cat([rb.sample() for _ in range(3)])
    assert sample.shape[0] >= 1000
    assert count_splices(sample).sum() == 0
    grid = (sample["pixels"] > 0).flatten(-3).sum(-1) > 20
    assert grid.any() and (~grid).any()  # both envs are sampled
    if strict_length:
        assert not sample["is_init"][:, 1:].any()
    else:
        assert sample["is_init"][:, 1:].any()  # short episodes are joined
    # the check can fail: windows of consecutive storage slots do splice the two workers' rows
    slots = torch.arange(0, 600 - seq_len, seq_len).unsqueeze(-1) + torch.arange(seq_len)
    assert count_splices(rb.storage[slots.flatten()].reshape(slots.shape)).sum() > 0


def test_multi_worker_collector_cannot_write_into_the_buffer(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=5, obs_keys=("ball",))
    with pytest.raises(RuntimeError, match="iterate the collector"), pytest.warns(UserWarning):
        MultiAsyncCollector([make_catch, make_catch], None, frames_per_batch=10, total_frames=100, replay_buffer=rb)
    assert len(rb) == 0 and rb.write_count == 0


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _same(a: TensorDict, b: TensorDict) -> bool:
    return (a == b).all() and a.batch_size == b.batch_size


def test_checkpoint_round_trip_in_place(tmp_path):
    scratch = tmp_path / "run" / "replay"
    rb = make(tmp_path, capacity=90, seq_len=6, batch_size=8, scratch_dir=scratch, seed=1)
    envs = FakeEnvs([[7, 13], [9], [25]])
    for _ in range(5):
        rb.extend(envs.batch(9))  # the FIFO wraps; env 2's episode is ongoing at the checkpoint
    rb.sample()
    rb.dumps(scratch)
    assert sorted(p.name for p in scratch.iterdir()) == ["replay_state.pt", "storage", "storage_id", "write_mark.bin"]
    assert (scratch / "replay_state.pt").stat().st_size < 100_000  # no row data in the checkpoint

    resumed = make(tmp_path, capacity=90, seq_len=6, batch_size=8, scratch_dir=scratch, seed=123)
    resumed.loads(scratch)
    assert len(resumed) == len(rb) and resumed.num_episodes == rb.num_episodes
    assert resumed.write_count == rb.write_count
    for _ in range(3):
        assert _same(resumed.sample(), rb.sample())
    # open episodes were closed: rows that come next start new episodes (a resumed collector resets its envs)
    checkpoint_end = len(envs.order)
    resumed.extend(envs.batch(9))
    assert len(resumed) == resumed.capacity and resumed.write_count == rb.write_count + 27
    position, (_, _, step) = next((p, row) for p, row in enumerate(envs.order[checkpoint_end:], checkpoint_end)
                                  if row[0] == 2)
    assert step > 0 and resumed.storage[position % 90]["is_init"].item()  # env 2's ongoing episode restarts here
    for _ in range(3):
        env, episode, step = check_windows(resumed.sample(), envs)
        rows = zip(env.flatten().tolist(), episode.flatten().tolist(), step.flatten().tolist())
        after = (torch.tensor([envs.position(*row) for row in rows]) >= checkpoint_end).reshape(env.shape)
        assert (after.all(-1) | ~after.any(-1)).all(), "a window spans the checkpoint"


def test_checkpoint_copied_elsewhere(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=5, batch_size=4, scratch_dir=tmp_path / "a")
    envs = FakeEnvs([[12], [7]])
    rb.extend(envs.batch(30))
    rb.dumps(tmp_path / "ckpt")
    expected = [rb.sample() for _ in range(2)]
    rb.extend(envs.batch(30))  # later rows of the live buffer do not leak into the snapshot
    other = make(tmp_path, capacity=100, seq_len=5, batch_size=4, scratch_dir=tmp_path / "b", seed=9)
    other.loads(tmp_path / "ckpt")
    for sample in expected:
        assert _same(other.sample(), sample)


def _check_restored(rb: DreamerReplayBuffer, envs: FakeEnvs, checkpoint_end: int, high_water: int) -> None:
    """Only rows written before the checkpoint and not overwritten afterwards may be sampled."""
    first_valid = max(0, checkpoint_end - rb.capacity, high_water - rb.capacity)
    assert len(rb) == checkpoint_end - first_valid
    for _ in range(10):
        env, episode, step = check_windows(rb.sample(), envs)
        positions = [envs.position(0, k, s) for k, s in zip(episode.flatten().tolist(), step.flatten().tolist())]
        assert first_valid <= min(positions) and max(positions) < checkpoint_end


def test_restore_ignores_rows_written_after_checkpoint(tmp_path):
    scratch = tmp_path / "replay"
    rb = make(tmp_path, capacity=60, seq_len=5, batch_size=16, scratch_dir=scratch)
    envs = FakeEnvs([[13, 6]])
    for _ in range(6):
        rb.extend(envs.batch(8))
    rb.dumps(scratch)
    checkpoint_end = len(envs.order)
    for _ in range(3):  # overwrite (FIFO) rows that the checkpoint still counts, then "crash"
        rb.extend(envs.batch(8))
    high_water = len(envs.order)

    restored = make(tmp_path, capacity=60, seq_len=5, batch_size=16, scratch_dir=scratch)
    restored.loads(scratch)
    _check_restored(restored, envs, checkpoint_end, high_water)
    # the data goes on mid-episode: rows after the gap start a new episode, no window spans the gap
    restored.extend(envs.batch(25))
    resumed_rows = 0
    for _ in range(10):
        sample = restored.sample()
        _, episode, step = decode(sample["pixels"])
        assert (episode == episode[:, :1]).all() and (step.diff(dim=1) == 1).all()
        for b in range(len(sample)):
            positions = torch.tensor([envs.position(0, k, t) for k, t in zip(episode[b].tolist(), step[b].tolist())])
            assert (positions < checkpoint_end).all() or (positions >= high_water).all()
            resumed_rows += int((positions >= high_water).sum())
            # the first row after the gap starts an episode; a window's first row keeps its stored flag
            expected_is_init = (step[b] == 0) | (positions == high_water)
            assert torch.equal(sample["is_init"][b].squeeze(-1), expected_is_init)
    assert resumed_rows > 0


def test_older_checkpoint_restores_consistently(tmp_path):
    rb = make(tmp_path, capacity=60, seq_len=5, batch_size=16)
    envs = FakeEnvs([[13, 6]])
    for _ in range(4):
        rb.extend(envs.batch(8))
    old_state, old_end = rb.state_dict(), len(envs.order)
    for _ in range(4):
        rb.extend(envs.batch(8))
    rb.dumps(rb.scratch_dir)  # a newer checkpoint exists, yet the older one is restored
    restored = make(tmp_path, capacity=60, seq_len=5, batch_size=16)
    restored.load_state_dict(old_state)
    _check_restored(restored, envs, old_end, len(envs.order))


def test_restore_after_sigkill(tmp_path):
    scratch = tmp_path / "replay"
    tests_dir = Path(__file__).parent
    script = textwrap.dedent(
        f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(tests_dir)!r})
        from test_replay import FakeEnvs
        from torchrl_dreamer.data import make_replay_buffer
        rb = make_replay_buffer(capacity=60, seq_len=5, batch_size=16, scratch_dir={str(scratch)!r}, seed=0)
        envs = FakeEnvs([[13, 6]])
        for _ in range(6):
            rb.extend(envs.batch(8))
        rb.dumps({str(scratch)!r})
        info = {{"checkpoint_end": len(envs.order)}}
        for _ in range(3):
            rb.extend(envs.batch(8))
        info["high_water"] = len(envs.order)
        with open({str(tmp_path / "info.json")!r}, "w") as f:
            json.dump(info, f)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    info = json.loads((tmp_path / "info.json").read_text())
    envs = FakeEnvs([[13, 6]])
    for _ in range(9):
        envs.batch(8)  # replay the child's data to know which (episode, step) sits at which position
    restored = make(tmp_path, capacity=60, seq_len=5, batch_size=16, scratch_dir=scratch)
    restored.loads(scratch)
    _check_restored(restored, envs, info["checkpoint_end"], info["high_water"])


def test_checkpoint_of_replaced_rows_is_refused(tmp_path):
    scratch = tmp_path / "replay"
    rb = make(tmp_path, capacity=50, seq_len=4, scratch_dir=scratch)
    rb.extend(FakeEnvs([[10]]).batch(10))
    rb.dumps(scratch)
    fresh = make(tmp_path, capacity=50, seq_len=4, scratch_dir=scratch)
    fresh.extend(FakeEnvs([[10]], episode_offset=7).batch(4))  # a new run in the same directory
    assert len(fresh) == 4
    with pytest.raises(ValueError, match="other rows"):
        make(tmp_path, capacity=50, seq_len=4, scratch_dir=scratch).loads(scratch)


def test_copied_checkpoint_is_a_buffer_directory(tmp_path):
    rb = make(tmp_path, capacity=50, seq_len=4, scratch_dir=tmp_path / "a")
    envs = FakeEnvs([[10]])
    rb.extend(envs.batch(20))
    rb.dumps(tmp_path / "copy")
    expected = rb.sample()
    reopened = make(tmp_path, capacity=50, seq_len=4, scratch_dir=tmp_path / "copy", seed=2)
    reopened.loads(tmp_path / "copy")
    assert _same(reopened.sample(), expected)
    reopened.extend(envs.batch(5))
    check_rows(reopened.sample(), envs)


def test_works_with_torchrl_replay_buffer_trainer_hook(tmp_path):
    from torchrl.trainers import ReplayBufferTrainer

    rb = make(tmp_path, capacity=100, seq_len=5, batch_size=4)
    hook = ReplayBufferTrainer(rb)
    envs = FakeEnvs([[12]])
    hook.extend(envs.batch(20))
    check_windows(hook.sample(None), envs)
    state = hook.state_dict()
    other = ReplayBufferTrainer(make(tmp_path, capacity=100, seq_len=5, batch_size=4, seed=5))
    other.load_state_dict(state)
    assert _same(other.sample(None), hook.sample(None))


# ---- resources -----------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_memory_does_not_grow_with_capacity(tmp_path):
    envs = FakeEnvs([[150]], pixel_shape=(1, 64, 64), extras=False)
    batches = [envs.batch(100) for _ in range(4)]
    before = _rss_mb()
    rb = make(tmp_path, capacity=250_000, seq_len=50, batch_size=16)
    for batch in batches:
        rb.extend(batch)
    sample = rb.sample()
    grown = _rss_mb() - before
    assert sample["pixels"].shape == (16, 50, 1, 64, 64)
    assert grown < 200, f"RSS grew by {grown:.0f} MB"  # 1 GB of rows on disk, not in memory
    pixels_file = next((tmp_path / "replay" / "storage").glob("pixels*"))
    assert pixels_file.stat().st_size == 250_000 * 64 * 64
    # the disk blocks are taken when the file is created (a full disk is an error then, not a SIGBUS later)
    assert pixels_file.stat().st_blocks * 512 >= pixels_file.stat().st_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_to_cuda(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=5, batch_size=4, device="cuda")
    rb.extend(FakeEnvs([[12]]).batch(12))
    sample = rb.sample()
    assert sample.device.type == "cuda" and sample["pixels"].dtype == torch.uint8


def test_env_without_a_truncated_flag(tmp_path):
    """TorchRL's default done spec has no ``truncated``: the buffer stores ``done and not terminated``."""
    rb = make(tmp_path, capacity=1000, seq_len=5, batch_size=2)
    envs = FakeEnvs([[4], [6]], extras=False)
    batch = envs.batch(12)
    truncated = batch["next", "done"] & ~batch["next", "terminated"]
    del batch["next", "truncated"]
    rb.extend(batch)
    assert len(rb) == rb.write_count + int(batch["next", "done"].sum())
    stored = rb.storage[torch.arange(len(rb))]
    assert int(stored["next", "truncated"].sum()) == int(truncated.sum())
