"""Data-parallel shards of a per-sample computation, in threads of one process (CPU).

Why this exists: PyTorch parallelises each operation over its OpenMP threads with a static split and a barrier at
the end. When another process takes a core (env workers and the collector do, in training), the thread that shares
that core finishes its part last and every one of the update's thousands of operations waits for it: one Atari
update with 2 threads on 2 cores and one core busy took 1.75x its idle time, where the fair share of the cores
gives 1.5x. A :class:`ShardPool` instead splits the batch into shards, one per worker thread with one OpenMP thread
each, and runs a whole per-sample computation (the world model's pass over the sequences, the imagination rollouts,
the critic's and the slow critic's values on the imagined states)
shard by shard in parallel: the threads meet once per computation instead of once per operation, and the OS can
balance them. TorchRL has nothing for this (its collectors and ``ParallelEnv`` parallelise envs, not a loss).

The result is the same function: the shards' outputs are concatenated along the batch dimension before any
reduction, the losses are computed on the whole batch as before, and the gradient of each shard is taken in its own
thread and summed in shard order (:func:`run_sharded`). Only the order of floating-point sums and the random numbers
differ: each shard draws from its own generator, seeded from torch's global one, so that a seeded run repeats bit
for bit for a given number of shards whatever the threads' timing.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator

import torch
from tensordict import TensorDictBase
from torch.autograd.function import once_differentiable

__all__ = ["ShardPool", "run_sharded", "shard_generator"]

_LOCAL = threading.local()
_ACTIVE: contextvars.ContextVar[ShardPool | None] = contextvars.ContextVar("torchrl_dreamer_shards", default=None)


def shard_generator() -> torch.Generator | None:
    """The random generator of the shard running in this thread; ``None`` (torch's global one) outside shards."""
    return getattr(_LOCAL, "generator", None)


@contextlib.contextmanager
def _shard_generator(generator: torch.Generator) -> Iterator[None]:
    previous = shard_generator()
    _LOCAL.generator = generator
    try:
        yield
    finally:
        _LOCAL.generator = previous


class ShardPool:
    """Worker threads that run per-sample computations as data-parallel shards of the batch (CPU).

    Inside ``with pool:`` the losses' per-sample passes (:func:`run_sharded`: the world model's pass over the batch
    of sequences in :class:`~torchrl_dreamer.objectives.DreamerV2ModelLoss`, the imagination rollouts in
    :class:`~torchrl_dreamer.objectives.DreamerV2ActorLoss`, the critic's and the slow critic's values in
    :class:`~torchrl_dreamer.objectives.DreamerV2ValueLoss`) run as ``shards`` slices of the batch, each in its own
    thread with ``threads_per_shard`` torch threads; outside it they run as one. The losses and their gradients are
    those of the whole batch (see the module docstring). One Atari update on 2 cores, 2 shards against one pass on
    2 threads: idle 3.25-3.32 s against 3.37-3.61 s, with one core busy 5.10-5.25 s against 5.97-6.40 s
    (``benchmarks/update_speed.py``, figures in ``benchmarks/README.md``). Call
    :func:`~torchrl_dreamer.trainers.keep_freed_memory` before the first pass (the trainer does), and import
    ``torchrl_dreamer`` before the process starts other threads, so that the workers allocate from glibc's main
    heap and reuse what they free.

    Args:
        shards (int): slices of the batch run at once (at most the batch size is used).

    Keyword Args:
        threads_per_shard (int): torch threads of each worker. Default: ``1``.

    Examples:
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Linear(3, 2)
        >>> td = TensorDict({"x": torch.randn(6, 3)}, [6])
        >>> with ShardPool(2) as pool:
        ...     out = run_sharded(lambda t: t.set("y", net(t["x"])), td, net.parameters())
        >>> torch.allclose(out["y"], net(td["x"])), out["y"].requires_grad
        (True, True)
        >>> pool.close()
    """

    def __init__(self, shards: int, *, threads_per_shard: int = 1):
        for name, value in (("shards", shards), ("threads_per_shard", threads_per_shard)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        self.shards = shards
        self.threads_per_shard = threads_per_shard
        self._executor: ThreadPoolExecutor | None = None
        self._token = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shards={self.shards}, threads_per_shard={self.threads_per_shard})"

    def __enter__(self) -> ShardPool:
        if self._token is not None:
            raise RuntimeError(f"{self!r} is already active.")
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._token = None

    def _start(self) -> ThreadPoolExecutor:
        """The workers, each with its own torch thread count (OpenMP's and MKL's counts are per thread)."""
        if self._executor is None:
            main = torch.get_num_threads()
            executor = ThreadPoolExecutor(self.shards, thread_name_prefix="dreamer-shard")
            started = threading.Barrier(self.shards, timeout=60)

            def start() -> None:
                # torch sets a thread's count from the process's at its first parallel operation (after which
                # main's count is back): take that first, then set the worker's own
                torch.get_num_threads()
                torch.set_num_threads(self.threads_per_shard)
                started.wait()  # every task in a thread of its own

            for future in [executor.submit(start) for _ in range(self.shards)]:
                future.result()
            torch.set_num_threads(main)  # torch.set_num_threads also sets the count new threads start with
            self._executor = executor
        return self._executor

    def map(self, fn: Callable, items: Iterable) -> list:
        """``[fn(item) for item in items]``, one item per worker thread, in the caller's context.

        Every item has finished when it returns or raises (the first item's error, in order).
        """
        executor = self._start()

        def call(item):
            _ACTIVE.set(None)  # in the worker's copy of the context: a nested run_sharded runs as one pass
            return fn(item)

        futures = [executor.submit(contextvars.copy_context().run, call, item) for item in items]
        try:
            wait(futures)
        except BaseException:  # KeyboardInterrupt in the caller: no worker may still be running the model after it
            for future in futures:
                future.cancel()
            wait(futures)
            raise
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stops the worker threads (a later use starts them again)."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


def _split(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous slices of ``range(n)`` whose sizes differ by at most one."""
    shards = min(shards, n)
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class _ShardRun:
    """The shards of one :func:`run_sharded` call: their inputs, outputs and graphs."""

    def __init__(self, pool, fn, tensordict, params, grad_inputs, grad):
        self.pool, self.fn, self.grad = pool, fn, grad
        self.params = params
        self.grad_inputs = grad_inputs  # keys of the input leaves that require grad
        self.slices = _split(tensordict.batch_size[0], pool.shards)
        self.inputs = [tensordict[start:stop] for start, stop in self.slices]
        # one seed per shard, drawn from torch's generator here: the draws do not depend on the threads' timing
        seeds = torch.randint(2**62, (len(self.slices),), dtype=torch.int64).tolist()
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        autocast = torch.is_autocast_enabled("cpu")
        self.autocast = (autocast, torch.get_autocast_dtype("cpu"))
        self.leaves: list[list[torch.Tensor]] = []  # per shard: its grad-input leaves
        self.outputs: list[TensorDictBase] = []

    def _forward_shard(self, i: int) -> tuple[list[torch.Tensor], TensorDictBase, set]:
        shard = self.inputs[i].copy()
        leaves = []
        for key in self.grad_inputs:
            leaf = shard.get(key).detach().requires_grad_()
            shard.set(key, leaf)
            leaves.append(leaf)
        enabled, dtype = self.autocast
        with torch.set_grad_enabled(self.grad), torch.autocast("cpu", dtype=dtype, enabled=enabled), _shard_generator(
            self.generators[i]
        ):
            out = self.fn(shard)
        if not isinstance(out, TensorDictBase):
            raise TypeError(f"run_sharded: the function must return a TensorDict, got {type(out).__name__}.")
        nodes = _check_leaves(out, self.params + leaves) if self.grad else set()
        return leaves, out, nodes

    def forward(self) -> None:
        rng = torch.get_rng_state()
        results = self.pool.map(self._forward_shard, range(len(self.inputs)))
        if not torch.equal(rng, torch.get_rng_state()):
            _warn_global_draws()
        self.leaves = [leaves for leaves, _, _ in results]
        self.outputs = [out for _, out, _ in results]
        shared = set.intersection(*(nodes for _, _, nodes in results)) if len(results) > 1 else set()
        if shared:  # every shard would run the backward of these nodes: a second time, or at once
            raise RuntimeError(
                "run_sharded: the function reads a tensor requiring grad that was computed outside it (from the "
                "parameters); compute it inside the function, from tensors passed in params."
            )
        first = self.outputs[0]
        keys = list(first.keys(True, True))
        for out in self.outputs[1:]:
            if set(out.keys(True, True)) != set(keys):
                raise RuntimeError("run_sharded: the shards returned different keys.")
        self.differentiable = [k for k in keys if any(out.get(k).requires_grad for out in self.outputs)]

    def backward(self, grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        wrt = list(self.params)

        def shard_backward(i: int) -> list[torch.Tensor | None]:
            (start, stop), out = self.slices[i], self.outputs[i]
            pairs = [
                (out.get(k), g[start:stop]) for k, g in zip(self.differentiable, grads)
                if g is not None and out.get(k).requires_grad
            ]
            targets = wrt + self.leaves[i]
            if not pairs or not targets:
                return [None] * len(targets)
            return list(torch.autograd.grad(
                [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True, materialize_grads=False
            ))

        try:
            shard_grads = self.pool.map(shard_backward, range(len(self.outputs)))
        finally:
            self.outputs, self.leaves = [], []  # the graphs are used once
        param_grads = []
        for j in range(len(wrt)):  # summed in shard order: the same sums whatever the threads' timing
            parts = [g[j] for g in shard_grads if g[j] is not None]
            param_grads.append(None if not parts else _ordered_sum(parts))
        input_grads = []
        for j in range(len(self.grad_inputs)):
            parts = [g[len(wrt) + j] for g in shard_grads]
            if all(p is None for p in parts):
                input_grads.append(None)
            else:
                input_grads.append(torch.cat([
                    p if p is not None else torch.zeros_like(self.inputs[i].get(self.grad_inputs[j]))
                    for i, p in enumerate(parts)
                ]))
        return param_grads + input_grads


def _check_leaves(out: TensorDictBase, allowed: list[torch.Tensor]) -> set:
    """Raises if the output's graph reaches a tensor requiring grad that the backward would not differentiate.

    A walk over the graph's nodes (about 2 ms for the world model's pass at the Atari preset). Returns the nodes
    other than the leaves' (each shard's must be its own).
    """
    allowed_ids = {id(t) for t in allowed}
    stack = []
    for value in out.values(True, True):
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            continue
        if value.grad_fn is None and id(value) not in allowed_ids:
            _unlisted(value)
        stack.append(value.grad_fn)
    seen, nodes = set(), set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            if id(leaf) not in allowed_ids:
                _unlisted(leaf)
        else:
            nodes.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def _unlisted(leaf: torch.Tensor) -> None:
    raise RuntimeError(
        f"run_sharded: the function reads a tensor requiring grad (shape {tuple(leaf.shape)}) that is neither in "
        "params nor in its input: its gradient would be lost. Pass it in params."
    )


_WARNED = []


def _warn_global_draws() -> None:
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            "run_sharded: the shards drew from torch's global generator (a sampler that does not read "
            "shard_generator(), e.g. a distribution of the actor other than the library's): the shards reach it in "
            "whatever order the threads run, so a seeded run will not repeat bit for bit.",
            stacklevel=3,
        )


def _ordered_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """``((parts[0] + parts[1]) + parts[2]) + ...`` into a new tensor (a part may alias an incoming gradient)."""
    if len(parts) == 1:
        return parts[0].clone()
    total = parts[0] + parts[1]  # one pass, not a copy and an addition
    for part in parts[2:]:
        total += part
    return total


class _Sharded(torch.autograd.Function):
    """Joins the shards' differentiable outputs; its backward takes each shard's gradients in that shard's thread.

    Its inputs are the tensors the shards differentiate with respect to, so that autograd calls its backward.
    """

    @staticmethod
    def forward(ctx, run: _ShardRun, *tensors: torch.Tensor):
        ctx.run = run
        ctx.set_materialize_grads(False)  # an output the loss does not read passes no gradient: no zeros to run
        return tuple(torch.cat([out.get(k).detach() for out in run.outputs]) for k in run.differentiable)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        run, ctx.run = ctx.run, None
        if run is None:
            raise RuntimeError("run_sharded: a sharded pass can be backpropagated through only once.")
        return (None, *run.backward(grads))


def run_sharded(
    fn: Callable[[TensorDictBase], TensorDictBase],
    tensordict: TensorDictBase,
    params: Iterable[torch.Tensor] = (),
) -> TensorDictBase:
    """``fn(tensordict)``, as shards of the batch in the active :class:`ShardPool`'s threads.

    ``fn`` must treat the samples along the first batch dimension independently (no batch statistics) and must not
    change shared state (module attributes, ``requires_grad`` flags, the global generator): it runs in several
    threads at once. Its output's leaves are concatenated along the first dimension; those that require grad are
    differentiable with respect to ``params`` (every tensor requiring grad that ``fn`` reads besides its input:
    a gradient into a parameter not listed is an error, not a silent zero) and to the input's leaves that require
    grad. The backward takes each shard's gradients in that shard's thread and sums them in shard order; the pass
    can be backpropagated through once (``retain_graph=True`` does not keep the shards' graphs). Without an active pool, with one shard or one sample, it is
    ``fn(tensordict)``.

    Args:
        fn (callable): ``TensorDict -> TensorDict``, per sample along dimension 0.
        tensordict (TensorDictBase): the input, batch ``[N, ...]``.
        params (iterable of Tensor): the tensors requiring grad that ``fn`` reads besides ``tensordict``.

    Returns: the concatenated output, batch ``[N, ...]``.
    """
    pool = _ACTIVE.get()
    if pool is None or pool.shards == 1 or tensordict.batch_dims == 0 or tensordict.batch_size[0] < 2:
        return fn(tensordict)
    if tensordict.device is not None and tensordict.device.type != "cpu":
        raise RuntimeError(f"run_sharded: shards run on the CPU, the batch is on {tensordict.device}.")
    grad = torch.is_grad_enabled()
    params = [p for p in params if p.requires_grad] if grad else []
    grad_inputs = [k for k, v in tensordict.items(True, True) if grad and v.requires_grad]
    run = _ShardRun(pool, fn, tensordict, params, grad_inputs, grad)
    run.forward()  # in the workers, each shard with its own graph
    if run.differentiable:
        differentiable = _Sharded.apply(run, *params, *(tensordict.get(k) for k in grad_inputs))
        if not isinstance(differentiable, tuple):
            differentiable = (differentiable,)
    else:
        differentiable = ()
    # the shards' outputs joined without their graphs (the differentiable leaves are the function's outputs)
    result = torch.cat([out.exclude(*run.differentiable).detach() for out in run.outputs])
    for key, value in zip(run.differentiable, differentiable):
        result.set(key, value)
    if not run.differentiable:
        run.outputs = []
    return result
