"""The learner's CPU thread count: the cores this process may use, and the ``--threads`` value."""
from __future__ import annotations

import argparse
import os

__all__ = ["available_cores", "parse_threads"]


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
