"""A whole DreamerV2 update as a TorchRL ``OptimizationStepper``."""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import CudaGraphModule
from torchrl.checkpoint import GlobalRNGState
from torchrl.trainers.trainers import OptimizationStepper

from torchrl_dreamer.modules.shards import ShardPool
from torchrl_dreamer.objectives.composite import DreamerV2Loss
from torchrl_dreamer.objectives.functional import data_parallel
from torchrl_dreamer.trainers.optim import DreamerV2Optimizer

__all__ = ["DreamerV2OptimizationStepper", "make_dreamerv2_optimizers", "NonFiniteUpdateError"]


def _data_parallel_ranks(trainer: Any) -> int:
    """The ranks of the data-parallel learner ``trainer`` is a rank of (TorchRL's Ray learner sets its
    ``process_group``), 1 for a local trainer."""
    if getattr(trainer, "process_group", None) is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


class NonFiniteUpdateError(RuntimeError):
    """Too many updates in a row had a NaN or infinite loss or gradient."""

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_dreamerv2_optimizers(
    loss: DreamerV2Loss,
    *,
    model_lr: float = 2e-4,
    actor_lr: float = 4e-5,
    critic_lr: float = 1e-4,
    eps: float = 1e-5,
    weight_decay: float = 1e-6,
    max_grad_norm: float = 100.0,
) -> dict[str, DreamerV2Optimizer]:
    """The three reference optimisers (model, actor, critic) for a :class:`DreamerV2Loss`.

    Returns: ``{"model": ..., "actor": ..., "critic": ...}``.
    """
    common = dict(eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    return {
        "model": DreamerV2Optimizer(loss.model_loss.world_model.parameters(), lr=model_lr, **common),
        "actor": DreamerV2Optimizer(loss.actor_loss.actor_network.parameters(), lr=actor_lr, **common),
        "critic": DreamerV2Optimizer(loss.value_loss.value_network.parameters(), lr=critic_lr, **common),
    }


class DreamerV2OptimizationStepper(OptimizationStepper):
    """One DreamerV2 update in the reference order, eager or compiled.

    1. world-model loss, backward, model optimiser step;
    2. imagination from the (stop-gradient) posterior states with the updated
       world model, actor loss; critic loss on the same imagined trajectory;
       one backward through both (their parameters and graphs are disjoint: the
       critic reads the trajectory detached and the actor the slow critic), then
       the actor and the critic optimiser steps.

    The slow critic is not copied here: a TorchRL :class:`~torchrl.trainers.TargetNetUpdaterHook`
    around :func:`~torchrl_dreamer.objectives.make_target_updater` does it after each step
    (call the updater's ``step()`` yourself when stepping by hand).

    Eager updates compute each loss through the trainer's ``compute_loss(batch, method=...)``
    (``"model_loss"``, ``"actor_loss"``, ``"value_loss"``), as TorchRL's TD3 trainer does;
    on its own (``step(None, batch)``) the stepper calls the sub-losses directly.

    **Compiled updates** follow TorchRL's ``DreamerV3OptimizationStepper``. The two
    forward/backward passes above (world model; actor and critic) are one compile scope
    over the losses: :func:`torch.compile` of the stepper's own two functions, which call
    the sub-losses directly (the trainer's ``compute_loss`` is not traced); the optimiser
    steps, which read the gradient norm on the host, run eagerly between them. On CUDA
    ``cudagraph=True`` captures each forward/backward with TensorDict's
    :class:`~tensordict.nn.CudaGraphModule` (experimental: written to TorchRL's pattern, not yet run
    on a GPU). A captured graph writes into the gradient tensors it was captured with: nothing else
    may set them to ``None`` (``zero_grad(set_to_none=True)``), and a batch of another shape is not
    recaptured. :meth:`warmup` compiles (and captures) on a representative batch and leaves the RNG,
    the loss's buffers and the optimisers as they were; the first :meth:`step` calls it when it has
    not been called, so a compiled update computes the eager one's function from the same state
    (inductor draws its own random numbers; with ``torch._inductor.config.fallback_random = True``
    it draws torch's, and the losses, gradients and weights match the eager ones to rounding:
    ``tests/test_compile.py``). Batches must keep the warm-up's shapes and keys (a replay sample
    always does); without CUDA graphs a new shape recompiles.

    Args:
        loss (DreamerV2Loss): the composite loss.
        optimizers (dict): ``{"model", "actor", "critic"}`` optimisers
            (see :func:`make_dreamerv2_optimizers`).

    Non-finite values never reach the weights: an optimiser step whose gradient
    norm is not finite changes nothing (:class:`~torchrl_dreamer.trainers.DreamerV2Optimizer`
    skips it), the update is counted in ``nonfinite_updates`` (a metric, and
    checkpointed), and after ``max_nonfinite_updates`` such updates in a row
    :class:`NonFiniteUpdateError` stops training.

    Keyword Args:
        precision (str): ``"fp32"`` or ``"bf16"`` autocast for the forward passes
            (the paper trained in mixed precision). Default: ``"fp32"``.
        max_nonfinite_updates (int): consecutive non-finite updates tolerated. Default: ``20``.
        compile (bool): compile the update with TorchInductor. Default: ``False``.
        compile_mode (str): :func:`torch.compile`'s ``mode``. Default: ``"default"``.
        cudagraph (bool): capture each forward/backward in a CUDA graph (CUDA only).
            Default: ``False``.
        warmup_steps (int): forward/backward passes of the warm-up (at least 2: the first
            fills the imagination env's caches, the next compiles the steady state; at least 3
            with ``cudagraph``, which captures on the last). Default: ``3``.
        shards (int): on the CPU, run the world model's pass, the imagination rollouts and the
            critic's and slow critic's values as this many slices of the batch at once, each in a worker thread with one torch thread
            (:class:`~torchrl_dreamer.modules.ShardPool`): the same losses and gradients (up to the
            order of floating-point sums; each shard draws from its own generator), and an update
            that holds its speed when other processes share the cores. Eager only; each pass's
            graph is backpropagated through once (as the stepper does). ``1`` runs them as one pass
            with torch's threads. Default: ``1``.

    Returns (``step``): detached metrics named as the reference's, with
    ``model_grad_norm``, ``actor_grad_norm``, ``critic_grad_norm`` and ``nonfinite_updates``.
    """

    def __init__(
        self,
        loss: DreamerV2Loss,
        optimizers: dict[str, torch.optim.Optimizer],
        *,
        precision: str = "fp32",
        max_nonfinite_updates: int = 20,
        compile: bool = False,
        compile_mode: str = "default",
        cudagraph: bool = False,
        warmup_steps: int = 3,
        shards: int = 1,
    ):
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
        missing = {"model", "actor", "critic"} - set(optimizers)
        if missing:
            raise ValueError(f"optimizers is missing {sorted(missing)}.")
        if warmup_steps < (3 if cudagraph else 2):
            raise ValueError(
                f"warmup_steps must be at least {3 if cudagraph else 2}, got {warmup_steps} (the first pass fills the "
                "imagination env's caches; a CUDA graph is captured after the compiled passes are stable)."
            )
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be an int >= 1, got {shards!r}.")
        if shards > 1 and (compile or cudagraph):
            raise ValueError(f"shards={shards} runs eager passes in threads: it cannot be combined with compile or cudagraph.")
        if shards > 1 and next(loss.parameters()).device.type != "cpu":
            raise ValueError(f"shards={shards} splits the update over CPU threads; the loss is on {next(loss.parameters()).device}.")
        self.loss = loss
        self.optimizers = optimizers
        self.shard_pool = ShardPool(shards) if shards > 1 else None
        self.precision = precision
        self.max_nonfinite_updates = max_nonfinite_updates
        self.nonfinite_updates = 0
        self.consecutive_nonfinite = 0
        self.compile = bool(compile)
        self.compile_mode = compile_mode
        self.cudagraph = bool(cudagraph)
        self.warmup_steps = warmup_steps
        self._passes = None  # the compiled/captured (model, behaviour) forward/backward, after warmup()

    def _autocast(self, device: torch.device):
        dtype = _PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _zero_grad(self, *names: str) -> None:
        # captured graphs write into the same gradient tensors every time: keep them allocated
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=not self.cudagraph)

    def _compute(self, trainer: Any, batch: TensorDictBase, method: str):
        """One sub-loss, through the trainer's ``compute_loss`` when there is a trainer."""
        if trainer is not None:
            return trainer.compute_loss(batch, method=method)
        return getattr(self.loss, method)(batch)

    def _model_pass(self, batch: TensorDictBase, trainer: Any = None) -> tuple[TensorDictBase, TensorDictBase]:
        """World-model loss and its backward: ``(metrics, posteriors)``."""
        with self._autocast(batch.device or next(self.loss.parameters()).device):
            out, posteriors = self._compute(trainer, batch, "model_loss")
        self._zero_grad("model")
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        return out.detach(), posteriors.detach()

    def _behaviour_pass(self, posteriors: TensorDictBase, trainer: Any = None, split: bool = True) -> TensorDictBase:
        """Imagination, actor and critic losses and their backward passes: the metrics.

        Eager (``split``), each loss's backward follows its forward: a data-parallel learner's DDP reduces the
        gradients of one forward per backward. The critic reads the imagined trajectory detached, so the two
        backward passes give the gradients of one through both, which the compiled pass takes (one graph)."""
        device = posteriors.device or next(self.loss.parameters()).device
        self._zero_grad("actor", "critic")
        with self._autocast(device):
            actor_out, trajectory = self._compute(trainer, posteriors, "actor_loss")
        if split:
            actor_out["loss_actor"].backward()
        with self._autocast(device):
            value_out = self._compute(trainer, trajectory, "value_loss")
        (value_out["loss_value"] if split else actor_out["loss_actor"] + value_out["loss_value"]).backward()
        metrics = actor_out.detach()
        metrics.update(value_out.detach())
        return metrics

    def warmup(self, batch: TensorDictBase) -> None:
        """Compile (and on CUDA capture) the update on ``batch`` without changing anything.

        Runs ``warmup_steps`` forward/backward passes, then restores the global RNG state and
        the loss's buffers and clears the gradients; no optimiser steps, no target copies.
        Does nothing for an eager stepper.
        """
        if not (self.compile or self.cudagraph):
            return
        device = next(self.loss.parameters()).device
        if self.cudagraph and device.type != "cuda":
            raise RuntimeError(f"cudagraph=True needs the loss on a CUDA device, it is on {device}.")
        batch = batch.to(device) if batch.device != device else batch
        model_pass, behaviour_pass = self._model_pass, functools.partial(self._behaviour_pass, split=False)
        if self.compile:
            model_pass = torch.compile(model_pass, mode=self.compile_mode)
            behaviour_pass = torch.compile(behaviour_pass, mode=self.compile_mode)
        if self.cudagraph:
            model_pass = CudaGraphModule(model_pass, warmup=self.warmup_steps - 1, device=device)
            behaviour_pass = CudaGraphModule(behaviour_pass, warmup=self.warmup_steps - 1, device=device)
        rng = GlobalRNGState()
        rng_state = rng.state_dict()
        buffers = [(buffer, buffer.detach().clone()) for buffer in self.loss.buffers()]
        try:
            for _ in range(self.warmup_steps):
                _, posteriors = model_pass(batch)
                behaviour_pass(posteriors)
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            rng.load_state_dict(rng_state)
            self._zero_grad("model", "actor", "critic")
        self._passes = (model_pass, behaviour_pass)

    def step(self, trainer: Any, sub_batch: TensorDictBase) -> TensorDictBase:
        parallel = _data_parallel_ranks(trainer) > 1
        if parallel and (self.compile or self.cudagraph):
            raise ValueError(
                "A data-parallel learner runs the eager update (its DDP reduces the gradients of the losses computed "
                "through trainer.compute_loss, which a compiled update does not call): set compile=False."
            )
        with data_parallel() if parallel else contextlib.nullcontext():
            return self._update(trainer, sub_batch)

    def _update(self, trainer: Any, sub_batch: TensorDictBase) -> TensorDictBase:
        device = next(self.loss.parameters()).device
        batch = sub_batch.to(device) if sub_batch.device != device else sub_batch
        if (self.compile or self.cudagraph) and self._passes is None:
            self.warmup(batch)
        if self._passes is not None:
            model_pass, behaviour_pass = self._passes
            model_out, posteriors = model_pass(batch)
            self.optimizers["model"].step()
            behaviour_out = behaviour_pass(posteriors)
        else:
            with self.shard_pool if self.shard_pool is not None else contextlib.nullcontext():
                model_out, posteriors = self._model_pass(batch, trainer)
                self.optimizers["model"].step()
                behaviour_out = self._behaviour_pass(posteriors, trainer)
        self.optimizers["actor"].step()
        self.optimizers["critic"].step()

        metrics = TensorDict({}, [])
        for out in (model_out, behaviour_out):
            metrics.update({k: v for k, v in out.items() if not k.startswith("loss_")})
        skipped = [name for name, opt in self.optimizers.items() if getattr(opt, "skipped", False)]
        if skipped:
            self.nonfinite_updates += 1
            self.consecutive_nonfinite += 1
            if self.consecutive_nonfinite >= self.max_nonfinite_updates:
                raise NonFiniteUpdateError(
                    f"{self.consecutive_nonfinite} updates in a row had a non-finite loss or gradient (last in the "
                    f"{', '.join(skipped)} step{'s' if len(skipped) > 1 else ''}); none reached the weights. Check the "
                    "env's observations and rewards for NaN or inf (they are reported when they occur) and the "
                    "learning rates; the last checkpoint holds the weights from before."
                )
        else:
            self.consecutive_nonfinite = 0
        metrics.update(
            {
                **{
                    f"{name}_grad_norm": getattr(self.optimizers[name], "last_grad_norm", torch.zeros(())).detach()
                    for name in ("model", "actor", "critic")
                },
                "nonfinite_updates": torch.tensor(float(self.nonfinite_updates)),
            }
        )
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        state["nonfinite_updates"] = self.nonfinite_updates
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])
        self.nonfinite_updates = int(state_dict.get("nonfinite_updates", 0))
