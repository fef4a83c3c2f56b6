"""DreamerV2 losses (TorchRL LossModules) and their tensor maths."""
from torchrl_dreamer.objectives.behaviour import DreamerV2ActorLoss, DreamerV2ValueLoss, make_target_updater
from torchrl_dreamer.objectives.composite import DreamerV2Loss, make_dreamerv2_loss
from torchrl_dreamer.objectives.functional import (
    balanced_kl_loss,
    bernoulli_nll,
    categorical_entropy,
    categorical_kl,
    discount_weights,
    gaussian_nll,
    transition_targets,
)
from torchrl_dreamer.objectives.value import DreamerV2LambdaEstimator
from torchrl_dreamer.objectives.world_model import DreamerV2ModelLoss
