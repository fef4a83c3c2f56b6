"""One loss for a whole DreamerV2 update."""
from __future__ import annotations

from tensordict import TensorDict, TensorDictBase
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import ValueEstimators

from torchrl_dreamer.envs.imagination import DreamerV2ImaginationEnv
from torchrl_dreamer.objectives.behaviour import DreamerV2ActorLoss, DreamerV2ValueLoss
from torchrl_dreamer.objectives.world_model import DreamerV2ModelLoss

__all__ = ["DreamerV2Loss"]


class DreamerV2Loss(LossModule):
    """World-model, actor and value losses of one DreamerV2 update.

    ``forward`` runs the world-model loss, imagines from its posterior states
    for the actor loss and trains the critic on the same imagined trajectory;
    nothing is written into the input batch. The three losses touch disjoint
    parameters (the actor and critic see stop-gradient states, the world
    model is frozen in imagination), so the sum of the ``loss_*`` entries can
    be back-propagated at once. The reference imagines with the world model
    *after* its optimiser step; :class:`~torchrl_dreamer.trainers.DreamerV2OptimizationStepper`
    does that, in three phases, with the sub-losses :attr:`model_loss`,
    :attr:`actor_loss` and :attr:`value_loss`.

    :meth:`set_keys` renames a key in every sub-loss that reads it (``action`` and the
    observation entries in the world model; ``reward``, ``terminated``, ``is_init`` in the
    world-model and actor losses); :meth:`make_value_estimator` sets the actor loss's.

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

    def set_keys(self, **kwargs) -> None:
        """Forwards each rename to the sub-losses that accept it; unknown names raise ``ValueError``."""
        losses = (self.model_loss, self.actor_loss, self.value_loss)
        for name, value in kwargs.items():
            takers = [
                loss for loss in losses
                if name in loss._AcceptedKeys.__dataclass_fields__ or name in getattr(loss, "_observation_names", {})
            ]
            if not takers:
                raise ValueError(f"{name} is not a key of the DreamerV2 losses.")
            for loss in takers:
                loss.set_keys(**{name: value})

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams) -> None:
        """The actor loss's lambda-return (:meth:`DreamerV2ActorLoss.make_value_estimator`); a ``gamma`` is also
        the world-model loss's (the discount head learns ``gamma * (1 - terminal)``), so the two stay one."""
        self.actor_loss.make_value_estimator(value_type, **hyperparams)
        if "gamma" in hyperparams:
            self.model_loss.gamma = float(hyperparams["gamma"])

    @property
    def value_estimator(self):
        return self.actor_loss.value_estimator

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        out, model_output = self.model_loss(tensordict)
        actor_out, trajectory = self.actor_loss(model_output)
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
    reward_transform: str = "auto",
    imagination_horizon: int = 15,
    gamma: float = 0.999,
    lmbda: float = 0.95,
    actor_grad: str = "auto",
    actor_grad_mix: float = 0.1,
    entropy_scale: float = 1e-3,
) -> DreamerV2Loss:
    """Builds the three DreamerV2 losses around :class:`~torchrl_dreamer.modules.DreamerV2Models`.

    Keyword arguments are those of :class:`DreamerV2ModelLoss` and :class:`DreamerV2ActorLoss`, and
    the actor loss's ``TDLambda`` estimator (``gamma``, ``lmbda``); paper defaults (``actor_grad="auto"``:
    REINFORCE for discrete actions, dynamics backpropagation for continuous ones, as the reference;
    ``reward_transform="auto"``: ``tanh`` rewards for discrete actions, the reference's Atari setting, and identity
    for continuous ones, its DMC setting: squashed, a dense cost such as Pendulum's is flat wherever it is large,
    and the model gives the actor no gradient there). The actor
    imagines in a :class:`~torchrl_dreamer.envs.DreamerV2ImaginationEnv` over the world model (with
    ``discount_threshold=0``: a fixed horizon). The slow critic's copies are the trainer's
    (:func:`~torchrl_dreamer.objectives.make_target_updater`).
    """
    # the imagination env resolves "auto" from the action spec; the world model learns the rewards it states
    env = DreamerV2ImaginationEnv(
        models.world_model, models.actor.spec[models.actor.dist_sample_keys[0]], discount_threshold=0.0,
        reward_transform=reward_transform, action_key=models.actor.dist_sample_keys[0],
    )
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
        reward_transform=env.reward_transform,
    )
    value_loss = DreamerV2ValueLoss(models.critic)
    actor_loss = DreamerV2ActorLoss(
        models.actor,
        env,
        value_loss,
        imagination_horizon=imagination_horizon,
        actor_grad=actor_grad,
        actor_grad_mix=actor_grad_mix,
        entropy_scale=entropy_scale,
    )
    actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=gamma, lmbda=lmbda)
    return DreamerV2Loss(model_loss, actor_loss, value_loss)
