"""DreamerV2 replay: one row per observation, per-environment FIFO streams on disk, end-favouring sequences.

Collector batches hold transitions ``(o_t, a_t, r_{t+1}, o_{t+1})``. The buffer stores one row per *observation*
(pixels once, as uint8) and keeps the final observation of every episode::

    transition t of one env      ->  row: o_t  a_t  is_init_t | next: r_{t+1} term_{t+1} trunc_{t+1} done_{t+1}
    ... and if done_{t+1}        ->  row: o_{t+1}  0  False   | next: 0        False      False       False

so an episode of ``N`` transitions has ``N + 1`` rows. Each environment writes its own stream (a FIFO segment of
one :class:`~torchrl.data.LazyMemmapStorage`, see :class:`~torchrl_dreamer.data.StreamWriter`), so episodes
stay contiguous even when a collector batch interleaves several envs or splits an episode over several batches.
Sampling (:class:`~torchrl_dreamer.data.PrioritizeEndsSampler`) returns ``[batch_size, seq_len]`` windows of
consecutive rows of one episode.

Checkpoints are small: the rows already live in memory-mapped files under ``scratch_dir``, and a checkpoint
written there records only positions, the episode table and the RNG. A process killed right after a checkpoint
restores a consistent buffer: rows written after the checkpoint are ignored, and so are the older rows they
overwrote (found through the writer's persistent high-water marks).

Reference: Hafner et al., "Mastering Atari with Discrete World Models" (ICLR 2021), section 6 of the spec.
"""
from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase, is_tensor_collection
from torchrl.data import LazyMemmapStorage, ReplayBuffer

from torchrl_dreamer.data.samplers import PrioritizeEndsSampler
from torchrl_dreamer.data.writers import StreamWriter

__all__ = ["DreamerReplayBuffer", "make_replay_buffer", "transitions_to_rows"]

STATE_FILE = "replay_state.pt"
ID_FILE = "storage_id"
_NEXT_KEYS = ("reward", "terminated", "truncated", "done")


def _next(key: NestedKey) -> tuple[str, ...]:
    return ("next", *key) if isinstance(key, tuple) else ("next", key)


def transitions_to_rows(
    steps: TensorDictBase,
    *,
    obs_keys: Sequence[NestedKey] = ("pixels",),
    continues_episode: bool = False,
) -> tuple[TensorDictBase, torch.Tensor]:
    """Turns the transitions of one environment into observation rows, adding a final row after each episode end.

    ``is_init`` is set on the first row of every episode: where the batch says so, after a ``("next", "done")``
    and on the first row unless ``continues_episode``.

    Args:
        steps (TensorDictBase): transitions of one env, shape ``[T]``, with the obs keys at root and in ``"next"``,
            ``"action"``, ``"is_init"`` and ``("next", "reward" | "terminated" | "truncated" | "done")``.
        obs_keys (sequence of NestedKey, optional): observation keys. Defaults to ``("pixels",)``.
        continues_episode (bool, optional): whether the first transition continues an episode of an earlier
            batch. Defaults to ``False``.

    Returns:
        rows (TensorDictBase): shape ``[T + D]`` with ``D`` the number of episode ends.
        episode_starts (torch.Tensor): int64 row offsets where an episode begins.

    Examples:
        >>> done = torch.tensor([False, True, False]).unsqueeze(-1)
        >>> steps = TensorDict({"observation": torch.arange(3.).unsqueeze(-1), "action": torch.ones(3, 2),
        ...     "is_init": torch.tensor([True, False, True]).unsqueeze(-1),
        ...     "next": {"observation": torch.arange(1., 4.).unsqueeze(-1), "reward": torch.ones(3, 1),
        ...              "terminated": done, "truncated": torch.zeros_like(done), "done": done}}, [3])
        >>> rows, starts = transitions_to_rows(steps, obs_keys=("observation",))
        >>> rows["observation"].squeeze(-1).tolist(), starts.tolist()  # the final observation 2. gets its own row
        ([0.0, 1.0, 2.0, 2.0], [0, 3])
    """
    num_steps = steps.shape[0]
    done = steps.get(("next", "done")).reshape(num_steps).bool()
    starts = steps.get("is_init").reshape(num_steps).bool().clone()
    starts[1:] |= done[:-1]
    starts[0] |= not continues_episode
    # Row of transition t = t + number of final rows inserted before it; a final row follows its done transition.
    row_of_step = torch.arange(num_steps) + done.long().cumsum(0) - done.long()
    step_rows = TensorDict({}, batch_size=[num_steps])
    for key in obs_keys:
        step_rows.set(key, steps.get(key))
    step_rows.set("action", steps.get("action").float())  # random policies may emit integer one-hots
    step_rows.set("is_init", starts.unsqueeze(-1))
    step_rows.set(("next", "reward"), steps.get(("next", "reward")).reshape(num_steps, 1).float())
    for flag in _NEXT_KEYS[1:]:
        step_rows.set(("next", flag), steps.get(("next", flag)).reshape(num_steps, 1).bool())
    rows = step_rows.new_zeros(num_steps + int(done.sum()))
    rows[row_of_step] = step_rows
    for key in obs_keys:
        rows.get(key)[row_of_step[done] + 1] = steps.get(_next(key))[done]
    return rows, row_of_step[starts]


class DreamerReplayBuffer:
    """DreamerV2's sequence replay on TorchRL parts: memmap storage, per-env FIFO streams, prioritize-ends sampling.

    Built from a :class:`~torchrl.data.ReplayBuffer` with a :class:`~torchrl.data.LazyMemmapStorage` under
    ``scratch_dir/storage`` (allocated lazily on disk: RAM does not grow with ``capacity``), a
    :class:`~torchrl_dreamer.data.StreamWriter` (one FIFO stream of ``capacity // num_envs`` rows per env) and a
    :class:`~torchrl_dreamer.data.PrioritizeEndsSampler`. Keys other than the stored ones (policy state, collector
    info, ...) are ignored, so random-policy and policy batches share one schema.

    Episodes: an episode starts at an ``is_init`` step, after a ``("next", "done")`` step, or at a stream's first
    row; it stays "ongoing" (and sampleable) until its final row is written, or until a new ``is_init`` arrives.
    Sampling picks an episode uniformly among those (complete or ongoing) with at least ``seq_len`` stored rows,
    then ``start = min(randint(0, L - seq_len + 1 + seq_len), L - seq_len)`` with ``L`` its stored rows (uniform
    start when ``prioritize_ends=False``). Write through :meth:`extend` only: ``replay_buffer`` (the inner TorchRL
    buffer) serves the sampling.

    Checkpoints: :meth:`dumps` / :meth:`loads` on ``scratch_dir`` itself, or :meth:`state_dict` /
    :meth:`load_state_dict`, save kilobytes (positions, episode table, RNG) since the rows stay in the memmap
    files. After a SIGKILL, restoring the last checkpoint drops the rows written after it and the older rows they
    overwrote; every env then starts a new episode. Positions are never reused, so an older checkpoint of the same
    directory restores consistently too.

    Args:
        capacity (int, optional): rows (steps) kept over all envs. Defaults to ``2_000_000``.
        seq_len (int, optional): rows per sampled sequence. Defaults to ``50``.
        batch_size (int, optional): sequences per sample. Defaults to ``16``.
        num_envs (int, optional): parallel envs in a collector batch (its leading dim). Defaults to ``1``.
        obs_keys (sequence of NestedKey, optional): observation keys. Defaults to ``("pixels",)``.
        scratch_dir (str or Path): directory of the memmap files and of in-place checkpoints. One buffer per
            directory; a fresh buffer's first write replaces the rows found there (older checkpoints of the
            directory are then refused).
        prioritize_ends (bool, optional): favour windows that touch the episode end. Defaults to ``True``.
        device (torch.device or str, optional): where samples are moved (sampling itself is on CPU, pinned when
            the device is CUDA). Defaults to ``"cpu"``.
        seed (int, optional): seed of the sampling generator. Defaults to ``None`` (random seed).

    Examples:
        >>> import tempfile
        >>> T = 12
        >>> last = torch.arange(T).eq(T - 1).unsqueeze(-1)
        >>> batch = TensorDict({
        ...     "pixels": torch.zeros(T, 1, 8, 8, dtype=torch.uint8), "action": torch.zeros(T, 3),
        ...     "is_init": torch.arange(T).eq(0).unsqueeze(-1),
        ...     "next": {"pixels": torch.zeros(T, 1, 8, 8, dtype=torch.uint8), "reward": torch.zeros(T, 1),
        ...              "terminated": last, "truncated": torch.zeros_like(last), "done": last}}, [T])
        >>> rb = DreamerReplayBuffer(capacity=1000, seq_len=8, batch_size=4, scratch_dir=tempfile.mkdtemp(), seed=0)
        >>> rb.extend(batch)
        >>> len(rb)  # 12 transitions + the final observation
        13
        >>> sample = rb.sample()
        >>> sample.shape, sample["pixels"].dtype
        (torch.Size([4, 8]), torch.uint8)
    """

    def __init__(
        self,
        *,
        capacity: int = 2_000_000,
        seq_len: int = 50,
        batch_size: int = 16,
        num_envs: int = 1,
        obs_keys: Sequence[NestedKey] = ("pixels",),
        scratch_dir: str | Path,
        prioritize_ends: bool = True,
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ) -> None:
        if min(seq_len, batch_size, num_envs) < 1 or not obs_keys:
            raise ValueError("seq_len, batch_size and num_envs must be >= 1 and obs_keys non-empty.")
        if capacity // num_envs < seq_len:
            raise ValueError(f"capacity // num_envs = {capacity // num_envs} rows per env is less than {seq_len=}.")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_envs = num_envs
        self.obs_keys = tuple(obs_keys)
        self.stream_capacity = capacity // num_envs
        self.device = torch.device(device)
        self.scratch_dir = Path(scratch_dir).absolute()
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._storage = LazyMemmapStorage(
            num_envs * self.stream_capacity, scratch_dir=self._storage_dir, existsok=True
        )
        self._writer = StreamWriter(
            num_streams=num_envs,
            stream_capacity=self.stream_capacity,
            marks_path=self.scratch_dir / "write_marks.bin",
        )
        self._sampler = PrioritizeEndsSampler(
            seq_len=seq_len,
            num_streams=num_envs,
            stream_capacity=self.stream_capacity,
            prioritize_ends=prioritize_ends,
        )
        self.replay_buffer = ReplayBuffer(
            storage=self._storage,
            sampler=self._sampler,
            writer=self._writer,
            pin_memory=self.device.type == "cuda",
            generator=self._generator,
        )
        self._storage_id: str | None = None  # identifies the current contents of the storage files
        self._required_keys = [
            *self.obs_keys,
            *(_next(key) for key in self.obs_keys),
            "action",
            "is_init",
            *(("next", key) for key in _NEXT_KEYS),
        ]

    @property
    def _storage_dir(self) -> Path:
        return self.scratch_dir / "storage"

    @property
    def storage(self) -> LazyMemmapStorage:
        """The TorchRL storage (``num_envs * stream_capacity`` slots, stream after stream)."""
        return self._storage

    @property
    def writer(self) -> StreamWriter:
        """The per-stream FIFO writer."""
        return self._writer

    @property
    def sampler(self) -> PrioritizeEndsSampler:
        """The sequence sampler, which holds the episode table."""
        return self._sampler

    # ---- writing ------------------------------------------------------------------------------------------
    def extend(self, batch: TensorDictBase) -> None:
        """Adds a collector batch of transitions, shape ``[num_envs, T]`` (or ``[T]`` with one env)."""
        steps = self._select_steps(batch)
        new_storage = not self._storage.initialized
        if new_storage:
            # New contents get a new id first: no checkpoint of the old contents can be applied to them.
            self._set_storage_id(uuid.uuid4().hex)
        for stream in range(self.num_envs):
            rows, starts = transitions_to_rows(
                steps[stream], obs_keys=self.obs_keys, continues_episode=self._sampler.is_open(stream)
            )
            first = self._writer.stream_end(stream)
            self._writer.extend(rows, stream=stream)
            closes = bool(steps[stream][-1].get(("next", "done")).all())
            self._sampler.record(
                stream, first=first, num_rows=len(rows), episode_starts=(starts + first).tolist(), closes_episode=closes
            )
            self._sampler.evict(stream, self._writer.stream_end(stream) - self.stream_capacity)
        if new_storage:
            self._write_storage_metadata()

    def _select_steps(self, batch: TensorDictBase) -> TensorDictBase:
        if not is_tensor_collection(batch):
            raise TypeError(f"Expected a TensorDict of transitions, got {type(batch).__name__}.")
        present = batch.keys(include_nested=True, leaves_only=True)
        missing = [key for key in self._required_keys if key not in present]
        if missing:
            raise KeyError(
                f"The batch lacks the keys {missing} required by the replay buffer "
                f"(required: {self._required_keys}). Add them (e.g. InitTracker for 'is_init') or fix obs_keys."
            )
        steps = batch.select(*self._required_keys).to("cpu")
        if steps.ndim == 1:
            steps = steps.unsqueeze(0)
        if steps.ndim != 2 or steps.shape[0] != self.num_envs or steps.shape[1] == 0:
            raise ValueError(
                f"Expected a batch of shape [num_envs={self.num_envs}, T] (or [T] with one env), got {batch.shape}."
            )
        return steps

    # ---- sampling -----------------------------------------------------------------------------------------
    def sample(self, batch_size: int | None = None) -> TensorDictBase:
        """Samples ``[batch_size, seq_len]`` rows (consecutive rows of one episode per sequence).

        Returns:
            a TensorDict of shape ``[batch_size, seq_len]`` on ``device`` with the obs keys, ``"action"``,
            ``"is_init"``, ``("next", "reward")`` (float32) and ``("next", "terminated" | "truncated" | "done")``
            (bool); trailing dim 1 on ``is_init``, rewards and flags.

        Raises:
            RuntimeError: if no episode has ``seq_len`` stored rows yet.
        """
        num_sequences = self.batch_size if batch_size is None else batch_size
        data = self.replay_buffer.sample(num_sequences * self.seq_len)
        data = data.reshape(num_sequences, self.seq_len)
        if self.device.type != "cpu":
            data = data.to(self.device, non_blocking=True)
        return data

    def can_sample(self) -> bool:
        """Whether some episode has at least ``seq_len`` stored rows."""
        return self._sampler.can_sample(self._storage, self.seq_len)

    def __len__(self) -> int:
        return self._sampler.num_rows()

    @property
    def num_episodes(self) -> int:
        """Episodes (complete or ongoing) with at least one stored row."""
        return len(self._sampler.episodes()[0])

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Positions, episode table and RNG state; the rows themselves stay in the memmap files of ``scratch_dir``."""
        return {
            "num_envs": self.num_envs,
            "stream_capacity": self.stream_capacity,
            "obs_keys": list(self.obs_keys),
            "storage_initialized": self._storage.initialized,
            "storage_id": self._storage_id,
            "writer": self._writer.state_dict(),
            "sampler": self._sampler.state_dict(),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` taken on the rows now in ``scratch_dir`` (same directory, zero copy).

        Rows written after the state was taken (e.g. by a process killed later) are ignored, and so are the older
        rows they overwrote: each stream resumes after its high-water mark and starts a new episode there.
        """
        for name in ("num_envs", "stream_capacity"):
            if state_dict[name] != getattr(self, name):
                raise ValueError(f"Checkpoint has {name}={state_dict[name]}, this buffer {getattr(self, name)}.")
        if [tuple(k) if isinstance(k, list) else k for k in state_dict["obs_keys"]] != list(self.obs_keys):
            raise ValueError(f"Checkpoint has obs_keys={state_dict['obs_keys']}, this buffer {self.obs_keys}.")
        if state_dict["storage_initialized"]:
            found = _read_text(self.scratch_dir / ID_FILE)
            if found != state_dict["storage_id"]:
                raise ValueError(
                    f"The checkpoint describes other rows than those in {self.scratch_dir} (storage id "
                    f"{state_dict['storage_id']} != {found}): a fresh buffer or another snapshot replaced them."
                )
            if not self._storage.initialized:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._storage.loads(self._storage_dir)  # maps the existing files, no copy
            self._storage_id = found
        saved_ends = state_dict["writer"]["stream_ends"].tolist()  # any device (map_location)
        self._writer.load_state_dict(state_dict["writer"])
        self._sampler.load_state_dict(state_dict["sampler"])
        for stream, saved_end in enumerate(saved_ends):
            if self._writer.stream_end(stream) > saved_end:
                self._sampler.close(stream)  # rows after the checkpoint are lost: no episode can continue
            self._sampler.evict(stream, self._writer.stream_end(stream) - self.stream_capacity)
        self._generator.set_state(state_dict["generator"].cpu())

    def dumps(self, path: str | Path) -> None:
        """Writes a checkpoint to the directory ``path``.

        With ``path == scratch_dir`` this writes one small file (atomically); elsewhere it also copies the storage
        files (``capacity`` rows' worth of disk: prefer checkpointing in place). A copy is a complete buffer
        directory: it can be loaded from, or used as the ``scratch_dir`` of a new buffer.
        """
        path = Path(path).absolute()
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if path != self.scratch_dir and self._storage.initialized:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._storage.dumps(path / "storage")
            _write_text(path / ID_FILE, self._storage_id)  # the copy can serve as a scratch_dir itself
        tmp = path / (STATE_FILE + ".tmp")
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path / STATE_FILE)

    def loads(self, path: str | Path) -> None:
        """Restores a checkpoint written by :meth:`dumps` (in place, or copied from another directory)."""
        path = Path(path).absolute()
        state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        if path != self.scratch_dir and state["storage_initialized"]:
            # Copy the snapshot's rows into scratch_dir; until the copy is complete no checkpoint matches them.
            self._set_storage_id(uuid.uuid4().hex)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._storage.loads(path / "storage")
            self._write_storage_metadata()
            self._writer.reset_marks(state["writer"]["stream_ends"].cpu().numpy())
            self._set_storage_id(state["storage_id"])
        self.load_state_dict(state)

    def _set_storage_id(self, storage_id: str) -> None:
        _write_text(self.scratch_dir / ID_FILE, storage_id)
        self._storage_id = storage_id

    def _write_storage_metadata(self) -> None:
        # Lets a later process map the storage files in place (TorchRL's storage checkpointer, zero copy here).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._storage.dumps(self._storage_dir)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rows={len(self)}, episodes={self.num_episodes}, num_envs={self.num_envs}, "
            f"stream_capacity={self.stream_capacity}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
            f"scratch_dir={str(self.scratch_dir)!r})"
        )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def make_replay_buffer(
    *,
    capacity: int = 2_000_000,
    seq_len: int = 50,
    batch_size: int = 16,
    num_envs: int = 1,
    obs_keys: Sequence[NestedKey] = ("pixels",),
    scratch_dir: str | Path,
    prioritize_ends: bool = True,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> DreamerReplayBuffer:
    """Builds the DreamerV2 replay buffer (see :class:`DreamerReplayBuffer` for the arguments).

    Examples:
        >>> import tempfile
        >>> rb = make_replay_buffer(capacity=10_000, num_envs=2, scratch_dir=tempfile.mkdtemp())
        >>> rb.stream_capacity, len(rb), rb.can_sample()
        (5000, 0, False)
    """
    return DreamerReplayBuffer(
        capacity=capacity,
        seq_len=seq_len,
        batch_size=batch_size,
        num_envs=num_envs,
        obs_keys=obs_keys,
        scratch_dir=scratch_dir,
        prioritize_ends=prioritize_ends,
        device=device,
        seed=seed,
    )
