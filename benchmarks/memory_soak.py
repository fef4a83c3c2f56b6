"""Memory soak: resident memory of the real DreamerV2 training loop over a long run.

Builds the trainer exactly as ``examples/dreamerv2_atari.py`` does (``make_dreamerv2_trainer(config, logdir,
device="cpu", progress=False)`` then ``trainer.train()``) and samples the process's memory from
``/proc/self/status`` while it runs:

* ``RssAnon``  anonymous memory: Python objects, tensors (model, optimiser state, activations, batches), the
  allocator's retained free blocks. This is the memory that would be lost if it grew.
* ``RssFile``  file-backed pages mapped into the process: shared libraries (torch, MKL, ...) and the replay's
  memory-mapped storage files (``replay/storage``), reported separately as ``replay`` (from ``/proc/self/smaps``).
  These are page-cache pages: the kernel can write them back and drop them under memory pressure.
* ``RssShmem`` shared memory (ParallelEnv's shared buffers).
* ``children`` the summed RSS of child processes (ParallelEnv workers with ``--num-envs > 1``).

A table row is printed every ``--report-every`` agent steps (from a ``post_steps`` trainer hook), a background
thread samples every ``--interval`` seconds to catch the peaks inside updates, and the last line is JSON with the
start / end / peak figures and the growth per 1k agent steps after warm-up (least-squares slope of the table
rows past ``--warmup`` of the run).

    python benchmarks/memory_soak.py                                   # Pong, debug-sized nets, 20k steps
    python benchmarks/memory_soak.py --steps 40000 --replay-capacity 100000
    python benchmarks/memory_soak.py --preset atari --steps 1400 --prefill 1000   # the paper's model: update cost
    python benchmarks/memory_soak.py --num-envs 2                      # ParallelEnv workers (children RSS)
    python benchmarks/memory_soak.py --set batch_length=50 --set batch_size=16   # any config field

See ``benchmarks/README.md`` ("Memory soak") for figures and where the memory goes.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

from torchrl_dreamer.process import configure_process

configure_process()  # before torch, as the training command: idle OpenMP threads sleep, one allocator heap
import torch

from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.trainers import make_dreamerv2_trainer

MB = 1024 * 1024


# ---- /proc readers ------------------------------------------------------------------------------------------------
def _status(pid: int | str = "self") -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` in bytes (RssAnon, RssFile, RssShmem, VmRSS, VmHWM...)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[name] = int(parts[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def children_rss(pid: int | None = None) -> tuple[int, int]:
    """(number of descendant processes, their summed VmRSS in bytes)."""
    pid = os.getpid() if pid is None else pid
    todo, count, total = _children(pid), 0, 0
    while todo:
        child = todo.pop()
        count += 1
        total += _status(child).get("VmRSS", 0)
        todo += _children(child)
    return count, total


def mapped_rss(path_prefix: str) -> int:
    """Resident bytes of the mappings of files under ``path_prefix`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping header
                fields = line.split()
                inside = len(fields) >= 6 and fields[5].startswith(path_prefix)
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def disk_usage(path: Path) -> int:
    """Allocated bytes (not apparent size: the memmap files are sparse) of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Peaks(threading.Thread):
    """Samples the memory every ``interval`` seconds; keeps the maxima (total = own RSS + children)."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "total": 0}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        status = _status()
        total = status.get("VmRSS", 0) + children_rss()[1]
        for key in ("RssAnon", "RssFile", "VmRSS"):
            self.peak[key] = max(self.peak[key], status.get(key, 0))
        self.peak["total"] = max(self.peak["total"], total)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


# ---- the soak -----------------------------------------------------------------------------------------------------
def _parse_value(name: str, text: str):
    kind = typing.get_type_hints(DreamerV2Config)[name]
    if kind is bool:
        return text.lower() in ("1", "true", "yes", "on")
    if kind is int:
        return int(float(text))
    if kind is float:
        return float(text)
    return text


def build_config(args: argparse.Namespace) -> DreamerV2Config:
    overrides = dict(
        env=args.env,
        total_steps=args.steps,
        prefill=args.prefill,
        replay_capacity=args.replay_capacity,
        num_envs=args.num_envs,
        # nothing periodic but the training itself (evaluation of Pong episodes would dominate the run)
        eval_every=10**12,
        video_every=10**12,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )
    if args.num_envs > 1:
        base = PRESETS[args.preset].get("train_every", DreamerV2Config.train_every)
        overrides["train_every"] = max(args.num_envs, base - base % args.num_envs)
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = _parse_value(name, value)
    return DreamerV2Config.preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="atari:Pong", help="a make_env name (default: atari:Pong)")
    parser.add_argument("--preset", default="debug", choices=sorted(PRESETS),
                        help="hyperparameters; 'debug' = tiny networks, runs on a CPU in minutes (default)")
    parser.add_argument("--steps", type=int, default=20_000, help="agent steps in all (total_steps)")
    parser.add_argument("--replay-capacity", type=int, default=10_000, help="replay rows")
    parser.add_argument("--prefill", type=int, default=2_000, help="random-policy agent steps before training")
    parser.add_argument("--num-envs", type=int, default=1, help="envs (>1: ParallelEnv worker processes)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other DreamerV2Config field, e.g. --set batch_length=50 (repeatable)")
    parser.add_argument("--checkpoint-every", type=int, default=10**12, help="agent steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=1_000)
    parser.add_argument("--report-every", type=int, default=1_000, help="agent steps between table rows")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between peak samples")
    parser.add_argument("--warmup", type=float, default=0.25,
                        help="fraction of the steps (after the prefill) excluded from the growth fit")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--malloc-trim", action="store_true",
                        help="call glibc malloc_trim(0) after every optimisation loop: returns the memory the "
                             "trainer's allocator keeps for the next update (shows how much of RssAnon it is)")
    parser.add_argument("--logdir", default=None, help="run directory (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start_status = _status()  # after imports
    config = build_config(args)
    logdir = Path(args.logdir) if args.logdir else Path(tempfile.mkdtemp(prefix="memory_soak-")) / "run"
    replay_dir = str((logdir / "replay").absolute())
    t0 = time.perf_counter()
    peaks = Peaks(args.interval)
    peaks.start()
    trainer = make_dreamerv2_trainer(config, logdir, device="cpu", progress=False)
    built_status = _status()

    if args.malloc_trim:
        libc = ctypes.CDLL("libc.so.6")
        trainer.register_op("post_optim", lambda: libc.malloc_trim(0))

    rows: list[dict] = []

    def row() -> dict:
        status = _status()
        n_children, child_rss = children_rss()
        entry = {
            "steps": trainer.steps, "updates": trainer.updates, "seconds": round(time.perf_counter() - t0, 1),
            "RssAnon": status.get("RssAnon", 0), "RssFile": status.get("RssFile", 0),
            "RssShmem": status.get("RssShmem", 0), "replay": mapped_rss(replay_dir),
            "children": child_rss, "VmRSS": status.get("VmRSS", 0),
            "total": status.get("VmRSS", 0) + child_rss, "replay_disk": disk_usage(logdir / "replay"),
            "replay_rows": len(trainer.replay_buffer),
        }
        print(f"{entry['steps']:>8} {entry['updates']:>7} {entry['seconds']:>7.0f} "
              f"{entry['RssAnon'] / MB:>8.0f} {entry['RssFile'] / MB:>8.0f} {entry['replay'] / MB:>7.0f} "
              f"{entry['RssShmem'] / MB:>7.0f} {entry['children'] / MB:>8.0f} {entry['total'] / MB:>8.0f} "
              f"{entry['replay_disk'] / MB:>8.0f} {entry['replay_rows']:>8}", flush=True)
        return entry

    print(f"# {config.env} preset={args.preset} steps={config.total_steps} prefill={config.prefill} "
          f"replay_capacity={config.replay_capacity} num_envs={config.num_envs} batch={config.batch_size}x"
          f"{config.batch_length} train_every={config.train_every} threads={torch.get_num_threads()}"
          f"{' malloc_trim' if args.malloc_trim else ''}")
    print(f"# RSS after imports {start_status.get('VmRSS', 0) / MB:.0f} MB "
          f"(anon {start_status.get('RssAnon', 0) / MB:.0f}, file {start_status.get('RssFile', 0) / MB:.0f}); "
          f"after building the trainer {built_status.get('VmRSS', 0) / MB:.0f} MB "
          f"(anon {built_status.get('RssAnon', 0) / MB:.0f}, file {built_status.get('RssFile', 0) / MB:.0f}). "
          "Columns in MiB; 'replay' = resident pages of the replay memmap (part of RssFile), "
          "'disk' = its allocated bytes")
    print(f"{'steps':>8} {'updates':>7} {'seconds':>7} {'RssAnon':>8} {'RssFile':>8} {'replay':>7} "
          f"{'RssShmem':>7} {'children':>8} {'total':>8} {'disk':>8} {'rows':>8}", flush=True)
    rows.append(row())
    next_report = [args.report_every]

    def report() -> None:
        if trainer.steps >= next_report[0]:
            while next_report[0] <= trainer.steps:
                next_report[0] += args.report_every
            rows.append(row())

    trainer.register_op("post_steps", report)
    result = trainer.train()
    gc.collect()
    if rows[-1]["steps"] != trainer.steps:
        rows.append(row())
    peaks.stop()
    elapsed = time.perf_counter() - t0

    # growth after warm-up: least-squares slope of the table rows past the prefill + warm-up fraction
    first = config.prefill + args.warmup * max(0, config.total_steps - config.prefill)
    fit = [r for r in rows if r["steps"] >= first]

    def slope(key: str) -> float | None:
        if len(fit) < 3:
            return None
        xs, ys = [r["steps"] / 1000 for r in fit], [r[key] / MB for r in fit]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 3) if var else None

    prefill_rows = [r for r in rows if r["steps"] <= config.prefill]
    summary = {
        "env": config.env, "preset": args.preset, "steps": result["steps"], "updates": result["updates"],
        "prefill": config.prefill, "replay_capacity": config.replay_capacity, "num_envs": config.num_envs,
        "batch": [config.batch_size, config.batch_length], "malloc_trim": args.malloc_trim,
        "seconds": round(elapsed, 1),
        "mb": {
            "imports": {"VmRSS": round(start_status.get("VmRSS", 0) / MB, 1),
                        "RssAnon": round(start_status.get("RssAnon", 0) / MB, 1)},
            "start": {k: round(rows[0][k] / MB, 1) for k in ("RssAnon", "RssFile", "replay", "children", "total")},
            "end_of_prefill": ({k: round(prefill_rows[-1][k] / MB, 1) for k in ("RssAnon", "RssFile", "replay", "total")}
                               if prefill_rows else None),
            "end": {k: round(rows[-1][k] / MB, 1) for k in ("RssAnon", "RssFile", "replay", "children", "total")},
            "peak": {k: round(v / MB, 1) for k, v in peaks.peak.items()},
            "VmHWM": round(_status().get("VmHWM", 0) / MB, 1),
            "replay_disk": round(rows[-1]["replay_disk"] / MB, 1),
        },
        "growth_mb_per_1k_steps_after_warmup": {
            "from_steps": fit[0]["steps"] if fit else None,
            **{k: slope(k) for k in ("RssAnon", "RssFile", "replay", "total")},
        },
    }
    if not args.logdir:
        shutil.rmtree(logdir.parent, ignore_errors=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
