"""torchrl_dreamer: DreamerV2 (Hafner et al., ICLR 2021) as TorchRL modules, losses and training.

Importing the package changes nothing in the process (no environment variable, allocator option or thread count) and
does not import torch by itself: the subpackages load when first used. The CPU training settings that pay off for a
whole process (idle OpenMP threads that sleep, one allocator heap for every thread) are applied by the training
command and the benchmarks, or by a call of :func:`torchrl_dreamer.process.configure_process` before torch is
imported.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["modules", "objectives", "__version__"]

_SUBPACKAGES = ("config", "data", "envs", "modules", "objectives", "paper", "process", "record", "trainers")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"torchrl_dreamer.{name}")
    raise AttributeError(f"module 'torchrl_dreamer' has no attribute {name!r}")
