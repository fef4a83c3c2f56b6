"""DreamerV2 as a TorchRL :class:`~torchrl.trainers.Trainer`: hooks and one builder.

The trainer collects ``train_every`` agent steps per batch (random actions for
the first ``prefill``), stores them in the DreamerV2 replay, samples one
``[batch_size, batch_length]`` batch and runs one
:class:`DreamerV2OptimizationStepper` update per collected batch, copies the
target critic in a ``post_optim`` hook and logs episode returns and losses.
Add your own hooks with ``trainer.register_op(stage, fn)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.trainers import Trainer, TrainerHookBase

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.data import DreamerReplayBuffer
from torchrl_dreamer.objectives import DreamerV2ValueLoss
from torchrl_dreamer.record import EpisodeTracker

__all__ = ["DreamerReplayHook", "TargetCriticHook", "EpisodeReturnHook", "make_dreamerv2_trainer"]


class DreamerReplayHook(TrainerHookBase):
    """Stores collector batches in a :class:`~torchrl_dreamer.data.DreamerReplayBuffer` and samples training batches.

    Stages: ``batch_process`` (extend) and ``process_optim_batch`` (sample; stops the
    optimisation loop while no episode is long enough).
    """

    def __init__(self, replay_buffer: DreamerReplayBuffer):
        self.replay_buffer = replay_buffer

    def extend(self, batch: TensorDictBase) -> TensorDictBase:
        self.replay_buffer.extend(batch)
        return batch

    def sample(self, batch: TensorDictBase) -> TensorDictBase:
        if not self.replay_buffer.can_sample():
            raise StopIteration
        return self.replay_buffer.sample()

    def state_dict(self) -> dict[str, Any]:
        return self.replay_buffer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.replay_buffer.load_state_dict(state_dict)

    def register(self, trainer: Trainer, name: str = "dreamer_replay") -> None:
        trainer.register_op("batch_process", self.extend)
        trainer.register_op("process_optim_batch", self.sample)
        trainer.register_module(name, self)


class TargetCriticHook(TrainerHookBase):
    """Counts updates and hard-copies the critic into the target critic (at update 0 and every N)."""

    def __init__(self, value_loss: DreamerV2ValueLoss):
        self.value_loss = value_loss

    def __call__(self) -> None:
        self.value_loss.update_target()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def register(self, trainer: Trainer, name: str = "target_critic") -> None:
        trainer.register_op("post_optim", self)


class EpisodeReturnHook(TrainerHookBase):
    """Logs ``train_return`` and ``train_length`` of the episodes finished in each collected batch."""

    def __init__(self, num_envs: int = 1):
        self.tracker = EpisodeTracker(num_envs)

    def __call__(self, batch: TensorDictBase) -> dict[str, float] | None:
        finished = self.tracker.update(batch)
        if not finished:
            return None
        returns, lengths = zip(*finished)
        return {"train_return": sum(returns) / len(returns), "train_length": sum(lengths) / len(lengths)}

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)

    def register(self, trainer: Trainer, name: str = "episode_returns") -> None:
        trainer.register_op("pre_steps_log", self)
        trainer.register_module(name, self)


def make_dreamerv2_trainer(
    config: DreamerV2Config,
    logdir: str | Path,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> Trainer:
    """Builds DreamerV2 training as a TorchRL :class:`~torchrl.trainers.Trainer`.

    The components (models, losses, optimisers, replay, collector, loggers) are
    the same as those of :class:`~torchrl_dreamer.trainers.DreamerV2Training`.
    Registered hooks: :class:`DreamerReplayHook`, the optimisation stepper
    (three optimisers), :class:`TargetCriticHook`, :class:`EpisodeReturnHook`;
    the trainer logs the stepper's metrics to ``logdir`` (CSV).

    Args:
        config (DreamerV2Config): hyperparameters.
        logdir (str | Path): run directory (its parent must exist).

    Keyword Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``. Default: ``"auto"``.
        progress (bool): the trainer's progress bar. Default: ``True``.

    Returns: a :class:`~torchrl.trainers.Trainer`; call ``trainer.train()``.

    Examples:
        >>> import tempfile
        >>> cfg = DreamerV2Config.preset("debug", total_steps=200)
        >>> trainer = make_dreamerv2_trainer(cfg, tempfile.mkdtemp() + "/run", device="cpu", progress=False)
        >>> trainer.train()
        >>> trainer.collected_frames >= 200
        True
    """
    from torchrl.record.loggers import CSVLogger

    from torchrl_dreamer.trainers.training import DreamerV2Training

    run = DreamerV2Training(config, logdir, device=device, progress=False)
    run.stepper.update_target = False  # the TargetCriticHook does it
    trainer = Trainer(
        collector=run._make_collector(),
        total_frames=config.total_steps * config.action_repeat,
        frame_skip=config.action_repeat,
        optim_steps_per_batch=1,
        loss_module=run.loss,
        optimization_stepper=run.stepper,
        logger=CSVLogger(exp_name="", log_dir=str(run.logdir)),
        progress_bar=progress,
        log_interval=config.log_every * config.action_repeat,
        save_trainer_interval=config.checkpoint_every * config.action_repeat,
    )
    DreamerReplayHook(run.replay).register(trainer)
    TargetCriticHook(run.loss.value_loss).register(trainer)
    EpisodeReturnHook(config.num_envs).register(trainer)
    trainer.dreamer = run  # the models, losses and replay, for inspection
    return trainer
