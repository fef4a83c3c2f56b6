"""A whole DreamerV2 update as a TorchRL ``OptimizationStepper``."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.trainers.trainers import OptimizationStepper

from torchrl_dreamer.objectives.composite import DreamerV2Loss
from torchrl_dreamer.trainers.optim import DreamerV2Optimizer

__all__ = ["DreamerV2OptimizationStepper", "make_dreamerv2_optimizers", "NonFiniteUpdateError"]


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
    """One DreamerV2 update in the reference order.

    1. world-model loss, backward, model optimiser step;
    2. imagination from the (stop-gradient) posterior states with the updated
       world model, actor loss, backward, actor optimiser step;
    3. critic loss on the same imagined trajectory, backward, critic step;

    Each loss is computed through the trainer's ``compute_loss(batch, method=...)``
    (``"model_loss"``, ``"actor_loss"``, ``"value_loss"``), as TorchRL's TD3
    trainer does, so that a distributed learner backend sees every loss; on its
    own (``step(None, batch)``) the stepper calls the loss's sub-losses directly.
    The slow critic is not copied here: a TorchRL :class:`~torchrl.trainers.TargetNetUpdaterHook`
    around :func:`~torchrl_dreamer.objectives.make_target_updater` does it after each step
    (call the updater's ``step()`` yourself when stepping by hand).

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
    ):
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
        missing = {"model", "actor", "critic"} - set(optimizers)
        if missing:
            raise ValueError(f"optimizers is missing {sorted(missing)}.")
        self.loss = loss
        self.optimizers = optimizers
        self.precision = precision
        self.max_nonfinite_updates = max_nonfinite_updates
        self.nonfinite_updates = 0
        self.consecutive_nonfinite = 0

    def _autocast(self, device: torch.device):
        dtype = _PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    @staticmethod
    def _optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return getattr(optimizer, "last_grad_norm", torch.zeros(())).detach()

    def _compute(self, trainer: Any, batch: TensorDictBase, method: str):
        if trainer is not None:
            return trainer.compute_loss(batch, method=method)
        return getattr(self.loss, method)(batch)

    def step(self, trainer: Any, sub_batch: TensorDictBase) -> TensorDictBase:
        device = next(self.loss.parameters()).device
        batch = sub_batch.to(device) if sub_batch.device != device else sub_batch
        with self._autocast(device):
            model_out, posteriors = self._compute(trainer, batch, "model_loss")
        model_loss = sum(v for k, v in model_out.items() if k.startswith("loss_"))
        model_norm = self._optimise(self.optimizers["model"], model_loss)

        with self._autocast(device):
            actor_out, trajectory = self._compute(trainer, posteriors, "actor_loss")
        actor_norm = self._optimise(self.optimizers["actor"], actor_out["loss_actor"])

        with self._autocast(device):
            value_out = self._compute(trainer, trajectory, "value_loss")
        critic_norm = self._optimise(self.optimizers["critic"], value_out["loss_value"])

        metrics = TensorDict({}, [])
        for out in (model_out, actor_out, value_out):
            metrics.update({k: v.detach() for k, v in out.items() if not k.startswith("loss_")})
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
                "model_grad_norm": model_norm,
                "actor_grad_norm": actor_norm,
                "critic_grad_norm": critic_norm,
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
