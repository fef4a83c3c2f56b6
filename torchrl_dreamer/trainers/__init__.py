"""Optimisers, the DreamerV2 optimisation stepper and trainer hooks."""
from torchrl_dreamer.trainers.optim import DreamerV2Optimizer
from torchrl_dreamer.trainers.stepper import DreamerV2OptimizationStepper, make_dreamerv2_optimizers
from torchrl_dreamer.trainers.training import CheckpointError, DreamerV2Training, resolve_device
from torchrl_dreamer.trainers.hooks import (
    DreamerReplayHook,
    EpisodeReturnHook,
    TargetCriticHook,
    make_dreamerv2_trainer,
)
