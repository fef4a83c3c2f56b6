"""DreamerV2's sequence sampler: one episode uniformly, then a start that favours the episode end.

The DreamerV2 reference (``common/replay.py``, ``prioritize_ends=True``) draws a window of ``seq_len`` consecutive
steps from an episode of ``L`` stored steps as::

    start = min(randint(0, L - seq_len + 1 + seq_len), L - seq_len)     # numpy: exclusive upper bound

so every start ``k < L - seq_len`` has probability ``1 / (L + 1)`` and the last one, the window that ends on the
episode's final observation, has probability ``(seq_len + 1) / (L + 1)``. Without ``prioritize_ends`` the start is
uniform over the ``L - seq_len + 1`` windows.

Episodes shorter than ``seq_len``: the reference never samples them (``strict_length=True``, right for Atari, whose
episodes are thousands of steps). With ``strict_length=False`` they are sampled too, as DreamerV3 and TorchRL's
``SliceSampler(strict_length=False)`` allow sequences across episode boundaries, but without padding: the window
takes the episode's rows from its first stored row and goes on at the first stored row of another uniformly drawn
episode (possibly the same one), and so on, until ``seq_len`` rows::

    episode rows      a0 a1 a2 | b0 b1 b2 b3 b4 | a0 a1 ...       (seq_len rows in all)
    is_init            .  .  . |  T  .  .  .  . |  T  .             (marked by the sampler; a0 keeps its own)

``is_init`` is True on the first row of every joined segment after the first, so the world model resets its state
and previous action there and no latent state flows from one episode into the next.

A window's first row is not marked: the world model starts every sequence from the zero state anyway, and the row
keeps the ``is_init`` it was stored with, which says whether the episode starts there. The losses read it to know
whether the reward entering that row is known: zero at an episode's first observation; otherwise it lies in the
row before the window, which was not sampled, and the reward target is masked there instead of being taken as a
(false) zero.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import NestedKey
from torchrl.data.replay_buffers import SliceSampler
from torchrl.data.replay_buffers.storages import Storage

from torchrl_dreamer.data.episodes import EpisodeTable

__all__ = ["PrioritizeEndsSampler"]


class PrioritizeEndsSampler(SliceSampler):
    """Samples ``seq_len``-row windows of episodes kept in an :class:`~torchrl_dreamer.data.EpisodeTable`.

    A :class:`~torchrl.data.replay_buffers.SliceSampler` whose trajectories are not read from the storage but kept
    in :attr:`episodes` by the replay buffer that writes the rows (the rows of one trajectory need not be contiguous
    in storage). As with ``SliceSampler``, ``sample(storage, batch_size)`` takes ``batch_size`` in rows, a multiple
    of ``slice_len = seq_len``, and returns the flat storage slots of ``batch_size // seq_len`` windows, window
    after window, with ``info["is_init"]`` (bool, ``[batch_size, 1]``) True at the first row of each joined episode
    after a window's first segment (not at the window's first row: see the module docstring).

    Args:
        seq_len (int): rows per sampled sequence (``slice_len``).
        traj_key (NestedKey, optional): key of the collector's trajectory ids, read by the replay buffer.
            Defaults to ``("collector", "traj_ids")``.
        strict_length (bool, optional): sample only episodes with at least ``seq_len`` stored rows (the reference);
            ``False`` also samples shorter ones, joined to other episodes (see the module docstring).
            Defaults to ``True``.
        prioritize_ends (bool, optional): use the reference's end-favouring start distribution; ``False`` draws
            the start uniformly. Defaults to ``True``.
        episodes_by_length (bool, optional): draw each episode with a probability proportional to its stored rows
            (every step equally likely, as TorchRL's ``SliceSampler`` and sheeprl's sequential buffer) instead of
            uniformly (the reference: each episode equally likely, whatever its length). Where episode lengths
            differ by orders of magnitude (CartPole: ~20-step random episodes, later 500-step ones) the reference's
            rule keeps training mostly on the short early episodes. Defaults to ``False``.

    Reference: Hafner et al., "Mastering Atari with Discrete World Models" (ICLR 2021), ``common/replay.py``.

    Examples:
        >>> from torchrl.data import LazyTensorStorage
        >>> sampler = PrioritizeEndsSampler(seq_len=3, strict_length=False)
        >>> sampler._rng = torch.Generator().manual_seed(0)
        >>> _ = sampler.episodes.append(0, first=0, num_rows=5, closes=True)   # an episode at positions 0..4
        >>> _ = sampler.episodes.append(1, first=5, num_rows=2, closes=True)   # a short one at 5, 6
        >>> index, info = sampler.sample(LazyTensorStorage(100), 6)  # two windows of 3 rows
        >>> index.shape, info["is_init"].shape
        (torch.Size([6]), torch.Size([6, 1]))
    """

    def __init__(
        self,
        *,
        seq_len: int,
        traj_key: NestedKey = ("collector", "traj_ids"),
        strict_length: bool = True,
        prioritize_ends: bool = True,
        episodes_by_length: bool = False,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
        super().__init__(slice_len=seq_len, traj_key=traj_key, strict_length=strict_length)
        self.seq_len = seq_len
        self.prioritize_ends = prioritize_ends
        self.episodes_by_length = episodes_by_length
        self.episodes = EpisodeTable()
        self._eligible_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _eligible(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids and stored lengths of the episodes that may be drawn."""
        version = self.episodes.version
        if self._eligible_cache is None or self._eligible_cache[0] != version:
            ids, lengths = self.episodes.lengths()
            keep = lengths >= (self.seq_len if self.strict_length else 1)
            self._eligible_cache = (version, ids[keep], lengths[keep])
        return self._eligible_cache[1:]

    # ---- TorchRL sampler API ------------------------------------------------------------------------------
    def _sampleable_count(self, storage: Storage, batch_size: int) -> int:
        return len(self._eligible()[0])

    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        seq_len, num_sequences = self._adjusted_batch_size(batch_size)
        ids, lengths = self._eligible()
        if not len(ids):
            _, stored = self.episodes.lengths()
            raise RuntimeError(
                f"Cannot sample sequences of seq_len={seq_len}: no episode has that many stored rows yet "
                f"({int(stored.sum())} rows in {len(stored)} episodes, longest {int(stored.max(initial=0))}). "
                "Collect more steps first."
            )
        episode = self._draw_episodes(lengths, num_sequences)
        u = torch.rand(num_sequences, generator=self._rng, dtype=torch.float64).numpy()
        positions = np.empty((num_sequences, seq_len), np.int64)
        is_init = np.zeros((num_sequences, seq_len), bool)
        for i, (chosen, length) in enumerate(zip(ids[episode], lengths[episode])):
            rows = self.episodes.positions(int(chosen))
            if length >= seq_len:
                num_windows = length - seq_len + 1
                high = num_windows + seq_len if self.prioritize_ends else num_windows
                # floor(u * high) is randint(0, high); the min folds the extra draws onto the last window.
                start = min(int(u[i] * high), num_windows - 1)
                positions[i] = rows[start : start + seq_len]
            else:
                self._join(rows, positions[i], is_init[i], ids, lengths)
        index = torch.from_numpy(positions % storage.max_size).reshape(-1)
        return index, {"is_init": torch.from_numpy(is_init).reshape(-1, 1)}

    def _draw_episodes(self, lengths: np.ndarray, num: int) -> np.ndarray:
        """``num`` indices into the eligible episodes: uniform (the reference), or in proportion to ``lengths``
        (``episodes_by_length``)."""
        if self.episodes_by_length:
            weights = torch.from_numpy(lengths).double()
            return torch.multinomial(weights, num, replacement=True, generator=self._rng).numpy()
        return torch.randint(len(lengths), (num,), generator=self._rng).numpy()

    def _join(self, rows: np.ndarray, positions: np.ndarray, is_init: np.ndarray, ids: np.ndarray,
              lengths: np.ndarray) -> None:
        """Fills one window with whole episodes from their first stored row, drawing the next ones as the first
        (:meth:`_draw_episodes`); marks ``is_init`` where each episode after the first begins."""
        filled = 0
        while True:
            take = min(len(rows), len(positions) - filled)
            positions[filled : filled + take] = rows[:take]
            is_init[filled] = filled > 0
            filled += take
            if filled == len(positions):
                return
            chosen = int(self._draw_episodes(lengths, 1)[0])
            rows = self.episodes.positions(int(ids[chosen]))

    def extend(self, index: torch.Tensor) -> None:
        """No-op: the replay buffer records rows in :attr:`episodes` with their trajectories."""

    def add(self, index: int) -> None:
        """No-op: the replay buffer records rows in :attr:`episodes` with their trajectories."""

    def _empty(self) -> None:
        self.episodes = EpisodeTable()
        self._eligible_cache = None

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.episodes.load_state_dict(state_dict["episodes"])
        self._eligible_cache = None

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
            f"strict_length={self.strict_length}, episodes_by_length={self.episodes_by_length}, "
            f"traj_key={self.traj_key}, episodes={self.episodes.num_episodes})"
        )
