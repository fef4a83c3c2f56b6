"""DreamerV2's sequence sampler: one episode uniformly, then a start that favours the episode end.

The DreamerV2 reference (``common/replay.py``, ``prioritize_ends=True``) draws a window of ``seq_len`` consecutive
steps from an episode of ``L`` stored steps as::

    start = min(randint(0, L - seq_len + 1 + seq_len), L - seq_len)     # numpy: exclusive upper bound

so every start ``k < L - seq_len`` has probability ``1 / (L + 1)`` and the last one, the window that ends on the
episode's final observation, has probability ``(seq_len + 1) / (L + 1)``. Without ``prioritize_ends`` the start is
uniform over the ``L - seq_len + 1`` windows.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchrl.data.replay_buffers.samplers import Sampler
from torchrl.data.replay_buffers.storages import Storage

__all__ = ["PrioritizeEndsSampler"]


class PrioritizeEndsSampler(Sampler):
    """Samples windows of consecutive rows of one episode from per-stream FIFO storage.

    The sampler keeps the episode table: for every stream (environment), the absolute positions ``[start, end)``
    of its episodes (see :class:`~torchrl_dreamer.data.StreamWriter` for positions and slots) and the first
    position still in the storage. An episode's stored length is ``end - max(start, first stored position)``:
    the head of an episode evicted by FIFO is gone, its tail stays sampleable while it has ``seq_len`` rows.
    The last episode of a stream may be ongoing; it is sampleable like any other.

    A call to :meth:`sample` with ``batch_size = num_sequences * seq_len`` returns the flat storage slots of
    ``num_sequences`` windows, window after window.

    Args:
        seq_len (int): rows per sampled sequence.
        num_streams (int): number of streams.
        stream_capacity (int): slots per stream.
        prioritize_ends (bool, optional): use the reference's end-favouring start distribution; ``False`` draws
            the start uniformly. Defaults to ``True``.

    Reference: Hafner et al., "Mastering Atari with Discrete World Models" (ICLR 2021), ``common/replay.py``.

    Examples:
        >>> import torch
        >>> sampler = PrioritizeEndsSampler(seq_len=3, num_streams=2, stream_capacity=10)
        >>> sampler._rng = torch.Generator().manual_seed(0)
        >>> sampler.record(1, first=0, num_rows=5, episode_starts=[0], closes_episode=True)
        >>> index, _ = sampler.sample(None, 6)  # two windows of 3 rows of stream 1 (slots 10..14)
        >>> index.shape, bool(((index >= 10) & (index < 15)).all())
        (torch.Size([6]), True)
    """

    def __init__(
        self,
        *,
        seq_len: int,
        num_streams: int,
        stream_capacity: int,
        prioritize_ends: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
        self.seq_len = seq_len
        self.num_streams = num_streams
        self.stream_capacity = stream_capacity
        self.prioritize_ends = prioritize_ends
        self._empty()

    # ---- episode table ------------------------------------------------------------------------------------
    def is_open(self, stream: int) -> bool:
        """Whether the last episode of ``stream`` is ongoing (its final row has not been written)."""
        return bool(self._open[stream])

    def record(
        self,
        stream: int,
        *,
        first: int,
        num_rows: int,
        episode_starts: Sequence[int],
        closes_episode: bool,
    ) -> None:
        """Registers ``num_rows`` rows written at positions ``[first, first + num_rows)`` of ``stream``.

        Args:
            stream (int): the stream written to.
            first (int): position of the first row.
            num_rows (int): number of rows.
            episode_starts (sequence of int): sorted positions, within the rows, where an episode begins. Rows
                before the first of them continue the stream's ongoing episode.
            closes_episode (bool): whether the last row ends its episode (no row may continue it).
        """
        if num_rows == 0:
            return
        starts, ends = self._starts[stream], self._ends[stream]
        bounds = [int(p) for p in episode_starts] + [first + num_rows]
        if bounds[0] != first:
            if not self._open[stream] or not ends or ends[-1] != first:
                raise RuntimeError(
                    f"Rows at position {first} of stream {stream} continue no ongoing episode: "
                    "the first row must start an episode."
                )
            ends[-1] = bounds[0]
        for start, end in zip(bounds[:-1], bounds[1:]):
            starts.append(start)
            ends.append(end)
        self._open[stream] = not closes_episode
        self._table = None

    def close(self, stream: int) -> None:
        """Ends the ongoing episode of ``stream`` without a final row (its next row starts a new episode)."""
        self._open[stream] = False

    def evict(self, stream: int, first_stored: int) -> None:
        """Marks positions below ``first_stored`` of ``stream`` as gone (FIFO); drops fully evicted episodes."""
        if first_stored <= self._first_stored[stream]:
            return
        self._first_stored[stream] = first_stored
        starts, ends = self._starts[stream], self._ends[stream]
        while ends and ends[0] <= first_stored:
            starts.popleft()
            ends.popleft()
        self._table = None

    def episodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(stream, first stored position, stored length)`` of every episode with stored rows."""
        streams, firsts, lengths = [], [], []
        for stream in range(self.num_streams):
            count = len(self._starts[stream])
            start = np.fromiter(self._starts[stream], np.int64, count)
            end = np.fromiter(self._ends[stream], np.int64, count)
            first = np.maximum(start, self._first_stored[stream])
            streams.append(np.full(count, stream, np.int64))
            firsts.append(first)
            lengths.append(end - first)
        return np.concatenate(streams), np.concatenate(firsts), np.concatenate(lengths)

    def num_rows(self) -> int:
        """Number of stored rows that belong to an episode."""
        return int(self.episodes()[2].sum())

    def _eligible(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._table is None:
            stream, first, length = self.episodes()
            keep = length >= self.seq_len
            self._table = (stream[keep], first[keep], length[keep])
        return self._table

    # ---- TorchRL sampler API ------------------------------------------------------------------------------
    def _sampleable_count(self, storage: Storage, batch_size: int) -> int:
        return len(self._eligible()[0])

    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        if batch_size % self.seq_len:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of seq_len ({self.seq_len}).")
        num_sequences = batch_size // self.seq_len
        stream, first, length = self._eligible()
        if not len(stream):
            _, _, stored = self.episodes()
            raise RuntimeError(
                f"Cannot sample sequences of seq_len={self.seq_len}: no episode has that many stored rows yet "
                f"({int(stored.sum())} rows in {len(stored)} episodes, longest {int(stored.max(initial=0))}). "
                "Collect more steps first."
            )
        episode = torch.randint(len(stream), (num_sequences,), generator=self._rng).numpy()
        num_windows = length[episode] - self.seq_len + 1
        high = num_windows + self.seq_len if self.prioritize_ends else num_windows
        # floor(u * high) is randint(0, high); the clamp folds the extra draws onto the last window.
        u = torch.rand(num_sequences, generator=self._rng, dtype=torch.float64).numpy()
        offset = np.minimum((u * high).astype(np.int64), num_windows - 1)
        positions = (first[episode] + offset)[:, None] + np.arange(self.seq_len)
        index = self.stream_capacity * stream[episode][:, None] + positions % self.stream_capacity
        return torch.as_tensor(index.reshape(-1)), {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "starts": [torch.tensor(list(s), dtype=torch.int64) for s in self._starts],
            "ends": [torch.tensor(list(e), dtype=torch.int64) for e in self._ends],
            "first_stored": torch.as_tensor(self._first_stored),
            "open": torch.as_tensor(self._open),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["starts"]) != self.num_streams:
            raise ValueError(f"Checkpoint has {len(state_dict['starts'])} streams, this sampler {self.num_streams}.")
        self._starts = [deque(s.tolist()) for s in state_dict["starts"]]
        self._ends = [deque(e.tolist()) for e in state_dict["ends"]]
        self._first_stored = state_dict["first_stored"].cpu().numpy().astype(np.int64)
        self._open = state_dict["open"].cpu().numpy().astype(bool)
        self._table = None

    def _empty(self) -> None:
        self._starts = [deque() for _ in range(self.num_streams)]
        self._ends = [deque() for _ in range(self.num_streams)]
        self._first_stored = np.zeros(self.num_streams, np.int64)
        self._open = np.zeros(self.num_streams, bool)
        self._table = None

    def dumps(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "prioritize_ends_sampler.pt")

    def loads(self, path: str | Path) -> None:
        state_dict = torch.load(Path(path) / "prioritize_ends_sampler.pt", weights_only=True, map_location="cpu")
        self.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seq_len={self.seq_len}, prioritize_ends={self.prioritize_ends}, "
            f"episodes={sum(len(s) for s in self._starts)})"
        )
