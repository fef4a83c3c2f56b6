"""The learner's CPU thread count, picked from measured update times (:class:`AdaptiveThreads`)."""
from __future__ import annotations

import argparse
import math
import operator
import os
import statistics
import time
from collections import deque
from typing import Any, Sequence

import torch
from torchrl.trainers.trainers import Trainer, TrainerHookBase

__all__ = ["AdaptiveThreads", "available_cores", "parse_threads"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_threads(text: str) -> int | str:
    """A ``--threads`` value: ``"auto"`` or an int >= 1 (an ``argparse`` type).

    Examples:
        >>> parse_threads("auto"), parse_threads("2")
        ('auto', 2)
    """
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return int(text)


def _is_count(value: Any, minimum: int = 1) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= minimum
    except TypeError:
        return False


class AdaptiveThreads(TrainerHookBase):
    """Sets torch's CPU thread count before each update: one thread per core, or one more when that is faster.

    Why a fixed count does not hold: MKL, oneDNN and ATen split each parallel region into equal, static shares, one
    per OpenMP thread. When another process (env workers, a collector, another job) takes a core, the thread that
    shares it finishes its share last and every region waits for it. At the Atari preset on 2 cores with one core
    busy, 2 threads do about what 1 thread does (7.5 s against 7.3 s per update); with 3 threads the shares are
    thirds, the OS gives each runnable thread an equal slice, and the update takes 6.7 s. On an idle machine that
    third thread costs 20-28%. No count suits both, and the load changes during a run, so this measures.

    Policy: updates run with :attr:`current` (the first of ``counts``). After ``warmup`` updates (the allocator's
    heap is still growing) and once ``history`` updates with the current count are timed, every :attr:`interval`
    updates ``probe_updates`` updates run with the other count: a probe. A probe whose mean is at least ``margin``
    faster than the median of the current count's recent updates makes the other count current. A probe that loses
    doubles the interval, up to ``max_interval``; one update more than twice as slow ends the probe at once and
    stops the probes until the load changes. A win, or the current count's times moving by more than ``drift`` for
    two updates in a row (the load changed), brings the interval back to ``min_interval``. On an idle machine the
    probes cost about half an update in ``max_interval``.

    The thread count changes the order of some floating-point sums (oneDNN splits the weight gradients' batch
    over the threads), so under this policy a seeded run no longer repeats bit for bit; a fixed count does. That is
    why ``make_dreamerv2_trainer`` uses it only with ``threads="auto"``.

    Use it as a trainer hook (:meth:`register`: it sets the count when the update's batch is sampled and times it
    until ``post_optim``) or around any update (``with threads: stepper.step(None, batch)``). :meth:`restore` puts
    back the count torch had before the first update.

    Args:
        counts (pair of int, optional): the two thread counts. Default: ``(n, n + 1)`` with ``n`` the smaller of
            torch's thread count and :func:`available_cores`.

    Keyword Args:
        warmup (int): first updates not timed. Default: ``2``.
        history (int): updates of the current count compared with a probe. Default: ``3``.
        min_interval (int): updates between probes after a change. Default: ``8``.
        max_interval (int): the longest interval. Default: ``160``.
        margin (float): how much faster a probe must be. Default: ``0.03``.
        drift (float): the relative change of the current count's times that triggers a probe. Default: ``0.15``.
        probe_updates (int): updates in a probe (a single update under a shared core is noisy). Default: ``2``.

    Examples:
        >>> threads = AdaptiveThreads((1, 2), warmup=0, history=1, min_interval=1, probe_updates=1)
        >>> for _ in range(3):
        ...     with threads:
        ...         pass  # an update
        >>> threads.current in (1, 2), threads.probes >= 1
        (True, True)
        >>> threads.restore()
    """

    def __init__(
        self,
        counts: Sequence[int] | None = None,
        *,
        warmup: int = 2,
        history: int = 3,
        min_interval: int = 8,
        max_interval: int = 160,
        margin: float = 0.03,
        drift: float = 0.15,
        probe_updates: int = 2,
    ) -> None:
        if counts is None:
            base = min(torch.get_num_threads(), available_cores())
            counts = (base, base + 1)
        counts = tuple(counts)
        if len(counts) != 2 or not all(_is_count(c) for c in counts) or len({int(c) for c in counts}) != 2:
            raise ValueError(f"AdaptiveThreads needs two different thread counts >= 1, got {counts}.")
        counts = tuple(int(c) for c in counts)
        if not all(_is_count(n, minimum=0) for n in (warmup, history, probe_updates, min_interval, max_interval)):
            raise ValueError("AdaptiveThreads: warmup, history, probe_updates, min_interval and max_interval must be ints.")
        if warmup < 0 or history < 1 or probe_updates < 1 or not 1 <= min_interval <= max_interval:
            raise ValueError(
                f"AdaptiveThreads: need warmup >= 0, history >= 1, probe_updates >= 1 and 1 <= min_interval <= "
                f"max_interval, got warmup={warmup}, history={history}, probe_updates={probe_updates}, "
                f"min_interval={min_interval}, max_interval={max_interval}."
            )
        if not 0 <= margin < 1 or not (math.isfinite(drift) and drift > 0):
            raise ValueError(f"AdaptiveThreads: need 0 <= margin < 1 and drift > 0, got margin={margin}, drift={drift}.")
        self.counts = counts
        self.current = counts[0]
        self.warmup, self.min_interval, self.max_interval = warmup, min_interval, max_interval
        self.margin, self.drift, self.probe_updates = margin, drift, probe_updates
        self.interval: float = min_interval
        self.probes = 0
        self.switches = 0
        self._times = {count: deque(maxlen=history) for count in counts}
        self._seen = 0
        self._since_probe = 0
        self._drifting = 0
        self._running: tuple[int, float, bool] | None = None
        self._probe_times: list[float] = []
        self._before: int | None = None

    @property
    def other(self) -> int:
        """The count that is not current."""
        return self.counts[1] if self.current == self.counts[0] else self.counts[0]

    def begin(self, batch: Any = None) -> Any:
        """Sets the count for the next update and starts its clock; returns ``batch`` (a ``process_optim_batch`` op)."""
        times = self._times[self.current]
        probe = bool(self._probe_times) or (
            self._seen >= self.warmup and len(times) == times.maxlen and self._since_probe >= self.interval
        )
        count = self.other if probe else self.current
        if self._before is None:
            self._before = torch.get_num_threads()
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        self._running = (count, time.perf_counter(), probe)
        return batch

    def end(self) -> None:
        """Stops the update's clock and updates the choice (a ``post_optim`` op)."""
        if self._running is None:
            return
        count, start, probe = self._running
        self._running = None
        elapsed = time.perf_counter() - start
        self._seen += 1
        if self._seen <= self.warmup:
            return
        times = self._times[self.current]
        if probe:
            self._probe_times.append(elapsed)
            reference = statistics.median(times)
            cliff = reference > 0 and elapsed > 2 * reference
            if len(self._probe_times) < self.probe_updates and not cliff:
                return
            self.probes += 1
            self._since_probe = 0
            probe_times, self._probe_times = self._probe_times, []
            if statistics.fmean(probe_times) < reference * (1 - self.margin):
                self.current = count
                self.switches += 1
                times.clear()  # the old count's times are from another load
                self._times[count].clear()
                self._times[count].extend(probe_times)
                self.interval = self.min_interval
            elif cliff:  # far slower (e.g. oversubscribed spin barriers): no more probes until the load changes
                self.interval = math.inf
            else:
                self.interval = min(2 * self.interval, self.max_interval)
            # between updates (collection, evaluation) the process runs with the chosen count
            torch.set_num_threads(self.current)
            return
        self._since_probe += 1
        median = statistics.median(times) if len(times) == times.maxlen else 0.0
        if median > 0 and abs(elapsed / median - 1) > self.drift:
            self._drifting += 1
            if self._drifting >= 2:  # the load changed: time the current count afresh, then probe soon
                self._drifting = 0
                times.clear()
                self.interval = self.min_interval
        else:
            self._drifting = 0
        times.append(elapsed)

    def __enter__(self) -> "AdaptiveThreads":
        self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end()
        else:
            self._running = None  # a failed update is not timed

    def restore(self) -> None:
        """Puts back torch's thread count from before the first update."""
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None

    def state_dict(self) -> dict[str, Any]:
        """Nothing is saved: a resumed run measures its own machine's load afresh."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def register(self, trainer: Trainer, name: str = "adaptive_threads") -> None:
        """Sets the count when each update's batch is sampled (``process_optim_batch``), times until ``post_optim``."""
        trainer.register_op("process_optim_batch", self.begin)
        trainer.register_op("post_optim", self.end)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(counts={self.counts}, current={self.current}, interval={self.interval}, "
                f"probes={self.probes}, switches={self.switches})")
