"""DreamerV2 replay: a TorchRL replay buffer of observation rows on disk, sampled as end-favouring sequences.

The buffer stores one row per observation, pixels once as uint8, including every episode's final observation
(see :func:`~torchrl_dreamer.data.transitions_to_rows`), through one FIFO of ``capacity`` rows (see
:class:`~torchrl_dreamer.data.FifoWriter`). Episodes are keyed by the collector's trajectory ids: with several envs
or collector workers their rows interleave in storage, and the sampler's
:class:`~torchrl_dreamer.data.EpisodeTable` keeps each episode's positions in order, so a sampled sequence never
splices two environments. Sampling (:class:`~torchrl_dreamer.data.PrioritizeEndsSampler`) returns
``[batch_size, seq_len]`` windows of one episode (or, with ``strict_length=False``, joined short episodes)::

    storage   a0 a1 b0 b1 b2 a2 a3 b3 a4 ...     (two envs, interleaved by the collector)
    sample    a1 a2 a3 a4                         (the rows of one episode, in order)

Checkpoints are small: the rows already live in memory-mapped files under ``scratch_dir``, and a checkpoint
records only positions, the episode table and the RNG. A process killed right after a checkpoint restores a
consistent buffer: rows written after the checkpoint are ignored, and so are the older rows they overwrote (found
through the writer's persistent high-water mark).

Broken replay files are never trained on: restoring a checkpoint first checks, reading only, that the files hold
the rows it describes (every memmap file present with the shape, dtype and byte size recorded in the checkpoint,
the storage id and the high-water mark), and raises :class:`ReplayIntegrityError`, one line naming the file, before
any file or row changes. The trained models need not be lost with the replay: a buffer built with ``fresh=True``
(or :meth:`DreamerReplayBuffer.reset_storage`) discards the rows on disk and refills from empty.

Layout of ``scratch_dir``::

    storage/            TorchRL's memmap rows (``pixels.memmap``, ``next/reward.memmap``, ..., ``meta.json``)
    storage_id          id of the rows now in storage/ (a checkpoint names the id it describes)
    write_mark.bin      persistent high-water mark of the written positions (int64)
    replay_state.pt     in-place checkpoint (:meth:`DreamerReplayBuffer.dumps`)

Reference: Hafner et al., "Mastering Atari with Discrete World Models" (ICLR 2021), section 6 of the spec.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tensordict import MemoryMappedTensor, NestedKey, TensorDictBase, is_tensor_collection, unravel_key
from tensordict.nn.utils import _set_dispatch_td_nn_modules
from torchrl.data import LazyMemmapStorage, TensorDictReplayBuffer

from torchrl_dreamer.data.rows import NEXT_KEYS, next_key, step_rows
from torchrl_dreamer.data.samplers import PrioritizeEndsSampler
from torchrl_dreamer.data.writers import FifoWriter

__all__ = ["DiskFullError", "DreamerReplayBuffer", "PreallocatedMemmapStorage", "ReplayIntegrityError",
           "make_replay_buffer", "preallocate_files"]

STATE_FILE = "replay_state.pt"
ID_FILE = "storage_id"
MARK_FILE = "write_mark.bin"
STORAGE_DIR = "storage"
FRESH_REPLAY_HINT = (
    "nothing was changed. The trained models can be kept: resume with fresh_replay=True (--fresh-replay) to "
    "discard the replay's rows and refill it from empty"
)


class DiskFullError(OSError):
    """A write found the disk full. One line: the file, the space it needs, and that the same command resumes.

    Attributes:
        path (Path): the file (or directory) being written.
        needed (int): bytes it needs (0 where unknown).
    """

    def __init__(
        self, path: str | Path, needed: int, what: str, *, resume: str = "run the same command to resume"
    ) -> None:
        self.path, self.needed = Path(path), int(needed)
        try:
            free = shutil.disk_usage(self.path if self.path.exists() else self.path.parent).free
        except OSError:
            free = None
        size = f"{self.needed / 2**30:.2f} GiB" if self.needed >= 2**28 else f"{self.needed / 2**20:.1f} MiB"
        have = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        super().__init__(errno.ENOSPC, f"The disk holding {self.path} is full{have}: {what} needs about {size}. Free "
                         f"space and {resume}.")

    def __str__(self) -> str:
        return self.strerror


class PreallocatedMemmapStorage(LazyMemmapStorage):
    """TorchRL's :class:`~torchrl.data.LazyMemmapStorage` whose files get their disk blocks when they are created.

    TorchRL creates the memory-mapped files sparse: the blocks of a row are taken from the disk when the row is
    first written, through the mapping, and a full disk then kills the process with ``SIGBUS`` (no error, no message,
    whatever it was writing left half done). Here every file is allocated whole (``posix_fallocate``) as soon as the
    storage is created, before any row is written: a disk that cannot hold ``capacity`` rows is a
    :class:`DiskFullError` at the first write, naming the file and its size, and the new files are removed. Where
    ``posix_fallocate`` is missing (not Linux) the files stay sparse, as TorchRL's.
    """

    def _init_standard(self, data: TensorDictBase | torch.Tensor) -> None:
        super()._init_standard(data)
        preallocate_files(self._storage, self.scratch_dir)


def preallocate_files(
    storage: TensorDictBase, directory: str | Path | None, *, remove_on_failure: bool = True
) -> None:
    """Gives every memory-mapped file of ``storage`` its disk blocks; on a full disk raises :class:`DiskFullError`
    (removing the files first with ``remove_on_failure``: new files hold no rows yet)."""
    if not hasattr(os, "posix_fallocate") or not is_tensor_collection(storage):
        return
    files = [tensor.filename for tensor in storage.values(True, True) if getattr(tensor, "filename", None)]
    total = sum(os.path.getsize(name) for name in files)
    for name in files:
        with open(name, "r+b") as file:
            try:
                os.posix_fallocate(file.fileno(), 0, os.path.getsize(name))
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                full = err
                break
    else:
        return
    if remove_on_failure:
        for name in files:
            Path(name).unlink(missing_ok=True)
    raise DiskFullError(
        directory or Path(files[0]).parent, total, "the replay, its memory-mapped rows allocated whole,",
        resume="run the same command to resume (or lower --replay-capacity)",
    ) from full


class ReplayIntegrityError(RuntimeError, ValueError):
    """The replay files on disk do not hold the rows a checkpoint describes (missing, resized, other layout or rows).

    Raised by :meth:`DreamerReplayBuffer.load_state_dict` and :meth:`DreamerReplayBuffer.loads` before any file or
    row changes, with one line that names the file and the problem. The models of the checkpoint are unaffected:
    a trainer can keep them and refill the replay (``make_replay_buffer(..., fresh=True)``, trainer option
    ``fresh_replay=True``, CLI ``--fresh-replay``). Also a :class:`ValueError`, which this error used to be.

    Attributes:
        path (Path): the file (or directory) at fault.
        problem (str): what is wrong with it.
    """

    def __init__(self, path: str | Path, problem: str, *, hint: str | None = FRESH_REPLAY_HINT) -> None:
        self.path = Path(path)
        self.problem = " ".join(problem.split())  # one line
        super().__init__(f"Replay file {self.path}: {self.problem}" + (f"; {hint}." if hint else "."))


class DreamerReplayBuffer(TensorDictReplayBuffer):
    """DreamerV2's sequence replay as a TorchRL replay buffer: memmap rows, one FIFO, episodes by trajectory id.

    A :class:`~torchrl.data.TensorDictReplayBuffer` with a :class:`~torchrl.data.LazyMemmapStorage` under
    ``scratch_dir/storage`` (allocated lazily on disk: RAM does not grow with ``capacity``), a
    :class:`~torchrl_dreamer.data.FifoWriter` and a :class:`~torchrl_dreamer.data.PrioritizeEndsSampler`. Keys other
    than the stored ones (policy state, collector info, ...) are dropped, so random-policy and policy batches share
    one schema. Usable as ``Collector(..., replay_buffer=rb)`` with ``extend_buffer=True`` (``extend`` of ``[T]`` or
    ``[E, T]`` batches) or ``False`` (``add`` of ``[]`` or ``[E]`` steps); with a multi-process collector, iterate
    it and ``extend`` here (the episode table lives in this process, so the buffer refuses :meth:`share`).

    Writing (:meth:`extend`, :meth:`add`): transitions, time along the last dim, any leading dims being parallel
    envs. A row continues the open episode of its trajectory id (``traj_key``) unless ``is_init`` is True; a
    ``("next", "done")`` closes it after its final row. A new id, or an ``is_init`` row, starts a new episode, so
    ids restarted by a new collector never continue an old episode. Batches without ``traj_key`` treat each leading
    index as one stream, continued across calls. ``write_count`` counts transitions, ``len`` stored rows.

    Sampling (:meth:`sample`, iteration): ``[batch_size, seq_len]`` windows, see
    :class:`~torchrl_dreamer.data.PrioritizeEndsSampler`; ``is_init`` is True where an episode starts (as stored) and
    on the first row of each joined episode; a sequence's first row keeps its stored flag (the world model starts
    every sequence from the zero state; the losses mask the unknown reward entering a first row that is not an
    episode start). Transforms (``transform``, :meth:`append_transform`) see the
    ``[batch_size, seq_len]`` batch on ``device``; the sample also carries TorchRL's ``"index"`` (storage slots).

    Checkpoints: :meth:`dumps` / :meth:`loads` on ``scratch_dir`` itself, or :meth:`state_dict` /
    :meth:`load_state_dict`, save kilobytes (positions, episode table, RNG) since the rows stay in the memmap
    files. Restoring drops the rows written after the checkpoint and the older rows they overwrote, and closes the
    open episodes (the rows that come next start new ones). Positions are never reused, so an older checkpoint of
    the same directory restores consistently too. A restore first checks the files against the checkpoint (see
    :class:`ReplayIntegrityError`); the storage never falls back to RAM: rows whose files are gone are an error
    on restore, and a warning when a checkpoint is taken.

    Keeping the models, refilling the replay: ``fresh=True`` (or :meth:`reset_storage` on a live buffer) discards
    the rows on disk (``storage/``, ``storage_id``, ``write_mark.bin``, ``replay_state.pt``) and gives an empty
    buffer. Until its first write it skips, with a warning, a :meth:`load_state_dict` of a checkpoint that had
    rows (those rows are gone), so a trainer can load its whole checkpoint archive as usual. Later checkpoints of
    the refilled buffer save and restore as any other.

    Args:
        capacity (int, optional): rows kept (FIFO over all envs). Defaults to ``2_000_000``.
        seq_len (int, optional): rows per sampled sequence. Defaults to ``50``.
        batch_size (int, optional): sequences per sample. Defaults to ``16``.
        obs_keys (sequence of NestedKey, optional): observation keys. Defaults to ``("pixels",)``.
        scratch_dir (str or Path): directory of the memmap files and of in-place checkpoints. One buffer per
            directory; a fresh buffer's first write replaces the rows found there (older checkpoints of the
            directory are then refused).
        prioritize_ends (bool, optional): favour windows that touch the episode end. Defaults to ``True``.
        strict_length (bool, optional): sample only episodes with at least ``seq_len`` rows (the reference);
            ``False`` also samples shorter ones, joined to others. Defaults to ``True``.
        episodes_by_length (bool, optional): draw episodes in proportion to their rows instead of uniformly (the
            reference), see :class:`~torchrl_dreamer.data.PrioritizeEndsSampler`. Defaults to ``False``.
        traj_key (NestedKey, optional): trajectory ids in collector batches. Defaults to
            ``("collector", "traj_ids")``.
        device (torch.device or str, optional): where samples are moved (pinned first when CUDA).
            Defaults to ``"cpu"``.
        seed (int, optional): seed of the sampling generator. Defaults to ``None`` (random seed).
        transform (Transform or callable, optional): applied to sampled batches. Defaults to ``None``.
        fresh (bool, optional): discard the rows found in ``scratch_dir`` and start empty (see
            :meth:`reset_storage`), e.g. to keep a checkpoint's models but not its broken replay. Defaults to
            ``False``.
        extra_keys (sequence of NestedKey, optional): per-step values also stored, ``[1]`` per row (e.g. the
            ``"policy_version"`` that collected the step, see
            :func:`~torchrl_dreamer.trainers.distributed.make_dreamerv2_ray_trainer`). Defaults to ``()``.
        delayed_init (bool, optional): must be ``False`` (TorchRL's Ray service backend passes it). As a Ray actor
            (``service_backend="ray"``, see :func:`~torchrl_dreamer.trainers.distributed.make_replay_service`) the
            buffer keeps every guarantee above; its files are on the node the actor runs on.

    Examples:
        >>> import tempfile
        >>> from tensordict import TensorDict
        >>> T = 12
        >>> last = torch.arange(T).eq(T - 1).unsqueeze(-1)
        >>> batch = TensorDict({
        ...     "pixels": torch.zeros(T, 1, 8, 8, dtype=torch.uint8), "action": torch.zeros(T, 3),
        ...     "is_init": torch.arange(T).eq(0).unsqueeze(-1),
        ...     "next": {"pixels": torch.zeros(T, 1, 8, 8, dtype=torch.uint8), "reward": torch.zeros(T, 1),
        ...              "terminated": last, "truncated": torch.zeros_like(last), "done": last}}, [T])
        >>> rb = DreamerReplayBuffer(capacity=1000, seq_len=8, batch_size=4, scratch_dir=tempfile.mkdtemp(), seed=0)
        >>> _ = rb.extend(batch)
        >>> len(rb), rb.write_count  # 12 transitions + the final observation
        (13, 12)
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
        obs_keys: Sequence[NestedKey] = ("pixels",),
        scratch_dir: str | Path,
        prioritize_ends: bool = True,
        strict_length: bool = True,
        episodes_by_length: bool = False,
        traj_key: NestedKey = ("collector", "traj_ids"),
        device: torch.device | str = "cpu",
        seed: int | None = None,
        transform: Any = None,
        fresh: bool = False,
        extra_keys: Sequence[NestedKey] = (),
        delayed_init: bool = False,
    ) -> None:
        if delayed_init:  # TorchRL's Ray service passes it (False); the memmap storage is created lazily anyway
            raise ValueError("DreamerReplayBuffer builds its storage, sampler and writer at once: delayed_init=False.")
        if min(seq_len, batch_size) < 1 or not obs_keys:
            raise ValueError("seq_len and batch_size must be >= 1 and obs_keys non-empty.")
        if capacity < seq_len:
            raise ValueError(f"capacity={capacity} rows is less than {seq_len=}.")
        self.capacity = capacity
        self.seq_len = seq_len
        self.obs_keys = tuple(unravel_key(key) for key in obs_keys)
        self.traj_key = unravel_key(traj_key)
        self.device = torch.device(device)
        self.scratch_dir = Path(scratch_dir).absolute()
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        super().__init__(
            storage=self._new_storage(),
            sampler=PrioritizeEndsSampler(
                seq_len=seq_len, traj_key=self.traj_key, strict_length=strict_length, prioritize_ends=prioritize_ends,
                episodes_by_length=episodes_by_length,
            ),
            writer=FifoWriter(mark_path=self.scratch_dir / MARK_FILE),
            batch_size=batch_size,
            transform=transform,
            generator=generator,
        )
        self._storage_id: str | None = None  # identifies the current contents of the storage files
        self.extra_keys = tuple(unravel_key(key) for key in extra_keys)
        self._required_keys = [
            *self.extra_keys,
            *self.obs_keys,
            *(next_key(key) for key in self.obs_keys),
            "action",
            "is_init",
            *(("next", key) for key in NEXT_KEYS),
        ]
        # the keys of a stored row (the next observation of a step is the next row)
        self._row_keys = [_key_tuple(key) for key in (*self.obs_keys, *self.extra_keys, "action", "is_init")]
        self._row_keys += [("next", key) for key in NEXT_KEYS]
        self._mapped_files: dict[Path, tuple[int, int]] = {}  # (device, inode) of each mapped storage file
        self._vanished_warned: set[Path] = set()
        self._discarded = False  # reset_storage() dropped rows that a checkpoint may still describe
        if fresh:
            self.reset_storage()

    @property
    def _storage_dir(self) -> Path:
        return self.scratch_dir / STORAGE_DIR

    def _new_storage(self) -> LazyMemmapStorage:
        return PreallocatedMemmapStorage(self.capacity, scratch_dir=self._storage_dir, existsok=True)

    def reset_storage(self) -> None:
        """Discards every row, on disk too, and leaves an empty buffer on the same ``scratch_dir``.

        Removes ``storage/`` (the memmap files), ``storage_id``, ``write_mark.bin`` and ``replay_state.pt``
        (other files of ``scratch_dir`` are left alone); the next write creates new files under a new storage id,
        so no checkpoint of the old rows can ever be applied to them. The episode table and positions are reset;
        the sampling RNG and transforms are kept. Until the next write, :meth:`load_state_dict` of a checkpoint
        with rows skips it with a warning (its rows are gone), so a trainer that keeps a checkpoint's models but
        refills the replay can load the whole checkpoint as usual. ``make_replay_buffer(..., fresh=True)`` calls
        this on the new buffer.
        """
        with self._replay_lock, self._write_lock:
            # drop the mappings before removing their files
            storage = self._new_storage()
            self.set_storage(storage)
            storage.attach(self)
            self._writer.register_storage(storage)
            self._sampler._empty()
            self._writer.reset()  # removes write_mark.bin
            shutil.rmtree(self._storage_dir, ignore_errors=True)
            if self._storage_dir.exists():
                shutil.rmtree(self._storage_dir)  # raises the error that stopped the removal
            for name in (ID_FILE, ID_FILE + ".tmp", STATE_FILE, STATE_FILE + ".tmp"):
                (self.scratch_dir / name).unlink(missing_ok=True)
            self._storage_id = None
            self._mapped_files = {}
            self._vanished_warned = set()
            self._discarded = True

    # ---- writing ------------------------------------------------------------------------------------------
    def extend(self, tensordicts: TensorDictBase, *, update_priority: bool | None = None) -> torch.Tensor:
        """Adds transitions, shape ``[T]`` or ``[E, T]`` (time last; more leading env dims are flattened).

        Returns:
            the storage slots of the rows written (int64).
        """
        if len(self._transform):
            tensordicts = self._transform.inv(tensordicts)
        if tensordicts is None:
            return torch.zeros(0, dtype=torch.long)
        steps, keys = self._select_steps(tensordicts)
        with self._replay_lock, self._write_lock:
            rows, segments = self._rows_and_segments(steps, keys)
            return self._write(rows, segments, count=steps.numel())

    def add(self, data: TensorDictBase) -> torch.Tensor:
        """Adds one step of one env (batch ``[]``) or of parallel envs (batch ``[E]``)."""
        if not is_tensor_collection(data):
            raise TypeError(f"Expected a TensorDict step, got {type(data).__name__}.")
        return self.extend(data.unsqueeze(-1))

    def share(self, shared: bool = True) -> DreamerReplayBuffer:
        """Refuses sharing: the episode table lives in this process, so other processes cannot write rows.

        With a multi-process collector, iterate it and extend the buffer here: ``for batch in collector:
        rb.extend(batch)``.
        """
        if shared:
            raise RuntimeError(
                f"{type(self).__name__} cannot be shared with other processes (its episode table lives in this "
                "one): do not pass it to a multi-process collector; iterate the collector and call "
                "rb.extend(batch) instead."
            )
        return super().share(False)

    def _select_steps(self, batch: TensorDictBase) -> tuple[TensorDictBase, torch.Tensor]:
        """The stored keys of ``batch`` as ``[S, T]`` streams on CPU, and the episode key of every step."""
        if not is_tensor_collection(batch):
            raise TypeError(f"Expected a TensorDict of transitions, got {type(batch).__name__}.")
        present = set(batch.keys(include_nested=True, leaves_only=True))
        if ("next", "truncated") not in present and {("next", "done"), ("next", "terminated")} <= present:
            # envs without a truncated flag (TorchRL's default done spec): done and not terminated
            done, terminated = batch.get(("next", "done")), batch.get(("next", "terminated"))
            batch = batch.clone(False).set(("next", "truncated"), done & ~terminated)
            present.add(("next", "truncated"))
        missing = [key for key in self._required_keys if key not in present]
        if missing:
            raise KeyError(
                f"The batch lacks the keys {missing} required by the replay buffer "
                f"(required: {self._required_keys}). Add them (e.g. InitTracker for 'is_init') or fix obs_keys."
            )
        has_ids = self.traj_key in present
        steps = batch.select(*self._required_keys, *([self.traj_key] if has_ids else [])).to("cpu").contiguous()
        if steps.ndim == 0:
            raise ValueError("extend() takes transitions with a time dim, [T] or [E, T]: use add() for one step.")
        steps = steps.reshape(-1, steps.shape[-1])
        if has_ids:
            keys = steps.get(self.traj_key).reshape(steps.shape).long()
        else:  # one stream per leading index; negative keys never clash with trajectory ids
            keys = (-1 - torch.arange(steps.shape[0])).unsqueeze(-1).expand(steps.shape)
        return steps, keys

    def _rows_and_segments(self, steps: TensorDictBase, keys: torch.Tensor) -> tuple[TensorDictBase, list]:
        """Rows of all streams, and the segments ``(key, row offset, rows, new episode, closes)`` they form.

        A segment is a run of steps of one stream with one key, cut before ``is_init`` and after ``done``: it
        continues its key's open episode unless it starts with ``is_init``.
        """
        table = self._sampler.episodes
        still_open: dict[int, bool] = {}  # keys touched by this batch
        all_rows, segments, offset = [], [], 0
        for stream, stream_keys in zip(steps.unbind(0), keys.unbind(0)):
            num_steps = len(stream_keys)
            is_init = stream.get("is_init").reshape(num_steps).bool()
            done = stream.get(("next", "done")).reshape(num_steps).bool()
            cut = torch.ones(num_steps, dtype=torch.bool)
            cut[1:] = is_init[1:] | done[:-1] | (stream_keys[1:] != stream_keys[:-1])
            bounds = cut.nonzero().squeeze(-1).tolist() + [num_steps]
            starts = torch.zeros(num_steps, dtype=torch.bool)
            pieces = []
            for a, b in zip(bounds[:-1], bounds[1:]):
                key = int(stream_keys[a])
                starts[a] = bool(is_init[a]) or not still_open.get(key, table.is_open(key))
                still_open[key] = not bool(done[b - 1])
                pieces.append((key, a, b, bool(starts[a]), bool(done[b - 1])))
            rows, row_of_step = step_rows(stream, starts, self.obs_keys, self.extra_keys)
            for key, a, b, new_episode, closes in pieces:
                first, last = int(row_of_step[a]), int(row_of_step[b - 1]) + 1 + closes
                segments.append((key, offset + first, last - first, new_episode, closes))
            all_rows.append(rows)
            offset += len(rows)
        return torch.cat(all_rows), segments

    def _write(self, rows: TensorDictBase, segments: list, count: int) -> torch.Tensor:
        new_storage = not self._storage.initialized
        if new_storage:
            # New contents get a new id first: no checkpoint of the old contents can be applied to them.
            self._set_storage_id(uuid.uuid4().hex)
        first = self._writer.end
        slots = self._writer.extend(rows, count=count)
        table = self._sampler.episodes
        for key, offset, num_rows, new_episode, closes in segments:
            table.append(key, first=first + offset, num_rows=num_rows, new_episode=new_episode, closes=closes)
        table.evict(self._writer.end - self.capacity)
        if new_storage:
            self._write_storage_metadata()
            self._check_mapped(hint=None)
            self._discarded = False
        return slots

    # ---- sampling -----------------------------------------------------------------------------------------
    def sample(self, batch_size: int | None = None, return_info: bool = False) -> TensorDictBase:
        """Samples ``[batch_size, seq_len]`` rows (``batch_size`` sequences, defaulting to the constructor's).

        Returns:
            a TensorDict of shape ``[batch_size, seq_len]`` on ``device`` with the obs keys, ``"action"``,
            ``"is_init"``, ``("next", "reward")`` (float32), ``("next", "terminated" | "truncated" | "done")``
            (bool; trailing dim 1 on ``is_init``, rewards and flags) and ``"index"`` (int64 storage slots), after
            the transforms; with ``return_info``, also the info dict.

        Raises:
            RuntimeError: if no episode can be sampled yet.
        """
        return super().sample(batch_size, return_info=return_info)

    def _sample(self, batch_size: int) -> tuple[TensorDictBase, dict]:
        with self._replay_lock, self._write_lock:
            index, info = self._sampler.sample(self._storage, batch_size * self.seq_len)
            data = self._storage.get(index)
        shape = (batch_size, self.seq_len)
        data = data.reshape(shape)
        data.set("is_init", data.get("is_init") | info.pop("is_init").reshape(*shape, 1))
        info["index"] = index.reshape(shape)
        if self.device.type == "cuda":
            data = data.pin_memory()
        if self.device.type != "cpu":
            data = data.to(self.device, non_blocking=True)
        if len(self._transform):
            with data.unlock_(), _set_dispatch_td_nn_modules(True):
                data = self._transform(data)
        return data, info

    def can_sample(self, batch_size: int | None = None) -> bool:
        """Whether some episode can be sampled (with ``strict_length``, one with ``seq_len`` stored rows)."""
        num_sequences = self._batch_size if batch_size is None else batch_size
        return self._sampler.can_sample(self._storage, num_sequences * self.seq_len)

    def __len__(self) -> int:
        return self._sampler.episodes.num_rows

    @property
    def num_episodes(self) -> int:
        """Episodes (complete or ongoing) with at least one stored row."""
        return self._sampler.episodes.num_episodes

    def episodes(self) -> list[dict[str, Any]]:
        """Every stored episode, oldest first: ``{"key": its trajectory id, "closed": whether a later row could
        still continue it, "rows": its stored rows in order (a TensorDict on CPU)}``. For inspection (a Ray
        service's client returns it too); the rows are read from storage."""
        table = self._sampler.episodes
        with self._replay_lock, self._write_lock:
            ids, _ = table.lengths()
            return [{"key": table.key(int(i)), "closed": table.is_closed(int(i)),
                     "rows": self._storage.get(torch.from_numpy(table.positions(int(i)) % self._storage.max_size)).clone()}
                    for i in ids]

    def read_keys(self) -> list:
        """The keys :meth:`extend` reads from a batch (the rest is ignored): a writer in another process may send
        only these."""
        return [*self._required_keys, self.traj_key]

    def episode_keys(self) -> list[int]:
        """The trajectory id of every stored episode, oldest first (what :meth:`episodes` lists, without rows)."""
        table = self._sampler.episodes
        with self._replay_lock, self._write_lock:
            ids, _ = table.lengths()
            return [table.key(int(i)) for i in ids]

    def close_episodes(self, keys: Callable[[int], bool] | None = None) -> list[int]:
        """Closes the open episodes whose trajectory id ``keys(id)`` accepts (every open episode when ``None``), as
        if their source had stopped: a later row with one of these ids starts a new episode. For a source that died
        mid-episode (e.g. a Ray collector worker), whose episodes would otherwise stay open. Returns the ids closed.
        """
        table = self._sampler.episodes
        with self._replay_lock, self._write_lock:
            closed = [key for key in table.open_keys() if keys is None or keys(key)]
            for key in closed:
                table.close(key)
            return closed

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Positions, episode table, RNG and transform states; the rows stay in the memmap files of ``scratch_dir``.

        Also the layout of the storage files (key, shape, dtype), checked on restore. Warns when a mapped storage
        file vanished or was replaced on disk (the rows then live only in this process: this checkpoint's replay
        will not restore).
        """
        self._warn_if_files_vanished()
        return {
            "capacity": self.capacity,
            "obs_keys": list(self.obs_keys),
            "storage_initialized": self._storage.initialized,
            "storage_id": self._storage_id,
            "storage_layout": self._storage_layout(),
            "writer": self._writer.state_dict(),
            "sampler": self._sampler.state_dict(),
            "generator": self._rng.get_state(),
            "transforms": self._transform.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` taken on the rows now in ``scratch_dir`` (same directory, zero copy).

        Rows written after the state was taken (e.g. by a process killed later) are ignored, and so are the older
        rows they overwrote; open episodes are closed, so the next rows start new ones.

        After :meth:`reset_storage` (or ``fresh=True``) and before the next write, a state with rows is skipped with
        a warning: its rows were discarded.

        Raises:
            ReplayIntegrityError: if the files of ``scratch_dir`` do not hold the rows of the state (a missing,
                truncated or oversized memmap file, another shape or dtype, another storage id, a missing or
                lower high-water mark); raised before any file or row changes.
            ValueError: if the state is of a buffer with another ``capacity`` or ``obs_keys``.
        """
        if self._discarded and state_dict["storage_initialized"]:
            warnings.warn(
                f"Replay {self.scratch_dir}: the checkpoint's replay state ({int(state_dict['writer']['end'])} rows "
                "written) is not restored, its rows were discarded (fresh replay); the buffer refills from empty.",
                stacklevel=2,
            )
            return
        if state_dict["capacity"] != self.capacity:
            raise ValueError(f"Checkpoint has capacity={state_dict['capacity']}, this buffer {self.capacity}.")
        if [tuple(k) if isinstance(k, list) else k for k in state_dict["obs_keys"]] != list(self.obs_keys):
            raise ValueError(f"Checkpoint has obs_keys={state_dict['obs_keys']}, this buffer {self.obs_keys}.")
        if state_dict["storage_initialized"]:
            self._verify_files(self.scratch_dir, state_dict)
            problem = self._writer.mark_problem(int(state_dict["writer"]["end"]))
            if problem is not None:
                raise ReplayIntegrityError(
                    self.scratch_dir / MARK_FILE,
                    f"{problem}: rows written after the checkpoint may have overwritten rows it counts",
                )
            if not self._storage.initialized:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._storage.loads(self._storage_dir)  # maps the existing files, no copy
            self._check_mapped()
            # files of an older run may be sparse: their blocks now, so that no later write meets a full disk
            preallocate_files(self._storage._storage, self._storage_dir, remove_on_failure=False)
            self._storage_id = state_dict["storage_id"]
        with self._replay_lock, self._write_lock:
            self._writer.load_state_dict(state_dict["writer"])
            self._sampler.load_state_dict(state_dict["sampler"])
            self._sampler.episodes.close_all()
            self._sampler.episodes.evict(self._writer.end - self.capacity)
            self._rng.set_state(state_dict["generator"].cpu())
            self._transform.load_state_dict(state_dict["transforms"])

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
                self._storage.dumps(path / STORAGE_DIR)
            _write_text(path / ID_FILE, self._storage_id)  # the copy can serve as a scratch_dir itself
            _write_mark(path / MARK_FILE, int(state["writer"]["end"]))  # nothing was written there after the copy
        tmp = path / (STATE_FILE + ".tmp")
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path / STATE_FILE)

    def loads(self, path: str | Path) -> None:
        """Restores a checkpoint written by :meth:`dumps` (in place, or copied from another directory).

        Raises:
            ReplayIntegrityError: if the files of ``path`` (and, in place, of ``scratch_dir``) do not hold the rows of
                the checkpoint; raised before any file or row changes. See :meth:`load_state_dict`.
        """
        path = Path(path).absolute()
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"No replay checkpoint {state_path}.")
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        if path != self.scratch_dir and state["storage_initialized"]:
            self._verify_files(path, state)
            # Copy the snapshot's rows into scratch_dir; until the copy is complete no checkpoint matches them.
            self._set_storage_id(uuid.uuid4().hex)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._storage.loads(path / STORAGE_DIR)
            self._write_storage_metadata()
            self._check_mapped()
            self._discarded = False  # a snapshot's rows are restored, not skipped
            self._writer.reset_mark(int(state["writer"]["end"]))
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

    # ---- integrity ----------------------------------------------------------------------------------------
    def _storage_layout(self) -> list[dict[str, Any]]:
        if not self._storage.initialized:
            return []
        return [
            {"key": list(_key_tuple(key)), "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
            for key, tensor in self._storage._storage.items(include_nested=True, leaves_only=True)
        ]

    def _verify_files(self, directory: Path, state: dict[str, Any]) -> None:
        """Raises :class:`ReplayIntegrityError` unless ``directory`` holds the rows ``state`` describes (reads only)."""
        expected_id = state["storage_id"]
        id_path = directory / ID_FILE
        found = _read_text(id_path)
        if found is None:
            raise ReplayIntegrityError(id_path, f"missing; the checkpoint describes the rows of storage {expected_id}")
        if found != expected_id:
            raise ReplayIntegrityError(
                id_path,
                f"storage id {found} != {expected_id} of the checkpoint: the checkpoint describes other rows than "
                f"those in {directory} (a fresh buffer or another snapshot replaced them)",
            )
        storage_dir = directory / STORAGE_DIR
        if not storage_dir.is_dir():
            raise ReplayIntegrityError(storage_dir, "missing (the directory of the memmap rows)")
        on_disk = _read_meta(storage_dir)
        rows = int(state["writer"]["end"])
        layout = state.get("storage_layout")
        if layout is None:  # a checkpoint from before layouts were recorded: trust meta.json, check what we can
            expected = {key: (entry["shape"], entry["dtype"]) for key, entry in on_disk.items()}
            for key in self._row_keys:
                if key not in expected:
                    file = _leaf_file(storage_dir, key)
                    problem = "missing" if not file.exists() else f"not listed in {_meta_file(storage_dir, key).name}"
                    raise ReplayIntegrityError(file, f"{problem}; the checkpoint counts {rows} rows written to it")
        else:
            expected = {tuple(entry["key"]): (list(entry["shape"]), entry["dtype"]) for entry in layout}
        for key, (shape, dtype) in expected.items():
            file = _leaf_file(storage_dir, key)
            if not file.is_file():
                raise ReplayIntegrityError(file, f"missing; the checkpoint counts {rows} rows written to it")
            entry = on_disk.get(key)
            meta = _meta_file(storage_dir, key)
            if entry is None:
                raise ReplayIntegrityError(
                    file, f"not listed in {meta.relative_to(directory)}, which TorchRL maps the files from"
                )
            found_layout = (list(entry["shape"]), entry["dtype"])
            if found_layout != (list(shape), dtype):
                raise ReplayIntegrityError(
                    file,
                    f"{meta.relative_to(directory)} describes {_describe(*found_layout)}, the checkpoint expects "
                    f"{_describe(shape, dtype)}",
                )
            if not shape or shape[0] != self.capacity:
                raise ReplayIntegrityError(
                    file, f"holds {_describe(shape, dtype)}, not {self.capacity} rows (the buffer's capacity)"
                )
            size, want = file.stat().st_size, _nbytes(shape, dtype, file)
            if size != want:
                raise ReplayIntegrityError(
                    file,
                    f"{'truncated' if size < want else 'oversized'}: {size} bytes, the checkpoint expects {want} "
                    f"({_describe(shape, dtype)})",
                )
        extra = [key for key in on_disk if key not in expected]
        if extra:
            raise ReplayIntegrityError(
                _meta_file(storage_dir, extra[0]),
                f"lists {'/'.join(extra[0])}, which the checkpoint does not have",
            )
        if not (storage_dir / "storage_metadata.json").is_file():
            raise ReplayIntegrityError(storage_dir / "storage_metadata.json", "missing (TorchRL's storage metadata)")

    def _check_mapped(self, hint: str | None = FRESH_REPLAY_HINT) -> None:
        """Raises unless every stored key is memory-mapped from its file under ``storage/`` (never held in RAM)."""
        if not self._storage.initialized:
            return
        mapped: dict[Path, tuple[int, int]] = {}
        keys = []
        for key, tensor in self._storage._storage.items(include_nested=True, leaves_only=True):
            key = _key_tuple(key)
            keys.append(key)
            file = _leaf_file(self._storage_dir, key)
            filename = getattr(tensor, "filename", None) if isinstance(tensor, MemoryMappedTensor) else None
            if filename is None or Path(filename).absolute() != file:
                raise ReplayIntegrityError(file, "not memory-mapped: its rows would live only in RAM", hint=hint)
            stat = file.stat()
            mapped[file] = (stat.st_dev, stat.st_ino)
        missing = [key for key in self._row_keys if key not in keys]
        if missing:
            file = _leaf_file(self._storage_dir, missing[0])
            raise ReplayIntegrityError(file, "not in the storage: its rows would live only in RAM", hint=hint)
        self._mapped_files = mapped
        self._vanished_warned = set()

    def _warn_if_files_vanished(self) -> None:
        for file, identity in self._mapped_files.items():
            try:
                stat = file.stat()
                gone = (stat.st_dev, stat.st_ino) != identity
            except FileNotFoundError:
                gone = True
            if gone and file not in self._vanished_warned:
                self._vanished_warned.add(file)
                warnings.warn(
                    f"Replay file {file}: removed or replaced on disk while mapped; its rows now live only in this "
                    "process, and a checkpoint taken now cannot restore the replay (resume with fresh_replay=True / "
                    "--fresh-replay to keep the models).",
                    stacklevel=3,
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rows={len(self)}, episodes={self.num_episodes}, capacity={self.capacity}, "
            f"seq_len={self.seq_len}, batch_size={self._batch_size}, strict_length={self._sampler.strict_length}, "
            f"write_count={self.write_count}, scratch_dir={str(self.scratch_dir)!r})"
        )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _write_mark(path: Path, end: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(int(end).to_bytes(8, sys.byteorder, signed=True))  # one native int64, as FifoWriter maps it
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _key_tuple(key: NestedKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)


def _leaf_file(storage_dir: Path, key: tuple[str, ...]) -> Path:
    return storage_dir.joinpath(*key[:-1], key[-1] + ".memmap")


def _meta_file(storage_dir: Path, key: tuple[str, ...]) -> Path:
    return storage_dir.joinpath(*key[:-1], "meta.json")


def _describe(shape: Sequence[int], dtype: str) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _nbytes(shape: Sequence[int], dtype: str, file: Path) -> int:
    torch_dtype = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ReplayIntegrityError(file, f"unknown dtype {dtype}")
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * torch.empty((), dtype=torch_dtype).element_size()


def _read_meta(storage_dir: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    """The leaves ``{key: {"shape", "dtype", ...}}`` that TensorDict's ``meta.json`` files describe (reads only)."""
    leaves: dict[tuple[str, ...], dict[str, Any]] = {}

    def visit(directory: Path, prefix: tuple[str, ...]) -> None:
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise ReplayIntegrityError(meta_path, "missing (TorchRL maps the storage files from it)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ReplayIntegrityError(meta_path, f"unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(meta, dict):
            raise ReplayIntegrityError(meta_path, "unreadable (not a JSON object)")
        for name, entry in meta.items():
            if not isinstance(entry, dict):  # shape, device, _type of the TensorDict itself
                continue
            if entry.get("type") == "TensorDict":
                visit(directory / name, (*prefix, name))
            elif "shape" in entry and "dtype" in entry:
                leaves[(*prefix, name)] = entry

    visit(storage_dir, ())
    return leaves


def make_replay_buffer(
    *,
    capacity: int = 2_000_000,
    seq_len: int = 50,
    batch_size: int = 16,
    obs_keys: Sequence[NestedKey] = ("pixels",),
    scratch_dir: str | Path,
    prioritize_ends: bool = True,
    strict_length: bool = True,
    episodes_by_length: bool = False,
    traj_key: NestedKey = ("collector", "traj_ids"),
    device: torch.device | str = "cpu",
    seed: int | None = None,
    transform: Any = None,
    fresh: bool = False,
) -> DreamerReplayBuffer:
    """Builds the DreamerV2 replay buffer (see :class:`DreamerReplayBuffer` for the arguments).

    With ``fresh=True`` the rows found in ``scratch_dir`` are discarded, on disk too, and the buffer starts empty
    (:meth:`DreamerReplayBuffer.reset_storage`): the library side of a trainer's ``fresh_replay=True`` /
    ``--fresh-replay``, which keeps a checkpoint's models and refills the replay. Such a buffer skips, with a
    warning, the replay state of the checkpoint the trainer then loads.

    Examples:
        >>> import tempfile
        >>> rb = make_replay_buffer(capacity=10_000, seq_len=50, scratch_dir=tempfile.mkdtemp())
        >>> rb.capacity, len(rb), rb.can_sample()
        (10000, 0, False)
    """
    return DreamerReplayBuffer(
        capacity=capacity,
        seq_len=seq_len,
        batch_size=batch_size,
        obs_keys=obs_keys,
        scratch_dir=scratch_dir,
        prioritize_ends=prioritize_ends,
        strict_length=strict_length,
        episodes_by_length=episodes_by_length,
        traj_key=traj_key,
        device=device,
        seed=seed,
        transform=transform,
        fresh=fresh,
    )
