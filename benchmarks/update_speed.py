"""Speed of one full DreamerV2 update at the Atari preset (or another preset's networks, ``--preset``).

One update = world-model loss + backward + Adam step, imagination of 15 steps
from all B x T posterior states, actor loss + step, critic loss + step (the
target critic's copy, a trainer hook, is a parameter copy every 100 updates). Prints ms per update (median after
warm-up), the update's FLOPs counted with ``torch.utils.flop_counter`` and the achieved FLOP/s; the last line is JSON.
The warm-up lasts until the allocator's heap has grown to its steady size (an update faults almost no pages in), as
in a training run after its first updates; the JSON gives the warm-up's length and the timed updates' page faults.

    python benchmarks/update_speed.py --device cpu --precision fp32 --updates 5
    python benchmarks/update_speed.py --profile 25           # also print the 25 most expensive ops
    python benchmarks/update_speed.py --plain-convolutions   # the encoder/decoder as plain nn.Sequential
    python benchmarks/update_speed.py --compile              # compiled, timed alternately with eager
    python benchmarks/update_speed.py --release-memory       # glibc's default: freed memory goes back to the system
    python benchmarks/update_speed.py --background-load 1    # one busy process beside the timed updates
    python benchmarks/update_speed.py --shards 1 --background-load 1   # one pass on torch's threads, for comparison
    python benchmarks/update_speed.py --device cuda --compile --cudagraph --precision bf16
    python benchmarks/update_speed.py --preset atari100k --threads 1 --compile   # the CPU Atari 100k preset

See ``benchmarks/README.md`` for the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from torchrl_dreamer.process import configure_process

configure_process()  # before torch, as the training command: idle OpenMP threads sleep, one allocator heap
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torchrl.data import Composite, OneHot, Unbounded

from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.trainers import default_shards, keep_freed_memory, parse_threads

from _checks import check_device_args  # benchmarks/_checks.py, beside this script


def make_batch(batch: int, length: int, actions: int, device: torch.device) -> TensorDict:
    return TensorDict(
        {
            "pixels": torch.randint(0, 256, (batch, length, 1, 64, 64), dtype=torch.uint8),
            "action": F.one_hot(torch.randint(actions, (batch, length)), actions).float(),
            "is_init": torch.zeros(batch, length, 1, dtype=torch.bool),
            ("next", "reward"): torch.randn(batch, length, 1),
            ("next", "terminated"): torch.zeros(batch, length, 1, dtype=torch.bool),
        },
        [batch, length],
    ).to(device)


# An update that faults fewer pages in than this (8 MB) ends the warm-up: the heap has reached its steady size.
STEADY_FAULTS = 2_000


def page_faults() -> int:
    """This process's minor page faults so far (pages faulted in), or 0 where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--updates", type=int, default=5, help="timed updates (median reported)")
    parser.add_argument(
        "--warmup", type=int, default=3,
        help="untimed updates first, at least; the warm-up goes on (to --max-warmup) while an update still faults "
        f"more than {STEADY_FAULTS} pages in: the allocator's heap grows to its steady size over the first updates "
        "(2-3 as one pass, up to ~10 in shards, whose threads interleave their allocations)",
    )
    parser.add_argument("--max-warmup", type=int, default=20, help="most untimed updates (see --warmup)")
    parser.add_argument("--preset", default="atari", choices=sorted(PRESETS),
                        help="the preset's networks and losses, on 64 x 64 Atari frames (default: the paper's atari)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the preset's)")
    parser.add_argument("--batch-length", type=int, default=None, help="rows per sequence (default: the preset's)")
    parser.add_argument("--actions", type=int, default=18)
    parser.add_argument(
        "--threads", type=parse_threads, default=None, metavar="INT",
        help="torch CPU threads, as the training command's flag (default: torch's, one per core)",
    )
    parser.add_argument(
        "--shards", type=parse_threads, default=None, metavar="INT",
        help="worker threads of the update's sharded passes (ShardPool); default as in training: one per thread on "
        "the CPU (eager), 1 when compiled or on CUDA. --shards 1 runs each pass as one, on torch's threads",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after timing, profile one more update with torch.profiler and print the N ops with most self time "
        "(of the update as one pass: the profiler does not see the shards' threads)",
    )
    parser.add_argument(
        "--background-load", type=int, default=0, metavar="N",
        help="run N busy processes beside the timed updates (as env workers and the collector do in training)",
    )
    parser.add_argument(
        "--plain-convolutions", action="store_true",
        help="run the image encoder/decoder as their plain nn.Sequential (fast_path=False), for comparison",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="compile the update (torch.compile); eager updates on the same model are timed alternately beside it "
        "(not with --cudagraph)",
    )
    parser.add_argument("--cudagraph", action="store_true", help="capture the forward/backward passes (CUDA only)")
    parser.add_argument(
        "--release-memory", action="store_true",
        help="leave glibc's allocator at its default (freed activations go back to the system and are faulted in "
        "again), instead of keeping them as the trainer does (keep_freed_memory)",
    )
    args = parser.parse_args(argv)
    check_device_args(parser, args)
    if args.updates < 1 or args.warmup < 0 or args.max_warmup < 0:
        parser.error("--updates must be >= 1, --warmup and --max-warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.release_memory:
        keep_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = DreamerV2Config.preset(args.preset, precision=args.precision, compile=args.compile, cudagraph=args.cudagraph)
    args.batch_size = args.batch_size or cfg.batch_size
    args.batch_length = args.batch_length or cfg.batch_length
    obs_spec = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
    models = cfg.make_models(obs_spec, OneHot(args.actions), device=device)
    image_nets = [m for m in models.world_model.modules() if hasattr(m, "fast_path")]
    loss = cfg.make_loss(models)
    shards = args.shards if args.shards is not None else default_shards(args.device, args.compile)  # as in training
    stepper = cfg.make_stepper(loss, shards=shards)
    eager = cfg.replace(compile=False, cudagraph=False).make_stepper(loss)  # same model and parameters
    batch = make_batch(args.batch_size, args.batch_length, args.actions, device)

    # FLOPs of the model's operations as written (plain convolutions): the sub-pixel form of the
    # decoder's last layer multiplies by a few padding zeros more (+0.14%), which is not counted.
    for net in image_nets:
        net.fast_path = False
    with FlopCount() as counter:
        eager.step(None, batch.clone())
    flops = counter.get_total_flops()
    for net in image_nets:
        net.fast_path = not args.plain_convolutions
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.background_load)]
    compiled = stepper.compile or stepper.cudagraph
    # eager updates free the gradient tensors a captured graph writes into: with CUDA graphs no eager updates
    # alternate with the captured ones
    alternate = compiled and not stepper.cudagraph
    warmup_s = None
    try:
        if compiled:
            start = time.perf_counter()
            stepper.warmup(batch)
            sync(device)
            warmup_s = time.perf_counter() - start
            print(f"compile/capture warm-up: {warmup_s:.1f} s", flush=True)
        # with --release-memory every update faults its activations in again: no steady heap to wait for
        max_warmup = args.warmup if args.release_memory else args.max_warmup
        warmup, steady = 0, False
        while warmup < args.warmup or (not steady and warmup < max_warmup):
            faults = page_faults()
            stepper.step(None, batch.clone())
            if alternate:
                eager.step(None, batch.clone())
            faults = page_faults() - faults
            steady = faults <= STEADY_FAULTS
            warmup += 1
            print(f"warm-up update {warmup}: {faults} page faults", flush=True)
        times, eager_times, timed_faults = [], [], []
        for i in range(args.updates):
            # compiled and eager updates alternate, so that both see the same machine
            for label, timed, out in (("", stepper, times), ("eager ", eager, eager_times))[: 1 + alternate]:
                faults = page_faults()
                sync(device)
                start = time.perf_counter()
                timed.step(None, batch.clone())
                sync(device)
                out.append(time.perf_counter() - start)
                if timed is stepper:
                    timed_faults.append(page_faults() - faults)
                print(f"{label}update {i}: {out[-1] * 1e3:.1f} ms", flush=True)
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    if args.profile:
        if shards > 1:  # torch.profiler records the calling thread's operations, not the shards' workers'
            print("profile of the update as one pass (--shards 1), on torch's threads:")
        print_profile(stepper if shards == 1 else eager, batch, device, args.profile)
    median = statistics.median(times)
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "preset": args.preset,
        "precision": args.precision,
        "batch": [args.batch_size, args.batch_length],
        "updates": args.updates,
        "warmup_updates": warmup,
        "page_faults_per_update": statistics.median(timed_faults),
        "background_load": args.background_load,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "shards": shards,
        "freed_memory": "released" if args.release_memory else "kept",
        "compile": args.compile,
        "cudagraph": args.cudagraph,
        "ms_per_update": round(median * 1e3, 2),
        "ms_min": round(min(times) * 1e3, 2),
        "gflop_per_update": round(flops / 1e9, 1),
        "achieved_tflops": round(flops / median / 1e12, 4),
    }
    if compiled:
        result["warmup_s"] = round(warmup_s, 1)
    if alternate:
        result["eager_ms_per_update"] = round(statistics.median(eager_times) * 1e3, 2)
        result["speedup_vs_eager"] = round(statistics.median(eager_times) / median, 3)
    print(f"median {result['ms_per_update']} ms per update, {result['gflop_per_update']} GFLOP per update, "
          f"{result['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved"
          + (f"; eager beside it {result['eager_ms_per_update']} ms ({result['speedup_vs_eager']}x)" if alternate else ""))
    print(json.dumps(result))
    return result


# in-place products count as their out-of-place forms (linear_on_parts accumulates its blocks with addmm_)
_IN_PLACE = {torch.ops.aten.addmm_: torch.ops.aten.addmm}


class FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s per-op FLOP formulas over every op run.

    ``FlopCounterMode`` also tracks modules, and its tracker cannot hash the losses' ``TensorDictParams``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(_IN_PLACE.get(func._overloadpacket, func._overloadpacket))
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


def print_profile(stepper, batch: TensorDict, device: torch.device, rows: int) -> None:
    """Profiles one update and prints the ops with the most self time (overall, then by input shape)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities, record_shapes=True) as prof:
        stepper.step(None, batch.clone())
        sync(device)
    averages = prof.key_averages()
    print(averages.table(sort_by=sort_by, row_limit=rows, max_name_column_width=50))
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort_by, row_limit=rows, max_name_column_width=40, max_shapes_column_width=80
        )
    )


if __name__ == "__main__":
    main()
