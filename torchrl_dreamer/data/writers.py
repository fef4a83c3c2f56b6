"""A TorchRL writer for one FIFO of rows with absolute positions and a crash-safe high-water mark.

Every row gets an absolute *position* (0, 1, 2, ...; never reused, not even after a restore) and position ``p``
lives in slot ``p % capacity`` of the storage: the storage holds the last ``capacity`` positions.

Crash safety: before writing rows the writer raises a persistent high-water mark (one int64 in a small
memory-mapped file, which outlives a SIGKILL through the page cache). A checkpoint records the positions written so
far; on restore, any position between the checkpoint and the mark may have overwritten an older slot, so those slots
are treated as lost and writing resumes after the mark (see :class:`~torchrl_dreamer.data.DreamerReplayBuffer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.data.replay_buffers.writers import Writer

__all__ = ["FifoWriter"]


class FifoWriter(Writer):
    """Writes rows at increasing absolute positions into a circular storage (FIFO eviction).

    Args:
        mark_path (str or Path, optional): file holding the persistent high-water mark. An existing file is
            reused, and positions continue after its mark; a missing or damaged one is left as it is until the
            first write (see :meth:`mark_problem`). Defaults to ``None`` (no mark).

    Examples:
        >>> from torchrl.data import LazyTensorStorage, ReplayBuffer
        >>> writer = FifoWriter()
        >>> rb = ReplayBuffer(storage=LazyTensorStorage(4), writer=writer)
        >>> writer.extend(torch.arange(3))
        tensor([0, 1, 2])
        >>> writer.extend(torch.arange(3))  # wraps around: position 4 goes to slot 4 % 4
        tensor([3, 0, 1])
        >>> writer.end, len(rb.storage)
        (6, 4)
    """

    def __init__(self, *, mark_path: str | Path | None = None) -> None:
        super().__init__()
        self._mark_path = Path(mark_path) if mark_path is not None else None
        # Opening never modifies the file: a missing or damaged mark stays as it is (see mark_problem()) until the
        # first write or restore creates a new one.
        self._mark = _open_mark(self._mark_path) if self._mark_path is not None else None
        # Next absolute position: continue after any position ever written in this directory.
        self._end = int(self._mark[0]) if self._mark is not None else 0
        self._write_count = 0

    @property
    def end(self) -> int:
        """The position the next row will get (= rows ever written)."""
        return self._end

    @property
    def capacity(self) -> int:
        return int(self._storage.max_size)

    def extend(self, data: Any, *, count: int | None = None) -> torch.Tensor:
        """Appends rows (a batch along dim 0) and returns the storage slots they were written to.

        A batch longer than the storage keeps only its last ``capacity`` rows (the others count as written and
        immediately evicted).

        Args:
            data: rows, a TensorDict or tensor batch.
            count (int, optional): items these rows stand for in ``write_count`` (e.g. collected transitions).
                Defaults to the number of rows.
        """
        num_rows, capacity = len(data), self.capacity
        end = self._end + num_rows
        if num_rows > capacity:
            data = data[num_rows - capacity :]
        first = end - len(data)
        mark = self._writable_mark()
        if mark is not None:
            # Write-ahead: the mark covers these slots before they are touched.
            mark[0] = max(int(mark[0]), end)
        self._end = end
        # One or two slices (when wrapping around) keep memmap writes sequential.
        slot, head = first % capacity, min(len(data), capacity - first % capacity)
        self._storage.set(slice(slot, slot + head), data[:head], set_cursor=False)
        if head < len(data):
            self._storage.set(slice(0, len(data) - head), data[head:], set_cursor=False)
        self._sync_storage_len()
        self._write_count += num_rows if count is None else count
        return torch.arange(first, end) % capacity

    def add(self, data: Any) -> torch.Tensor:
        """Appends a single row."""
        if isinstance(data, TensorDictBase):
            return self.extend(data.unsqueeze(0))
        return self.extend(torch.as_tensor(data).unsqueeze(0))

    def state_dict(self) -> dict[str, Any]:
        return {"end": self._end, "write_count": self._write_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the position; writing resumes after the high-water mark if rows were written after the save."""
        saved = int(state_dict["end"])
        if self._mark_path is not None:
            self._mark = _open_mark(self._mark_path)  # the file as it is now (None: missing, created below)
        self._end = max(saved, int(self._mark[0])) if self._mark is not None else saved
        self._write_count = int(state_dict["write_count"])
        self.reset_mark(self._end)
        self._sync_storage_len()

    def reset_mark(self, end: int) -> None:
        """Sets the persistent mark, e.g. after the whole storage was replaced by a snapshot."""
        mark = self._writable_mark()
        if mark is not None:
            mark[0] = end

    def reset(self) -> None:
        """Forgets every position: the next row gets position 0, and the mark file is removed (recreated on write).

        For a storage whose files were discarded (see :meth:`DreamerReplayBuffer.reset_storage`).
        """
        self._mark = None
        if self._mark_path is not None:
            self._mark_path.unlink(missing_ok=True)
        self._end = 0
        self._write_count = 0
        self._sync_storage_len()

    def mark_problem(self, end: int) -> str | None:
        """Why the mark file on disk cannot vouch for a checkpoint that wrote ``end`` positions, or None.

        Reads the file (never writes it): a missing or resized file, or a mark below ``end``, means the rows
        written after the checkpoint are unknown, so the slots they may have overwritten cannot be told apart.
        """
        if self._mark_path is None:
            return None
        try:
            size = self._mark_path.stat().st_size
        except FileNotFoundError:
            return "missing (the persistent high-water mark of the written rows)"
        if size != _MARK_BYTES:
            return f"{size} bytes, expected {_MARK_BYTES} (one int64 high-water mark)"
        mark = int(np.fromfile(self._mark_path, dtype=np.int64, count=1)[0])
        if mark < end:
            return f"high-water mark {mark} is below the checkpoint's {end} written rows"
        return None

    def _writable_mark(self) -> np.memmap | None:
        if self._mark is None and self._mark_path is not None:
            self._mark = _open_mark(self._mark_path, create=True)
        return self._mark

    def _sync_storage_len(self) -> None:
        # TorchRL storages only read slots below their length.
        if self._storage is not None:
            self._storage._len = min(self._end, self.capacity)

    def _empty(self, empty_write_count: bool = True) -> None:
        # Positions keep increasing so that a checkpoint never mistakes new rows for old ones.
        if empty_write_count:
            self._write_count = 0

    def dumps(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "fifo_writer.pt")

    def loads(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(Path(path) / "fifo_writer.pt", weights_only=True, map_location="cpu"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(end={self._end}, write_count={self._write_count})"


_MARK_BYTES = 8


def _open_mark(path: Path, *, create: bool = False) -> np.memmap | None:
    """Maps an existing 8-byte mark file; with ``create``, replaces a missing or damaged one by a zero mark."""
    if path.is_file() and path.stat().st_size == _MARK_BYTES:
        return np.memmap(path, dtype=np.int64, mode="r+", shape=(1,))
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    mark = np.memmap(path, dtype=np.int64, mode="w+", shape=(1,))
    mark[:] = 0
    return mark
