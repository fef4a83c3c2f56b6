"""One loss for a whole DreamerV2 update."""
from __future__ import annotations

from tensordict import TensorDict, TensorDictBase
from torchrl.objectives.common import LossModule

from torchrl_dreamer.objectives.behaviour import DreamerV2ActorLoss, DreamerV2ValueLoss
from torchrl_dreamer.objectives.world_model import DreamerV2ModelLoss

__all__ = ["DreamerV2Loss"]


class DreamerV2Loss(LossModule):
    """World-model, actor and value losses of one DreamerV2 update.

    ``forward`` runs the world-model loss (writing the posterior states into
    the batch), imagines from those states for the actor loss and trains the
    critic on the same imagined trajectory. The three losses touch disjoint
    parameters (the actor and critic see stop-gradient states, the world
    model is frozen in imagination), so the sum of the ``loss_*`` entries can
    be back-propagated at once. The reference imagines with the world model
    *after* its optimiser step; :class:`~torchrl_dreamer.trainers.DreamerV2OptimizationStepper`
    does that, in three phases, with the sub-losses :attr:`model_loss`,
    :attr:`actor_loss` and :attr:`value_loss`.

    Args:
        model_loss (DreamerV2ModelLoss): the world-model loss.
        actor_loss (DreamerV2ActorLoss): the actor loss.
        value_loss (DreamerV2ValueLoss): the critic loss and target critic.

    Examples:
        >>> import torch
        >>> from torchrl.data import Composite, Unbounded, OneHot
        >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
        >>> from torchrl_dreamer.objectives import make_dreamerv2_loss
        >>> obs = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
        >>> models = make_dreamerv2_models(obs, OneHot(3), **DEBUG_SIZES)
        >>> loss = make_dreamerv2_loss(models, imagination_horizon=5)
        >>> batch = TensorDict({
        ...     "pixels": torch.randint(0, 256, (2, 5, 1, 64, 64), dtype=torch.uint8),
        ...     "action": torch.nn.functional.one_hot(torch.randint(3, (2, 5)), 3).float(),
        ...     "is_init": torch.zeros(2, 5, 1, dtype=torch.bool),
        ...     ("next", "reward"): torch.randn(2, 5, 1),
        ...     ("next", "terminated"): torch.zeros(2, 5, 1, dtype=torch.bool)}, [2, 5])
        >>> sorted(k for k in loss(batch).keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_model_continue', 'loss_model_kl', 'loss_model_reco', 'loss_model_reward', 'loss_value']
    """

    def __init__(
        self, model_loss: DreamerV2ModelLoss, actor_loss: DreamerV2ActorLoss, value_loss: DreamerV2ValueLoss
    ):
        super().__init__()
        self.model_loss = model_loss
        self.actor_loss = actor_loss
        self.value_loss = value_loss

    @property
    def in_keys(self):
        return self.model_loss.in_keys

    @property
    def out_keys(self):
        return self.model_loss.out_keys + self.actor_loss.out_keys + self.value_loss.out_keys

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        out = self.model_loss(tensordict)
        actor_out, trajectory = self.actor_loss(tensordict)
        out.update(actor_out)
        out.update(self.value_loss(trajectory))
        return out


def make_dreamerv2_loss(
    models,
    *,
    lambda_kl: float = 0.1,
    lambda_reco: float = 1.0,
    lambda_reward: float = 1.0,
    lambda_discount: float = 5.0,
    kl_balance: float = 0.8,
    free_nats: float = 0.0,
    free_avg: bool = True,
    reward_transform: str = "tanh",
    imagination_horizon: int = 15,
    gamma: float = 0.999,
    lmbda: float = 0.95,
    actor_grad: str = "reinforce",
    actor_grad_mix: float = 0.1,
    entropy_scale: float = 1e-3,
    target_update_interval: int = 100,
) -> DreamerV2Loss:
    """Builds the three DreamerV2 losses around :class:`~torchrl_dreamer.modules.DreamerV2Models`.

    Keyword arguments are those of :class:`DreamerV2ModelLoss`,
    :class:`DreamerV2ActorLoss` and :class:`DreamerV2ValueLoss` (paper Atari defaults).
    """
    model_loss = DreamerV2ModelLoss(
        models.world_model,
        lambda_kl=lambda_kl,
        lambda_reco=lambda_reco,
        lambda_reward=lambda_reward,
        lambda_discount=lambda_discount,
        kl_balance=kl_balance,
        free_nats=free_nats,
        free_avg=free_avg,
        gamma=gamma,
        reward_transform=reward_transform,
    )
    value_loss = DreamerV2ValueLoss(models.critic, target_update_interval=target_update_interval)
    actor_loss = DreamerV2ActorLoss(
        models.actor_network,
        models.world_model,
        value_loss,
        imagination_horizon=imagination_horizon,
        gamma=gamma,
        lmbda=lmbda,
        actor_grad=actor_grad,
        actor_grad_mix=actor_grad_mix,
        entropy_scale=entropy_scale,
    )
    return DreamerV2Loss(model_loss, actor_loss, value_loss)
