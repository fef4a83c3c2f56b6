"""Optimisers, the DreamerV2 optimisation stepper and trainer hooks."""
from torchrl_dreamer.trainers.optim import DreamerV2Optimizer
from torchrl_dreamer.trainers.stepper import DreamerV2OptimizationStepper, make_dreamerv2_optimizers
