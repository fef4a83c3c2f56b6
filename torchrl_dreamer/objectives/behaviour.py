"""DreamerV2 actor and value losses: learning behaviours in imagination (spec section 7).

Alignment of one imagined trajectory (H = 15; every tensor time-major)::

    t          0     1     2    ...   13    14    15
    state      z_0   z_1   z_2  ...   z_13  z_14  z_15     z_0 = a posterior of the model pass (stop-grad)
    action     a_0   a_1   a_2  ...   a_13  a_14   -       a_t ~ pi(. | sg(feat_t)), leads to z_{t+1}
    reward     r_0   r_1   ...                     r_15    reward head at z_t (the reward ENTERING z_t)
    discount   g_0   g_1   ...                     g_15    g_0 = gamma * (1 - terminal of the start)
    weight     w_0 = 1, w_t = g_0 * ... * g_{t-1}          stop-grad
    value      v_t = target_critic(feat_t)
    target     V_0   V_1   ...              V_14   (V_15 = v_15)
               V_t = r_t + g_t * ((1 - lambda) * v_{t+1} + lambda * V_{t+1})

    critic:  t = 0..14   w_t * 0.5 * (critic(sg(feat_t)) - sg(V_t))^2
    actor:   t = 0..13   w_t * [rho * log pi(sg(a_t) | sg(feat_t)) * sg(V_{t+1} - v_t)
                                + (1 - rho) * V_{t+1} + eta * H(pi(. | feat_t))]
    (the last action a_14 and the last target are dropped from the actor: V_15 has no baseline).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives.common import LossModule

from torchrl_dreamer.modules.actor import ActorV2
from torchrl_dreamer.modules.models import WorldModelV2
from torchrl_dreamer.objectives.functional import discount_weights, lambda_return, transition_targets

__all__ = ["DreamerV2ActorLoss", "DreamerV2ValueLoss", "frozen"]

_ACTOR_GRADS = ("reinforce", "dynamics", "both")


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily sets ``requires_grad=False`` on the modules' parameters.

    Gradients still flow *through* the modules' activations (as the dynamics
    actor gradient needs), but no parameter of theirs enters the graph.
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class DreamerV2ValueLoss(LossModule):
    """DreamerV2 critic loss with a slow target critic.

    ``loss = mean_{t, n} w_t * 0.5 * (critic(sg(feat_t)) - sg(V_t))^2`` over the
    imagined trajectory produced by :class:`DreamerV2ActorLoss`. The target
    critic (a frozen copy of the critic, used by the actor loss for the
    lambda-returns and the REINFORCE baseline) is hard-copied from the critic
    by :meth:`update_target` at its first call and every
    ``target_update_interval`` calls.

    Args:
        critic (TensorDictModule): reads ``state``/``belief``, writes ``state_value``.

    Keyword Args:
        target_update_interval (int): updates between hard copies. Default: ``100``.

    Examples:
        >>> from torchrl_dreamer.modules import FeatHead
        >>> critic = TensorDictModule(FeatHead(4, 3, 1, num_cells=8, depth=1), ["state", "belief"], ["state_value"])
        >>> loss = DreamerV2ValueLoss(critic)
        >>> traj = TensorDict({"state": torch.randn(5, 2, 4), "belief": torch.randn(5, 2, 3),
        ...                    "lambda_target": torch.randn(5, 2, 1), "discount_weight": torch.ones(5, 2, 1)}, [5, 2])
        >>> out = loss(traj)
        >>> out["loss_value"].requires_grad
        True
        >>> loss.update_target()
        True
    """

    @dataclass
    class _AcceptedKeys:
        """Keys of the imagined trajectory read by the value loss.

        Attributes:
            state: imagined stochastic states. Default: ``"state"``.
            belief: imagined deterministic states. Default: ``"belief"``.
            value: the critic's output. Default: ``"state_value"``.
            lambda_target: the lambda-return targets. Default: ``"lambda_target"``.
            discount_weight: the imagination weights. Default: ``"discount_weight"``.
        """

        state: NestedKey = "state"
        belief: NestedKey = "belief"
        value: NestedKey = "state_value"
        lambda_target: NestedKey = "lambda_target"
        discount_weight: NestedKey = "discount_weight"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys

    def __init__(self, critic: TensorDictModule, *, target_update_interval: int = 100):
        super().__init__()
        if target_update_interval < 1:
            raise ValueError(f"target_update_interval must be >= 1, got {target_update_interval}.")
        self.critic = critic
        self.target_critic = copy.deepcopy(critic).requires_grad_(False)
        self.target_update_interval = target_update_interval
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def in_keys(self):
        keys = self.tensor_keys
        return [keys.state, keys.belief, keys.lambda_target, keys.discount_weight]

    out_keys = ["loss_value", "critic_loss", "critic"]

    @torch.no_grad()
    def update_target(self) -> bool:
        """Counts one update; hard-copies the critic into the target at update 0, N, 2N...

        Returns: whether a copy happened.
        """
        copied = int(self.num_updates) % self.target_update_interval == 0
        if copied:
            for target, source in zip(self.target_critic.parameters(), self.critic.parameters()):
                target.copy_(source)
        self.num_updates += 1
        return copied

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        keys = self.tensor_keys
        feat = tensordict.select(keys.state, keys.belief).detach()
        value = self.critic(feat).get(keys.value)
        target = tensordict.get(keys.lambda_target).detach()
        weight = tensordict.get(keys.discount_weight).detach()
        loss = (weight * 0.5 * (value.float() - target).pow(2)).mean()
        return TensorDict(
            {"loss_value": loss, "critic_loss": loss.detach(), "critic": value.detach().float().mean()}, []
        )


class DreamerV2ActorLoss(LossModule):
    """DreamerV2 actor loss: imagination from posterior states, lambda-returns, REINFORCE/dynamics.

    Starts from every posterior state of the world-model pass (stop-gradient),
    imagines ``imagination_horizon`` steps with the prior and the actor, and
    computes the lambda-returns with the target critic (see the module
    docstring for the alignment). ``actor_grad``:

    * ``"reinforce"`` (Atari): ``rho = 1``; the world model and the imagined
      actions carry no gradient, only ``log pi`` and the entropy do;
    * ``"dynamics"`` (DMC): ``rho = 0``; the actor gradient flows back through
      the imagined transitions, rewards, discounts and target values
      (straight-through/reparameterised actions), never into the world model's
      or target critic's parameters;
    * ``"both"``: ``rho = 1 - actor_grad_mix``.

    ``forward`` returns ``(losses, trajectory)``, where ``trajectory`` is a
    ``[N, H]`` TensorDict (``state``, ``belief``, ``lambda_target``,
    ``discount_weight``) for :class:`DreamerV2ValueLoss`.

    Args:
        actor_network (ActorV2): the actor network.
        world_model (WorldModelV2): the world model (not trained by this loss).
        value_loss (DreamerV2ValueLoss): provides the target critic.

    Keyword Args:
        imagination_horizon (int): ``H``. Default: ``15``.
        gamma (float): discount when there is no discount head, and of the start state. Default: ``0.999``.
        lmbda (float): lambda-return parameter. Default: ``0.95``.
        actor_grad (str): ``"reinforce"``, ``"dynamics"`` or ``"both"``. Default: ``"reinforce"``.
        actor_grad_mix (float): weight of the dynamics term with ``"both"``. Default: ``0.1``.
        entropy_scale (float): ``eta``. Default: ``1e-3``.

    Examples:
        >>> import torch
        >>> from torchrl.data import Composite, Unbounded, OneHot
        >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
        >>> from torchrl_dreamer.objectives import DreamerV2ModelLoss
        >>> obs = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
        >>> models = make_dreamerv2_models(obs, OneHot(3), **DEBUG_SIZES)
        >>> value_loss = DreamerV2ValueLoss(models.critic)
        >>> actor_loss = DreamerV2ActorLoss(models.actor_network, models.world_model, value_loss)
        >>> batch = TensorDict({
        ...     "pixels": torch.randint(0, 256, (2, 5, 1, 64, 64), dtype=torch.uint8),
        ...     "action": torch.nn.functional.one_hot(torch.randint(3, (2, 5)), 3).float(),
        ...     "is_init": torch.zeros(2, 5, 1, dtype=torch.bool),
        ...     ("next", "reward"): torch.randn(2, 5, 1),
        ...     ("next", "terminated"): torch.zeros(2, 5, 1, dtype=torch.bool)}, [2, 5])
        >>> _ = DreamerV2ModelLoss(models.world_model)(batch)
        >>> losses, trajectory = actor_loss(batch)
        >>> trajectory.batch_size
        torch.Size([10, 15])
        >>> value_loss(trajectory)["loss_value"].requires_grad
        True
    """

    @dataclass
    class _AcceptedKeys:
        """Keys read from the world model's output batch.

        Attributes:
            state: posterior states. Default: ``"state"``.
            belief: posterior beliefs. Default: ``"belief"``.
            is_init: episode starts. Default: ``"is_init"``.
            reward: true rewards (their shape only). Default: ``("next", "reward")``.
            terminated: true terminal flags. Default: ``("next", "terminated")``.
            value: the target critic's output key. Default: ``"state_value"``.
            lambda_target, discount_weight: keys written in the trajectory.
        """

        state: NestedKey = "state"
        belief: NestedKey = "belief"
        is_init: NestedKey = "is_init"
        reward: NestedKey = ("next", "reward")
        terminated: NestedKey = ("next", "terminated")
        value: NestedKey = "state_value"
        lambda_target: NestedKey = "lambda_target"
        discount_weight: NestedKey = "discount_weight"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys

    def __init__(
        self,
        actor_network: ActorV2,
        world_model: WorldModelV2,
        value_loss: DreamerV2ValueLoss,
        *,
        imagination_horizon: int = 15,
        gamma: float = 0.999,
        lmbda: float = 0.95,
        actor_grad: str = "reinforce",
        actor_grad_mix: float = 0.1,
        entropy_scale: float = 1e-3,
    ):
        super().__init__()
        if actor_grad not in _ACTOR_GRADS:
            raise ValueError(f"actor_grad must be one of {_ACTOR_GRADS}, got {actor_grad!r}.")
        if imagination_horizon < 2:
            raise ValueError(f"imagination_horizon must be >= 2, got {imagination_horizon}.")
        self.actor_network = actor_network
        # Held without registering as submodules: they belong to the model and value losses.
        self._world_model = [world_model]
        self._value_loss = [value_loss]
        self.imagination_horizon = imagination_horizon
        self.gamma = gamma
        self.lmbda = lmbda
        self.actor_grad = actor_grad
        self.actor_grad_mix = actor_grad_mix
        self.entropy_scale = entropy_scale

    @property
    def world_model(self) -> WorldModelV2:
        return self._world_model[0]

    @property
    def target_critic(self) -> TensorDictModule:
        return self._value_loss[0].target_critic

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def in_keys(self):
        keys = self.tensor_keys
        return [keys.state, keys.belief, keys.is_init, keys.reward, keys.terminated]

    out_keys = ["loss_actor", "actor_loss", "actor_ent", "reward_mean", "reward_std", "critic_slow", "critic_target"]

    @property
    def rho(self) -> float:
        """Weight of the REINFORCE term (1 - weight of the dynamics term)."""
        return {"reinforce": 1.0, "dynamics": 0.0, "both": 1.0 - self.actor_grad_mix}[self.actor_grad]

    def _policy(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.actor_network.forward_feat(feat.detach())
        straight = self.actor_grad != "reinforce"
        action = self.actor_network.head.sample(params, straight_through=straight)
        return (action if straight else action.detach()), params

    def _heads(self, state: torch.Tensor, belief: torch.Tensor, terminal: torch.Tensor):
        """Reward, discount and target value of every imagined state (time-major)."""
        wm = self.world_model
        reward = wm.reward_head(state, belief).float()
        if wm.continue_head is not None:
            discount = torch.sigmoid(wm.continue_head(state, belief).float())
        else:
            discount = torch.full_like(reward, self.gamma)
        # g_0 is the true discount of the start state, not the head's prediction
        discount = torch.cat([(self.gamma * (1.0 - terminal))[None].to(discount.dtype), discount[1:]])
        feat = TensorDict({self.tensor_keys.state: state, self.tensor_keys.belief: belief}, state.shape[:-1])
        value = self.target_critic(feat).get(self.tensor_keys.value).float()
        return reward, discount, value

    def forward(self, tensordict: TensorDictBase) -> tuple[TensorDict, TensorDict]:
        keys = self.tensor_keys
        wm = self.world_model
        state = tensordict.get(keys.state).detach()
        belief = tensordict.get(keys.belief).detach()
        state, belief = state.reshape(-1, state.shape[-1]), belief.reshape(-1, belief.shape[-1])
        _, _, terminal = transition_targets(
            tensordict.get(keys.reward), tensordict.get(keys.terminated), tensordict.get(keys.is_init)
        )
        terminal = terminal.reshape(-1, 1)
        horizon = self.imagination_horizon
        reinforce_only = self.actor_grad == "reinforce"

        with frozen(wm):
            traj = wm.rssm.imagine(state, belief, self._policy, horizon)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not reinforce_only):
                reward, discount, value = self._heads(traj["state"], traj["belief"], terminal)
        weight = discount_weights(discount)  # [H+1, N, 1]
        target = lambda_return(reward[:-1], value, discount[:-1], lmbda=self.lmbda)  # V_0..V_{H-1}

        head = self.actor_network.head
        params, actions = traj["dist_params"][:-1], traj["action"][:-1]  # t = 0..H-2
        entropy = head.entropy(params)
        objective = self.entropy_scale * entropy
        rho = self.rho
        if rho > 0:
            advantage = (target[1:] - value[:-2]).squeeze(-1).detach()
            objective = objective + rho * head.log_prob(params, actions.detach()) * advantage
        if rho < 1:
            objective = objective + (1 - rho) * target[1:].squeeze(-1)
        actor_loss = -(weight[:-2].squeeze(-1) * objective).mean()

        losses = TensorDict(
            {
                "loss_actor": actor_loss,
                "actor_loss": actor_loss.detach(),
                "actor_ent": entropy.detach().mean(),
                "reward_mean": reward.detach().mean(),
                "reward_std": reward.detach().std(),
                "critic_slow": value.detach().mean(),
                "critic_target": target.detach().mean(),
            },
            [],
        )
        # [N, H] trajectory for the critic: states 0..H-1 with their targets and weights
        trajectory = TensorDict(
            {
                keys.state: traj["state"][:-1].detach().transpose(0, 1),
                keys.belief: traj["belief"][:-1].detach().transpose(0, 1),
                keys.lambda_target: target.detach().transpose(0, 1),
                keys.discount_weight: weight[:-1].transpose(0, 1),
            },
            [state.shape[0], horizon],
        )
        return losses, trajectory
