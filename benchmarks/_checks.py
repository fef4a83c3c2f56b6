"""Argument checks shared by the benchmarks that run updates (``update_speed.py``, ``train_throughput.py``)."""
from __future__ import annotations

import argparse

import torch


def check_device_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors (``parser.error``) for ``--device``, ``--cudagraph``, ``--compile`` and ``--threads``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.cudagraph and args.device != "cuda":
        parser.error("--cudagraph needs --device cuda")
    if args.threads == "auto" and args.compile and args.device == "cpu":
        parser.error("--threads auto cannot change the thread count of compiled CPU kernels: set --threads N")
