"""The learner's CPU threads: the cores this process may use, the ``--threads`` value and the update's shards."""
from __future__ import annotations

import argparse
import os

import torch

__all__ = ["available_cores", "default_shards", "parse_threads"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_threads(text: str) -> int:
    """A ``--threads`` value: an int >= 1 (an ``argparse`` type).

    Examples:
        >>> parse_threads("2")
        2
    """
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def default_shards(device: torch.device | str, compile: bool) -> int:
    """The shards of an update (:class:`~torchrl_dreamer.modules.ShardPool`): one per torch thread for an eager CPU
    update; compiled kernels and CUDA run it as one pass.

    Examples:
        >>> default_shards("cuda", compile=False), default_shards("cpu", compile=True)
        (1, 1)
    """
    return torch.get_num_threads() if torch.device(device).type == "cpu" and not compile else 1
