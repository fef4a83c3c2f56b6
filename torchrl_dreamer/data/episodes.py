"""The episode table of the DreamerV2 replay: where each episode's rows live in a FIFO storage.

Rows get absolute *positions* ``0, 1, 2, ...`` in write order (see :class:`~torchrl_dreamer.data.FifoWriter`).
When several environments or collector workers interleave, an episode's rows are not contiguous, so each episode
keeps its positions as runs ``[start, end)`` of consecutive positions (one run per write in the common case, one per
row when ``add`` interleaves envs step by step: 16 bytes a run)::

    positions   0  1  2  3  4  5  6  7  8  9      rows of episode A (env 0) and B (env 1), written [E, T]-batch
    episode     A  A  A  B  B  B  A  A  B  B      after batch: A = [0, 3) + [6, 8),  B = [3, 6) + [8, 10)

FIFO eviction (positions below ``end - capacity``) trims every episode from its oldest rows; an episode whose rows
are all gone is dropped (unless it is still open, so that its next rows continue it).
"""
from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import torch

__all__ = ["EpisodeTable"]


class _Episode:
    """Runs of one episode; ``first`` (its first stored position) lies in run ``head``."""

    __slots__ = ("key", "origin", "starts", "ends", "head", "first", "length")

    def __init__(self, key: int, origin: int) -> None:
        self.key = key
        self.origin = origin  # first position ever written: episodes are created in increasing origin order
        self.starts = array("q")
        self.ends = array("q")
        self.head = 0
        self.first = origin
        self.length = 0  # stored rows

    def append(self, first: int, num_rows: int) -> None:
        if self.length == 0:  # new, or every earlier row was evicted
            self.head, self.first = len(self.starts), first
        if len(self.ends) > self.head and self.ends[-1] == first:
            self.ends[-1] += num_rows
        else:
            self.starts.append(first)
            self.ends.append(first + num_rows)
        self.length += num_rows

    def trim(self, cutoff: int) -> None:
        while self.length and self.ends[self.head] <= cutoff:
            self.length -= self.ends[self.head] - self.first
            self.head += 1
            self.first = self.starts[self.head] if self.head < len(self.starts) else cutoff
        if self.length and self.first < cutoff:
            self.length -= cutoff - self.first
            self.first = cutoff
        if self.head > 32 and 2 * self.head > len(self.starts):  # drop dead runs now and then
            del self.starts[: self.head], self.ends[: self.head]
            self.head = 0

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored runs ``(starts, ends)``, the first clipped at ``first``."""
        if not self.length:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        starts = np.array(self.starts[self.head :], dtype=np.int64)
        starts[0] = self.first
        return starts, np.array(self.ends[self.head :], dtype=np.int64)


def _expand(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    lengths = ends - starts
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


class EpisodeTable:
    """Episodes of a FIFO row storage, each a list of runs of absolute positions, opened and closed by key.

    A *key* names the source of rows (a collector trajectory id, or a stream index): rows recorded under a key
    continue the key's open episode unless they start a new one; closing the episode frees the key, so a key seen
    again later always starts a new episode.

    Examples:
        >>> table = EpisodeTable()
        >>> table.append(7, first=0, num_rows=3, new_episode=True)   # trajectory 7: rows 0, 1, 2
        0
        >>> table.append(8, first=3, num_rows=2, new_episode=True)   # trajectory 8 interleaves: rows 3, 4
        1
        >>> table.append(7, first=5, num_rows=2, closes=True)        # 7 goes on and ends
        0
        >>> table.positions(0).tolist(), table.is_open(7), table.is_open(8)
        ([0, 1, 2, 5, 6], False, True)
        >>> table.evict(2)  # FIFO: positions 0 and 1 are gone
        >>> table.positions(0).tolist(), table.num_rows
        ([2, 5, 6], 5)
    """

    def __init__(self) -> None:
        self._episodes: dict[int, _Episode] = {}  # creation order = order of first positions
        self._open: dict[int, int] = {}  # key -> id of its open episode
        self._next_id = 0
        self._cutoff = 0  # positions below it are evicted
        self._num_rows = 0
        self._positions: dict[int, np.ndarray] = {}  # lazily expanded positions, per episode
        self._table: tuple[np.ndarray, np.ndarray] | None = None
        self.version = 0  # bumped on every change (lets samplers cache what they derive)

    # ---- writing ------------------------------------------------------------------------------------------
    def is_open(self, key: int) -> bool:
        """Whether ``key`` has an open episode (its next rows continue it)."""
        return key in self._open

    def append(self, key: int, *, first: int, num_rows: int, new_episode: bool = False, closes: bool = False) -> int:
        """Records rows at positions ``[first, first + num_rows)`` as the next rows of ``key``'s episode.

        Args:
            key (int): source of the rows.
            first (int): position of the first row (positions only increase).
            num_rows (int): number of rows.
            new_episode (bool, optional): start a new episode (closing ``key``'s open one). A key without an open
                episode always starts one. Defaults to ``False``.
            closes (bool, optional): the last row ends the episode. Defaults to ``False``.

        Returns:
            the episode id.
        """
        episode_id = self._open.get(key)
        if new_episode or episode_id is None:
            self.close(key)
            episode_id, self._next_id = self._next_id, self._next_id + 1
            self._episodes[episode_id] = _Episode(key, first)
            self._open[key] = episode_id
        self._episodes[episode_id].append(first, num_rows)
        self._num_rows += num_rows
        if closes:
            self.close(key)
        self._changed(episode_id)
        return episode_id

    def close(self, key: int) -> None:
        """Closes ``key``'s open episode, if any (its next rows start a new episode)."""
        episode_id = self._open.pop(key, None)
        if episode_id is not None and not self._episodes[episode_id].length:
            del self._episodes[episode_id]
            self._changed(episode_id)

    def close_all(self) -> None:
        """Closes every open episode (e.g. on restore: no row written later may continue one)."""
        for key in list(self._open):
            self.close(key)

    def open_keys(self) -> list[int]:
        """The keys with an open episode."""
        return list(self._open)

    def evict(self, cutoff: int) -> None:
        """Forgets positions below ``cutoff`` (FIFO): episodes lose their oldest rows, empty closed ones go."""
        if cutoff <= self._cutoff:
            return
        self._cutoff = cutoff
        for episode_id, episode in list(self._episodes.items()):
            if episode.origin >= cutoff:
                break  # later episodes start later still
            if episode.length and episode.first < cutoff:
                self._num_rows -= episode.length
                episode.trim(cutoff)
                self._num_rows += episode.length
                if not episode.length and self._open.get(episode.key) != episode_id:
                    del self._episodes[episode_id]
                self._changed(episode_id)

    def _changed(self, episode_id: int) -> None:
        self._positions.pop(episode_id, None)
        self._table = None
        self.version += 1

    # ---- reading ------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Stored rows over all episodes."""
        return self._num_rows

    @property
    def num_episodes(self) -> int:
        """Episodes (complete or ongoing) with at least one stored row."""
        return len(self.lengths()[0])

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids and stored lengths of the episodes with stored rows, oldest first (int64 arrays)."""
        if self._table is None:
            ids = [i for i, e in self._episodes.items() if e.length]
            self._table = (
                np.array(ids, dtype=np.int64),
                np.array([self._episodes[i].length for i in ids], dtype=np.int64),
            )
        return self._table

    def key(self, episode_id: int) -> int:
        """The key (trajectory id) an episode was recorded under."""
        return self._episodes[episode_id].key

    def is_closed(self, episode_id: int) -> bool:
        """Whether an episode is closed (no later row can continue it)."""
        return self._open.get(self._episodes[episode_id].key) != episode_id

    def positions(self, episode_id: int) -> np.ndarray:
        """The stored positions of an episode, in order (int64; cached until the episode changes)."""
        found = self._positions.get(episode_id)
        if found is None:
            found = self._positions[episode_id] = _expand(*self._episodes[episode_id].runs())
        return found

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The table as tensors: stored runs per episode, open keys, counters."""
        ids = list(self._episodes)
        runs = [self._episodes[i].runs() for i in ids]
        return {
            "ids": torch.tensor(ids, dtype=torch.int64),
            "keys": torch.tensor([self._episodes[i].key for i in ids], dtype=torch.int64),
            "origins": torch.tensor([self._episodes[i].origin for i in ids], dtype=torch.int64),
            "num_runs": torch.tensor([len(s) for s, _ in runs], dtype=torch.int64),
            "starts": torch.from_numpy(np.concatenate([s for s, _ in runs] + [np.zeros(0, np.int64)])),
            "ends": torch.from_numpy(np.concatenate([e for _, e in runs] + [np.zeros(0, np.int64)])),
            "open_keys": torch.tensor(list(self._open), dtype=torch.int64),
            "open_ids": torch.tensor(list(self._open.values()), dtype=torch.int64),
            "next_id": self._next_id,
            "cutoff": self._cutoff,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = self.version
        self.__init__()
        self.version = version + 1
        starts, ends = state_dict["starts"].tolist(), state_dict["ends"].tolist()
        offset = 0
        for episode_id, key, origin, num_runs in zip(
            *(state_dict[name].tolist() for name in ("ids", "keys", "origins", "num_runs"))
        ):
            episode = self._episodes[episode_id] = _Episode(key, origin)
            for start, end in zip(starts[offset : offset + num_runs], ends[offset : offset + num_runs]):
                episode.append(start, end - start)
            offset += num_runs
            self._num_rows += episode.length
        self._open = dict(zip(state_dict["open_keys"].tolist(), state_dict["open_ids"].tolist()))
        self._next_id = int(state_dict["next_id"])
        self._cutoff = int(state_dict["cutoff"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(episodes={self.num_episodes}, open={len(self._open)}, rows={self.num_rows})"
