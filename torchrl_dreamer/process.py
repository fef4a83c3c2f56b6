"""Process-wide settings for training on the CPU, applied only when asked (importing the package changes nothing).

Two settings make a DreamerV2 learner faster on the CPU, and both belong to the whole process, so the library never
applies them on its own: the training command (``examples/dreamerv2_atari.py``) and the benchmarks call
:func:`configure_process` first thing, and :class:`~torchrl_dreamer.trainers.DreamerV2Trainer` applies the allocator
part when it is built.

* **Idle OpenMP threads sleep instead of spinning** (``OMP_WAIT_POLICY=PASSIVE``). In training the env workers and the
  collector share the cores with the learner, and spinning threads fight them for the cores (one update at the Atari
  preset, 2 threads, one core busy: 11.1 s spinning, 7.8 s passive; idle: 4.4 s both). OpenMP reads the variable once,
  when torch loads it: it must be set before ``import torch``. This module does not import torch.
* **Every thread allocates from glibc's main heap** (``M_ARENA_MAX = 1``, where the C library is glibc). A thread
  keeps the arena it first allocated from; the update's worker threads (:class:`~torchrl_dreamer.modules.ShardPool`)
  would otherwise be given arenas that return their memory to the system and fault it in again every update (see
  :func:`~torchrl_dreamer.trainers.keep_freed_memory`, which the trainer calls; set before any other thread
  allocates, it also holds for threads started earlier, such as torch's).

Examples:
    >>> from torchrl_dreamer.process import configure_process
    >>> sorted(configure_process(passive_openmp=False, single_heap=False))
    ['passive_openmp', 'single_heap']
"""
from __future__ import annotations

import os
import sys

from torchrl_dreamer._glibc import M_ARENA_MAX, mallopt

__all__ = ["configure_process", "openmp_waits_passively"]


def openmp_waits_passively() -> bool:
    """Whether this process's OpenMP threads sleep when idle (``OMP_WAIT_POLICY=PASSIVE`` was set before torch
    loaded OpenMP, or torch is not loaded yet and the variable is set)."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def configure_process(*, passive_openmp: bool = True, single_heap: bool = True) -> dict[str, bool]:
    """Applies the CPU training settings of the module docstring to this process, as far as it still can.

    Keyword Args:
        passive_openmp (bool): set ``OMP_WAIT_POLICY=PASSIVE`` (only before torch is imported, and only when the
            variable is unset: a user's own value is kept). Default: ``True``.
        single_heap (bool): every thread allocates from glibc's main heap (``M_ARENA_MAX = 1``; nothing where the C
            library is not glibc). Default: ``True``.

    Returns: ``{"passive_openmp": ..., "single_heap": ...}``, each True where the setting now holds.
    """
    applied = {"passive_openmp": openmp_waits_passively(), "single_heap": False}
    if passive_openmp and "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        applied["passive_openmp"] = True
    if single_heap:
        applied["single_heap"] = mallopt((M_ARENA_MAX, 1))
    return applied
