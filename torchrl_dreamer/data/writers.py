"""A TorchRL writer that keeps one FIFO stream of rows per environment in a single storage.

Stream ``s`` owns the storage slots ``[s * stream_capacity, (s + 1) * stream_capacity)``. Every row of a stream
gets an absolute *position* (0, 1, 2, ...; never reused, not even after a restore) and position ``p`` lives in slot
``s * stream_capacity + p % stream_capacity``: a stream is a circular buffer holding its last ``stream_capacity``
positions, and rows of different environments never interleave.

Crash safety: before writing rows the writer raises a persistent high-water mark of the stream (one int64 per stream
in a small memory-mapped file, which outlives a SIGKILL through the page cache). A checkpoint records the positions
written so far; on restore, any position between the checkpoint and the mark may have overwritten an older slot, so
those slots are treated as lost and writing resumes after the mark (see ``DreamerReplayBuffer``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.data import RoundRobinWriter

__all__ = ["StreamWriter"]


class StreamWriter(RoundRobinWriter):
    """Writes rows into per-stream circular segments of one storage (FIFO eviction per stream).

    Args:
        num_streams (int): number of independent streams (one per environment).
        stream_capacity (int): rows kept per stream; the storage must hold ``num_streams * stream_capacity`` rows.
        marks_path (str or Path, optional): file holding the persistent high-water marks. An existing file with
            the right size is reused, and positions continue after its marks. Defaults to ``None`` (no marks).

    Examples:
        >>> import torch
        >>> from torchrl.data import LazyTensorStorage, ReplayBuffer
        >>> writer = StreamWriter(num_streams=2, stream_capacity=4)
        >>> rb = ReplayBuffer(storage=LazyTensorStorage(8), writer=writer)
        >>> writer.extend(torch.arange(3), stream=1)
        tensor([4, 5, 6])
        >>> writer.extend(torch.arange(3), stream=1)  # wraps around: position 4 goes to slot 4 + 4 % 4
        tensor([7, 4, 5])
        >>> writer.stream_end(1)
        6
    """

    def __init__(
        self,
        *,
        num_streams: int,
        stream_capacity: int,
        marks_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if num_streams < 1 or stream_capacity < 1:
            raise ValueError(f"num_streams and stream_capacity must be >= 1, got {num_streams}, {stream_capacity}.")
        self.num_streams = num_streams
        self.stream_capacity = stream_capacity
        self._marks = _open_marks(marks_path, num_streams) if marks_path is not None else None
        # Next absolute position of each stream: continue after any position ever written in this directory.
        self._stream_ends = np.zeros(num_streams, np.int64) if self._marks is None else np.array(self._marks)

    def stream_end(self, stream: int) -> int:
        """Returns the position the next row of ``stream`` will get (= rows ever written to it)."""
        return int(self._stream_ends[stream])

    @property
    def stream_ends(self) -> np.ndarray:
        """A copy of the next position of every stream, shape ``[num_streams]``."""
        return self._stream_ends.copy()

    def slots(self, stream: int | np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Maps absolute positions of a stream to storage slots (arrays broadcast together)."""
        return np.asarray(stream) * self.stream_capacity + np.asarray(positions) % self.stream_capacity

    def extend(self, data: Any, *, stream: int = 0) -> torch.Tensor:
        """Appends rows (a batch along dim 0) to a stream and returns the storage slots they were written to.

        A batch longer than the stream keeps only its last ``stream_capacity`` rows (the others count as written
        and immediately evicted).
        """
        num_rows = len(data)
        first = self.stream_end(stream)
        end = first + num_rows
        if num_rows > self.stream_capacity:
            data = data[num_rows - self.stream_capacity :]
        positions = np.arange(end - len(data), end)
        if self._marks is not None:
            # Write-ahead: the mark covers these slots before they are touched.
            self._marks[stream] = max(int(self._marks[stream]), end)
        index = torch.as_tensor(self.slots(stream, positions))
        self._stream_ends[stream] = end
        return self.write_at(index, data)

    def add(self, data: Any, *, stream: int = 0) -> torch.Tensor:
        """Appends a single row to a stream."""
        if isinstance(data, TensorDictBase):
            return self.extend(data.unsqueeze(0), stream=stream)
        return self.extend(torch.as_tensor(data).unsqueeze(0), stream=stream)

    def state_dict(self) -> dict[str, Any]:
        return {"stream_ends": torch.as_tensor(self._stream_ends), "write_count": self._write_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the positions; a stream resumes after its high-water mark if rows were written after the save."""
        saved = state_dict["stream_ends"].cpu().numpy().astype(np.int64)
        if saved.shape != (self.num_streams,):
            raise ValueError(f"Checkpoint has {saved.shape[0]} streams, this writer has {self.num_streams}.")
        marks = np.array(self._marks) if self._marks is not None else saved
        self._stream_ends = np.maximum(saved, marks)
        self._write_count = int(state_dict["write_count"])
        self.reset_marks(self._stream_ends)
        self._sync_storage_len()

    def reset_marks(self, stream_ends: np.ndarray) -> None:
        """Sets the persistent marks, e.g. after the whole storage was replaced by a snapshot."""
        if self._marks is not None:
            self._marks[:] = stream_ends

    def _sync_storage_len(self) -> None:
        # TorchRL storages only read slots below their length: cover the used part of every stream.
        if self._storage is None or not getattr(self._storage, "initialized", False):
            return
        used = np.minimum(self._stream_ends, self.stream_capacity)
        streams = np.flatnonzero(used)
        if len(streams):
            last = int((streams * self.stream_capacity + used[streams]).max()) - 1
            self._update_storage_len_for_write_at(torch.tensor([last]))

    def _empty(self, empty_write_count: bool = True) -> None:
        # Positions keep increasing so that a checkpoint never mistakes new rows for old ones.
        if empty_write_count:
            self._write_count = 0

    def dumps(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "stream_writer.pt")

    def loads(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(Path(path) / "stream_writer.pt", weights_only=True, map_location="cpu"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_streams={self.num_streams}, stream_capacity={self.stream_capacity}, "
            f"stream_ends={self._stream_ends.tolist()})"
        )


def _open_marks(path: str | Path, num_streams: int) -> np.memmap:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == num_streams * 8:
        return np.memmap(path, dtype=np.int64, mode="r+", shape=(num_streams,))
    marks = np.memmap(path, dtype=np.int64, mode="w+", shape=(num_streams,))
    marks[:] = 0
    return marks
