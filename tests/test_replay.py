"""Tests of the DreamerV2 replay buffer (torchrl_dreamer.data).

Synthetic envs write tiny uint8 images that encode (env id, episode id, step), so every sampled window can be
checked for contiguity, episode membership, the final-observation rows and FIFO eviction.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from torchrl_dreamer.data import DreamerReplayBuffer, make_replay_buffer, transitions_to_rows

NUM_ACTIONS = 3
FILL = 9


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
    t % 3, reward 1000 e + t + 1, episode end after ``length`` steps (terminated on even k, truncated on odd k).
    """

    def __init__(self, lengths, *, pixel_shape=(1, 8, 8), extras=True, episode_offset=0):
        self.lengths = lengths
        self.num_envs = len(lengths)
        self.pixel_shape = pixel_shape
        self.extras = extras
        self.episode = [episode_offset] * self.num_envs
        self.count = [0] * self.num_envs
        self.step = [0] * self.num_envs
        self.episode_length = {}
        self.final_next_pixels = {}
        self.rows = [[] for _ in range(self.num_envs)]  # (episode, step) of every stored row, in stream order

    def batch(self, num_steps: int, *, flat: bool = False) -> TensorDict:
        envs = [self._env_steps(env, num_steps) for env in range(self.num_envs)]
        batch = torch.stack(envs, 0)
        return batch[0] if flat else batch

    def _env_steps(self, env: int, num_steps: int) -> TensorDict:
        fields = {key: [] for key in ("pixels", "next_pixels", "action", "reward", "is_init", "done", "term")}
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
            self.rows[env].append((episode, t))
            if done:
                self.rows[env].append((episode, length))
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
        if self.extras:  # policy outputs and collector info: must be ignored by the buffer
            td["state"] = torch.randn(num_steps, 4)
            td["collector", "traj_ids"] = torch.zeros(num_steps, dtype=torch.long)
            td["next", "step_count"] = torch.zeros(num_steps, 1, dtype=torch.long)
        return td

    def position(self, env: int, episode: int, step: int) -> int:
        if not hasattr(self, "_positions"):
            self._positions = {}
        key = (env, episode, step)
        if key not in self._positions:
            self._positions.update({(env, *row): pos for pos, row in enumerate(self.rows[env])})
        return self._positions[key]


def check_windows(sample: TensorDict, envs: FakeEnvs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asserts every sequence is consecutive rows of one episode with the right per-row content."""
    env, episode, step = decode(sample["pixels"])
    assert (env == env[:, :1]).all() and (episode == episode[:, :1]).all(), "a window crosses envs or episodes"
    assert (step.diff(dim=1) == 1).all(), "rows of a window are not consecutive steps"
    assert (sample["pixels"].flatten(-3)[..., 5:] == FILL).all()
    length = torch.tensor(
        [[envs.episode_length[(int(e), int(k))] for e, k in zip(er, kr)] for er, kr in zip(env, episode)]
    )
    assert (step <= length).all()
    final = step == length
    assert torch.equal(sample["is_init"].squeeze(-1), step == 0), "is_init must mark true episode starts only"
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


def make(tmp_path, **kwargs) -> DreamerReplayBuffer:
    kwargs.setdefault("scratch_dir", tmp_path / "replay")
    kwargs.setdefault("seed", 0)
    return make_replay_buffer(**kwargs)


# ---- rows ------------------------------------------------------------------------------------------------------
def test_transitions_to_rows_adds_final_rows(tmp_path):
    envs = FakeEnvs([[3, 2]], extras=False)
    steps = envs.batch(6, flat=True)  # episodes 0 (3 steps), 1 (2 steps), start of 2
    rows, starts = transitions_to_rows(steps, obs_keys=("pixels",))
    assert rows.shape == (8,)  # 6 transitions + 2 final rows
    _, episode, step = decode(rows["pixels"])
    assert list(zip(episode.tolist(), step.tolist())) == envs.rows[0]
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


# ---- sampling --------------------------------------------------------------------------------------------------
def test_sample_shapes_dtypes_and_fixed_schema(tmp_path):
    rb = make(tmp_path, capacity=1000, seq_len=10, batch_size=6, num_envs=2)
    envs = FakeEnvs([[30], [25]], extras=False)
    rb.extend(envs.batch(20))  # a random-policy batch (no policy keys)...
    envs.extras = True
    rb.extend(envs.batch(20))  # ...and a policy batch with extra keys share one schema
    sample = rb.sample()
    assert sample.batch_size == torch.Size([6, 10])
    keys = set(sample.keys(include_nested=True, leaves_only=True))
    assert keys == {"pixels", "action", "is_init", ("next", "reward"), ("next", "terminated"),
                    ("next", "truncated"), ("next", "done")}
    assert sample["pixels"].dtype == torch.uint8 and sample["pixels"].shape == (6, 10, 1, 8, 8)
    assert sample["action"].dtype == torch.float32 and sample["action"].shape == (6, 10, NUM_ACTIONS)
    assert sample["next", "reward"].dtype == torch.float32 and sample["next", "reward"].shape == (6, 10, 1)
    for key in ("is_init", ("next", "terminated"), ("next", "truncated"), ("next", "done")):
        assert sample[key].dtype == torch.bool and sample[key].shape == (6, 10, 1)
    assert sample.device == torch.device("cpu")
    check_windows(sample, envs)
    assert len(rb) == 80 + 2  # 2 x 40 transitions + the final rows of the 2 finished episodes


def test_parallel_envs_split_episodes_never_mix(tmp_path):
    lengths = [[7, 12, 5], [9, 4, 15], [11]]
    rb = make(tmp_path, capacity=3 * 60, seq_len=6, batch_size=32, num_envs=3)
    envs = FakeEnvs(lengths)
    seen = set()
    finals = 0
    for _ in range(20):  # batches of 8 steps: episodes span several extend calls; eviction kicks in
        rb.extend(envs.batch(8))
        if not rb.can_sample():
            continue
        sample = rb.sample()
        env, episode, step = check_windows(sample, envs)
        seen |= set(env[:, 0].tolist())
        finals += int((sample["action"].sum(-1) == 0).sum())  # final rows (checked above) have no action
        for e, k, s in zip(env.flatten().tolist(), episode.flatten().tolist(), step.flatten().tolist()):
            pos = envs.position(e, k, s)  # only rows still in the stream's FIFO window
            assert len(envs.rows[e]) - rb.stream_capacity <= pos < len(envs.rows[e])
    assert seen == {0, 1, 2}
    assert finals > 0
    assert len(rb) == 3 * 60  # every stream is full


def test_ongoing_episode_is_sampleable_and_is_init_closes_it(tmp_path):
    rb = make(tmp_path, capacity=500, seq_len=8, batch_size=16)
    envs = FakeEnvs([[100]])
    rb.extend(envs.batch(5))
    with pytest.raises(RuntimeError, match="seq_len=8"):
        rb.sample()
    assert not rb.can_sample()
    rb.extend(envs.batch(5))  # 10 rows of an ongoing episode, split over two extends
    _, episode, step = check_windows(rb.sample(), envs)
    assert (episode == 0).all() and (step[:, -1] <= 9).all() and (step[:, -1] == 9).any()
    # the collector resets the env without a done (e.g. a restarted run): a new episode starts
    restarted = FakeEnvs([[100]], episode_offset=1)
    rb.extend(restarted.batch(12))
    assert rb.num_episodes == 2 and len(rb) == 22
    episodes = set()
    for _ in range(5):
        sample = rb.sample()
        _, episode, step = decode(sample["pixels"])
        assert (episode == episode[:, :1]).all() and (step.diff(dim=1) == 1).all()
        assert torch.equal(sample["is_init"].squeeze(-1), step == 0)
        episodes |= set(episode[:, 0].tolist())
    assert episodes == {0, 1}


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


def test_batch_longer_than_a_stream(tmp_path):
    rb = make(tmp_path, capacity=10, seq_len=4, batch_size=8)
    envs = FakeEnvs([[7]])
    rb.extend(envs.batch(25))  # 28 rows into a stream of 10: only the last 10 stay
    assert len(rb) == 10
    _, episode, step = check_windows(rb.sample(), envs)
    assert min(envs.position(0, k, t) for k, t in zip(episode.flatten().tolist(), step.flatten().tolist())) >= 18


def test_fifo_eviction_is_per_env(tmp_path):
    rb = make(tmp_path, capacity=60, seq_len=4, batch_size=64, num_envs=2)
    envs = FakeEnvs([[5], [50]])
    rb.extend(envs.batch(40))  # env 0 writes 48 rows (wraps), env 1 writes 40 rows (does not)
    assert len(rb) == 30 + 30
    env, episode, step = check_windows(rb.sample(), envs)
    env1 = env[:, 0] == 1
    assert (episode[env1] == 0).all() and step[env1].min() >= 10  # env 1 kept its rows 10..39
    assert (episode[~env1] >= 3).all()  # env 0: 48 rows, the first 18 (3 episodes of 6 rows) are gone


# ---- errors --------------------------------------------------------------------------------------------------
def test_errors(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=10, batch_size=4, num_envs=2)
    with pytest.raises(RuntimeError, match="no episode has that many stored rows"):
        rb.sample()
    batch = FakeEnvs([[20], [20]]).batch(4)
    with pytest.raises(KeyError, match="'action'"):
        rb.extend(batch.exclude("action"))
    with pytest.raises(KeyError, match="'next', 'pixels'"):
        rb.extend(batch.exclude(("next", "pixels")))
    with pytest.raises(KeyError, match="is_init"):
        rb.extend(batch.exclude("is_init"))
    with pytest.raises(ValueError, match="num_envs=2"):
        rb.extend(batch[:1])
    assert len(rb) == 0
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
    assert set(sample.keys()) == {"observation", "action", "is_init", "next"}
    assert sample["observation"].dtype == torch.float32 and sample["observation"].shape == (3, 4, 64)
    assert (sample["observation"][..., 4].diff(dim=1) == 1).all()


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _same(a: TensorDict, b: TensorDict) -> bool:
    return (a == b).all() and a.batch_size == b.batch_size


def test_checkpoint_round_trip_in_place(tmp_path):
    scratch = tmp_path / "run" / "replay"
    rb = make(tmp_path, capacity=90, seq_len=6, batch_size=8, num_envs=3, scratch_dir=scratch, seed=1)
    envs = FakeEnvs([[7, 13], [9], [25]])
    for _ in range(5):
        rb.extend(envs.batch(9))  # streams wrap; env 2's episode is ongoing at the checkpoint
    rb.sample()
    rb.dumps(scratch)
    assert sorted(p.name for p in scratch.iterdir()) == ["replay_state.pt", "storage", "storage_id", "write_marks.bin"]
    assert (scratch / "replay_state.pt").stat().st_size < 100_000  # no row data in the checkpoint

    resumed = make(tmp_path, capacity=90, seq_len=6, batch_size=8, num_envs=3, scratch_dir=scratch, seed=123)
    resumed.loads(scratch)
    assert len(resumed) == len(rb) and resumed.num_episodes == rb.num_episodes
    for _ in range(3):
        assert _same(resumed.sample(), rb.sample())
    # both continue identically, including the ongoing episodes
    batch = envs.batch(9)
    rb.extend(batch)
    resumed.extend(batch)
    assert len(resumed) == len(rb) and resumed.num_episodes == rb.num_episodes
    for _ in range(3):
        sample = resumed.sample()
        assert _same(sample, rb.sample())
        check_windows(sample, envs)


def test_checkpoint_state_dict_round_trip(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=5, batch_size=4, seed=3)
    envs = FakeEnvs([[12]])
    rb.extend(envs.batch(30))
    state = rb.state_dict()
    expected = [rb.sample() for _ in range(2)]
    torch.save(state, tmp_path / "trainer_checkpoint.pt")  # as a trainer checkpoint would hold it
    state = torch.load(tmp_path / "trainer_checkpoint.pt", weights_only=True)
    resumed = make(tmp_path, capacity=100, seq_len=5, batch_size=4, seed=4)
    resumed.load_state_dict(state)
    assert len(resumed) == len(rb)
    for sample in expected:
        assert _same(resumed.sample(), sample)
    with pytest.raises(ValueError, match="num_envs"):
        make(tmp_path, capacity=100, num_envs=2, seq_len=5).load_state_dict(state)


def test_checkpoint_copied_elsewhere(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=5, batch_size=4, num_envs=2, scratch_dir=tmp_path / "a")
    envs = FakeEnvs([[12], [7]])
    rb.extend(envs.batch(30))
    rb.dumps(tmp_path / "ckpt")
    expected = [rb.sample() for _ in range(2)]
    rb.extend(envs.batch(30))  # later rows of the live buffer do not leak into the snapshot
    other = make(tmp_path, capacity=100, seq_len=5, batch_size=4, num_envs=2, scratch_dir=tmp_path / "b", seed=9)
    other.loads(tmp_path / "ckpt")
    for sample in expected:
        assert _same(other.sample(), sample)


def _check_restored(rb: DreamerReplayBuffer, envs: FakeEnvs, checkpoint_end: int, high_water: int) -> None:
    """Only rows written before the checkpoint and not overwritten afterwards may be sampled."""
    first_valid = max(0, checkpoint_end - rb.stream_capacity, high_water - rb.stream_capacity)
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
    checkpoint_end = len(envs.rows[0])
    for _ in range(3):  # overwrite (FIFO) rows that the checkpoint still counts, then "crash"
        rb.extend(envs.batch(8))
    high_water = len(envs.rows[0])

    restored = make(tmp_path, capacity=60, seq_len=5, batch_size=16, scratch_dir=scratch)
    restored.loads(scratch)
    _check_restored(restored, envs, checkpoint_end, high_water)
    # the data goes on mid-episode (no is_init): rows after the gap start a new episode, no window spans the gap
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
            expected_is_init = (step[b] == 0) | (positions == high_water)  # the first row after the gap starts
            assert torch.equal(sample["is_init"][b].squeeze(-1), expected_is_init)
    assert resumed_rows > 0


def test_older_checkpoint_restores_consistently(tmp_path):
    rb = make(tmp_path, capacity=60, seq_len=5, batch_size=16)
    envs = FakeEnvs([[13, 6]])
    for _ in range(4):
        rb.extend(envs.batch(8))
    old_state, old_end = rb.state_dict(), len(envs.rows[0])
    for _ in range(4):
        rb.extend(envs.batch(8))
    rb.dumps(rb.scratch_dir)  # a newer checkpoint exists, yet the older one is restored
    restored = make(tmp_path, capacity=60, seq_len=5, batch_size=16)
    restored.load_state_dict(old_state)
    _check_restored(restored, envs, old_end, len(envs.rows[0]))


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
        info = {{"checkpoint_end": len(envs.rows[0])}}
        for _ in range(3):
            rb.extend(envs.batch(8))
        info["high_water"] = len(envs.rows[0])
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
    check_windows(reopened.sample(), envs)


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
    rb = make(tmp_path, capacity=2_000_000, seq_len=50, batch_size=16)
    for batch in batches:
        rb.extend(batch)
    sample = rb.sample()
    grown = _rss_mb() - before
    assert sample["pixels"].shape == (16, 50, 1, 64, 64)
    assert grown < 200, f"RSS grew by {grown:.0f} MB"
    pixels_file = next((tmp_path / "replay" / "storage").glob("pixels*"))
    assert pixels_file.stat().st_size == 2_000_000 * 64 * 64  # allocated lazily on disk...
    assert pixels_file.stat().st_blocks * 512 < 100 * 2**20  # ...only written pages take space


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_to_cuda(tmp_path):
    rb = make(tmp_path, capacity=100, seq_len=5, batch_size=4, device="cuda")
    rb.extend(FakeEnvs([[12]]).batch(12))
    sample = rb.sample()
    assert sample.device.type == "cuda" and sample["pixels"].dtype == torch.uint8
