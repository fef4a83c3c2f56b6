"""The learner's CPU allocator: the memory one update frees is kept for the next.

An update at the Atari preset allocates and frees about 1.3 GiB of activations, most of them in blocks larger than
glibc's largest mmap threshold (32 MiB): glibc maps each such block fresh from the kernel and unmaps it when it is
freed, so every update faults the same memory in again, page by page, zeroed by the kernel. On 2 cores that is
2.8 million page faults and 0.5-1 s of kernel time per update (``benchmarks/update_speed.py``: 5.0-5.1 s per update
with the default, 4.1-4.2 s with the memory kept). TorchRL and PyTorch keep no cache of CPU memory (PyTorch's
caching allocator is for CUDA), so this is set here, in glibc: no mmap for large blocks (they come from the heap and
are reused) and no trimming of the heap's free top. Threads other than the main one would each get an arena of
their own, whose heaps glibc still maps and gives back whole (a sharded update, ``torchrl_dreamer.modules.ShardPool``,
faulted 230,000-255,000 pages in per world-model pass with its 2 workers, 0.5-0.7 s of kernel time): every thread
allocates from the one main heap (``M_ARENA_MAX = 1``; torch allocates few, large blocks, so the arena's lock is
not contended). A thread keeps the arena it first allocated from, and once the limit is reached a new thread may
be given any existing one, so the training command sets this limit first thing, before torch starts its threads
(:func:`torchrl_dreamer.process.configure_process`; in a trainer built after the models, the workers otherwise
faulted 140,000-165,000 pages in per update). Importing the package sets nothing.

The process then holds its largest update's memory between updates instead of returning it: resident memory rises
to the peak in the first updates and stays flat there (``benchmarks/memory_soak.py``); the peak itself is the same.
"""
from __future__ import annotations

from torchrl_dreamer._glibc import INT_MAX, M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, mallopt

__all__ = ["keep_freed_memory"]


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel (this process, from now on).

    Large allocations come from the heap instead of fresh mappings (``M_MMAP_MAX = 0``), the heap's free top is
    never trimmed (``M_TRIM_THRESHOLD`` at its largest) and every thread allocates from that heap
    (``M_ARENA_MAX = 1``: it holds for threads that allocate after it; the training command sets it before any,
    :func:`torchrl_dreamer.process.configure_process`). Building a
    :class:`~torchrl_dreamer.trainers.DreamerV2Trainer` calls it. Memory already mapped is unaffected; a later
    ``malloc_trim(0)`` still returns free memory.

    Returns: ``True`` when glibc took the settings, ``False`` where there is no glibc (macOS, Windows, musl), where
    nothing changes.

    Examples:
        >>> keep_freed_memory() in (True, False)
        True
    """
    return mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, INT_MAX), (M_ARENA_MAX, 1))
