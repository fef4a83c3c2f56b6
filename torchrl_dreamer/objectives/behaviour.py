"""DreamerV2 actor and value losses: learning behaviours in imagination (spec section 7).

Alignment of one imagined trajectory (H = 15; shown time-major, stored ``[N, H]`` as TorchRL rollouts)::

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

In TorchRL terms: a rollout of :class:`~torchrl_dreamer.envs.DreamerV2ImaginationEnv` holds z_0..z_14 and a_t at
the root, z_{t+1}, ``("next", "reward")`` r_{t+1} and ``("next", "discount")`` g_{t+1} under ``next``; the loss
adds r_0 (the reward head at the start) and g_0, and :class:`~torchrl_dreamer.objectives.DreamerV2LambdaEstimator`
computes V_t from the reward and discount *at* each state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import ProbabilisticTensorDictSequential, TensorDictModule, TensorDictModuleBase
from tensordict.utils import NestedKey
from torchrl.data import Categorical, OneHot
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import ValueEstimators, hold_out_net
from torchrl.objectives.value import ValueEstimatorBase

from torchrl_dreamer.envs.imagination import DreamerV2ImaginationEnv
from torchrl_dreamer.modules.shards import run_sharded
from torchrl_dreamer.objectives.functional import discount_weights, transition_targets
from torchrl_dreamer.objectives.value import DreamerV2LambdaEstimator

__all__ = ["DreamerV2ActorLoss", "DreamerV2ValueLoss"]

_ACTOR_GRADS = ("auto", "reinforce", "dynamics", "both")


class DreamerV2ValueLoss(LossModule):
    """DreamerV2 critic loss, with the slow target critic as TorchRL target parameters.

    ``loss = mean_{n, t} w_t * 0.5 * (critic(sg(feat_t)) - sg(V_t))^2`` over the imagined
    trajectory produced by :class:`DreamerV2ActorLoss`. The critic is converted with
    ``convert_to_functional(..., create_target_params=True)``: ``value_network_params`` are
    trained, ``target_value_network_params`` are the slow critic that the actor loss uses for
    the lambda-returns and the REINFORCE baseline. Copy them with TorchRL's
    :class:`~torchrl.objectives.HardUpdate` (see :func:`make_target_updater`), driven by a
    :class:`~torchrl.trainers.TargetNetUpdaterHook` at ``post_optim``.

    Inside an active :class:`~torchrl_dreamer.modules.ShardPool` (the stepper's ``shards``) the critic's and the
    slow critic's values are computed in shards of the states, in worker threads: the critic must treat each state
    on its own (an MLP does; no batch statistics).

    Args:
        critic (TensorDictModule): reads ``state``/``belief``, writes ``state_value``.

    Examples:
        >>> from torchrl_dreamer.modules import FeatHead
        >>> critic = TensorDictModule(FeatHead(4, 3, 1, num_cells=8, depth=1), ["state", "belief"], ["state_value"])
        >>> loss = DreamerV2ValueLoss(critic)
        >>> traj = TensorDict({"state": torch.randn(2, 5, 4), "belief": torch.randn(2, 5, 3),
        ...                    "lambda_target": torch.randn(2, 5, 1), "discount_weight": torch.ones(2, 5, 1)}, [2, 5])
        >>> loss(traj)["loss_value"].requires_grad
        True
        >>> updater = make_target_updater(loss, interval=100)
    """

    @dataclass
    class _AcceptedKeys:
        """Keys of the imagined trajectory read by the value loss.

        Attributes:
            lambda_target: the lambda-return targets. Default: ``"lambda_target"``.
            discount_weight: the imagination weights. Default: ``"discount_weight"``.

        The critic's value is read under its own ``out_keys``.
        """

        lambda_target: NestedKey = "lambda_target"
        discount_weight: NestedKey = "discount_weight"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    value_network: TensorDictModule
    value_network_params: TensorDictParams
    target_value_network_params: TensorDictParams

    def __init__(self, critic: TensorDictModule):
        super().__init__()
        self.convert_to_functional(critic, "value_network", create_target_params=True)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def make_value_estimator(self, value_type=None, **hyperparams):
        raise NotImplementedError(
            "DreamerV2ValueLoss regresses the lambda-returns of DreamerV2ActorLoss: call make_value_estimator on "
            "the actor loss (or on DreamerV2Loss)."
        )

    @property
    def in_keys(self):
        keys = self.tensor_keys
        return [*self.value_network.in_keys, keys.lambda_target, keys.discount_weight]

    out_keys = ["loss_value", "critic_loss", "critic"]

    def target_value(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The slow critic's value of each state of ``tensordict`` (its parameters carry no gradient)."""
        inputs = tensordict.select(*self.value_network.in_keys)
        # written as the plain, gradient-free tensors they are (preserve_module_state=True would wrap them in
        # trainable Parameters); gradients may flow through the states (dynamics actor gradient), never into the
        # slow critic. The swap is made here, in the calling thread, around the shards that read the module.
        with self.target_value_network_params.to_module(self.value_network, preserve_module_state=False):
            return self._value(inputs, ())

    def _value(self, inputs: TensorDictBase, params) -> torch.Tensor:
        """The critic's value of each state of ``inputs``: in shards of the states inside an active
        :class:`~torchrl_dreamer.modules.ShardPool` (per state, so the same values and gradients as one pass)."""
        network, key = self.value_network, self.value_network.out_keys[0]

        def value(states: TensorDictBase) -> TensorDict:
            return TensorDict({key: network(states).get(key)}, states.batch_size)

        return run_sharded(value, inputs, params).get(key)

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        keys = self.tensor_keys
        inputs = tensordict.select(*self.value_network.in_keys).detach()
        # the critic runs with the loss's own parameters, value_network_params, as TorchRL's losses do: a functional
        # swap of the loss's parameters (TensorDict.from_module(loss) ... .to_module(loss), torch.func, vmap over
        # parameter sets) reaches it. The swap is made here, in the calling thread, around the shards.
        with self.value_network_params.to_module(self.value_network):
            value = self._value(inputs, list(self.value_network_params.values(True, True)))
        target = tensordict.get(keys.lambda_target).detach()
        weight = tensordict.get(keys.discount_weight).detach()
        loss = (weight * 0.5 * (value.float() - target).pow(2)).mean()
        return TensorDict(
            {"loss_value": loss, "critic_loss": loss.detach(), "critic": value.detach().float().mean()}, []
        )


def make_target_updater(value_loss: DreamerV2ValueLoss, *, interval: int = 100):
    """TorchRL's :class:`~torchrl.objectives.HardUpdate` for the slow critic, on the reference's schedule.

    Stepped once after each update (a :class:`~torchrl.trainers.TargetNetUpdaterHook` at ``post_optim``), it copies
    the critic after updates ``0, interval, 2 * interval...`` (counting from 0), the reference's
    ``update_slow_target`` at the end of each update: the slow critic is the initial critic during update 0, the
    critic after update 0 during updates 1 to ``interval``, and so on. ``HardUpdate`` copies when its counter
    reaches ``value_network_update_interval`` and then counts from 0 again, i.e. every
    ``value_network_update_interval + 1`` steps: hence ``interval - 1``, and a counter that starts full so that
    the first step copies.

    Examples:
        >>> from torchrl_dreamer.modules import FeatHead
        >>> critic = TensorDictModule(FeatHead(4, 3, 1, num_cells=8, depth=1), ["state", "belief"], ["state_value"])
        >>> updater = make_target_updater(DreamerV2ValueLoss(critic), interval=100)
        >>> updater.value_network_update_interval, updater.counter
        (99, 99)
    """
    from torchrl.objectives import HardUpdate

    if interval < 1:
        raise ValueError(f"The target critic's update interval must be >= 1, got {interval}.")
    updater = HardUpdate(value_loss, value_network_update_interval=interval - 1)
    updater.counter = updater.value_network_update_interval  # the first step (after update 0) copies
    return updater


class _ImaginationPolicy(TensorDictModuleBase):
    """Acts in imagination: the actor's distribution on stop-gradient states, a (reparameterised) sample.

    Writes the action and the distribution parameters, so that the loss rebuilds the distribution with
    ``build_dist_from_params`` instead of running the actor twice.
    """

    def __init__(self, actor: ProbabilisticTensorDictSequential, action_key: NestedKey, reparameterize: bool):
        super().__init__()
        self.actor = actor
        self.action_key = action_key
        self.reparameterize = reparameterize
        self.in_keys = list(actor.in_keys)
        self.out_keys = [action_key, *actor.dist_params_keys]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        inputs = tensordict.select(*self.in_keys).detach()
        dist = self.actor.get_dist(inputs)
        action = dist.rsample() if self.reparameterize else dist.sample()
        for key in self.actor.dist_params_keys:
            tensordict.set(key, inputs.get(key))
        tensordict.set(self.action_key, action)
        return tensordict


class DreamerV2ActorLoss(LossModule):
    """DreamerV2 actor loss: imagination in :class:`~torchrl_dreamer.envs.DreamerV2ImaginationEnv`,
    lambda-returns, REINFORCE and/or dynamics gradients.

    Starts from every posterior state of the world-model pass (stop-gradient), rolls the
    imagination env out for ``imagination_horizon`` steps under ``hold_out_net`` with the actor,
    and computes the lambda-returns with the slow critic through the value estimator
    (:class:`~torchrl_dreamer.objectives.DreamerV2LambdaEstimator`, set with
    ``make_value_estimator(ValueEstimators.TDLambda, gamma=..., lmbda=...)``); see the module
    docstring for the alignment. ``actor_grad``:

    * ``"reinforce"`` (Atari): ``rho = 1``; the world model and the imagined actions carry no
      gradient, only ``log pi`` and the entropy do;
    * ``"dynamics"`` (DMC): ``rho = 0``; the actor gradient flows back through the imagined
      transitions, rewards, discounts and target values (straight-through/reparameterised
      actions), never into the world model's or target critic's parameters;
    * ``"both"``: ``rho = 1 - actor_grad_mix``.

    ``forward`` takes the world model's output (``DreamerV2ModelLoss`` returns it) and returns
    ``(losses, trajectory)``, where ``trajectory`` is a ``[N, H]`` TensorDict (``state``,
    ``belief``, ``lambda_target``, ``discount_weight``) for :class:`DreamerV2ValueLoss`. Nothing is
    written into the input.

    Besides ``loss_actor``, the losses carry learning-health metrics (detached): ``actor_ent`` and, for discrete
    actions, ``actor_ent_fraction`` (entropy over its maximum, :attr:`max_entropy`; near 0 the actor has collapsed),
    ``advantage_scale`` (mean ``|lambda-return - slow value|``), the imagined rewards' ``reward_mean``,
    ``reward_std``, ``reward_max`` (largest magnitude) and discounts' ``discount_mean``, ``discount_min``, the slow
    critic's ``critic_slow`` and the targets' ``critic_target`` (means), and ``critic_bound``: the slow critic's
    largest ``|value|`` over the largest discounted return the rewards allow, ``max |reward| / (1 - gamma)`` with
    the largest imagined ``|reward|`` seen so far. Above 1 the critic values more than any reward stream could
    give: it is diverging (the trainer warns). It is a bound, not a tight one: at ``gamma = 0.999`` it is 1000
    times the largest reward, so it catches gross divergence; watch its trend too.

    Args:
        actor_network (ProbabilisticTensorDictSequential): the actor, e.g. a TorchRL
            ``ProbabilisticActor`` reading ``state``/``belief`` (any such actor: its ``get_dist`` and
            ``build_dist_from_params`` are all the loss uses).
        model_based_env (DreamerV2ImaginationEnv): the imagination env (not trained by this loss);
            build it with ``discount_threshold=0`` (fixed-horizon imagination).
        value_loss (DreamerV2ValueLoss): provides the slow critic.

    Keyword Args:
        imagination_horizon (int): ``H``. Default: ``15``.
        actor_grad (str): ``"auto"``, ``"reinforce"``, ``"dynamics"`` or ``"both"``. Default: ``"auto"``.
        actor_grad_mix (float): weight of the dynamics term with ``"both"``. Default: ``0.1``.
        entropy_scale (float): ``eta``. Default: ``1e-3``.

    Examples:
        >>> import torch
        >>> from torchrl.data import Composite, Unbounded, OneHot
        >>> from torchrl_dreamer.envs import DreamerV2ImaginationEnv
        >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
        >>> from torchrl_dreamer.objectives import DreamerV2ModelLoss
        >>> obs = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
        >>> models = make_dreamerv2_models(obs, OneHot(3), **DEBUG_SIZES)
        >>> value_loss = DreamerV2ValueLoss(models.critic)
        >>> env = DreamerV2ImaginationEnv(models.world_model, OneHot(3), discount_threshold=0.0)
        >>> actor_loss = DreamerV2ActorLoss(models.actor, env, value_loss)
        >>> actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.999, lmbda=0.95)
        >>> batch = TensorDict({
        ...     "pixels": torch.randint(0, 256, (2, 5, 1, 64, 64), dtype=torch.uint8),
        ...     "action": torch.nn.functional.one_hot(torch.randint(3, (2, 5)), 3).float(),
        ...     "is_init": torch.zeros(2, 5, 1, dtype=torch.bool),
        ...     ("next", "reward"): torch.randn(2, 5, 1),
        ...     ("next", "terminated"): torch.zeros(2, 5, 1, dtype=torch.bool)}, [2, 5])
        >>> _, posteriors = DreamerV2ModelLoss(models.world_model)(batch)
        >>> losses, trajectory = actor_loss(posteriors)
        >>> trajectory.batch_size
        torch.Size([10, 15])
        >>> value_loss(trajectory)["loss_value"].requires_grad
        True
    """

    @dataclass
    class _AcceptedKeys:
        """Keys read from the world model's output batch, and written in the imagined trajectory.

        Attributes:
            is_init: episode starts. Default: ``"is_init"``.
            reward: true rewards (their shape only). Default: ``("next", "reward")``.
            terminated: true terminal flags. Default: ``("next", "terminated")``.
            lambda_target, discount_weight: keys written in the trajectory.

        The model states are read under the imagination env's ``model_state_keys`` (the world model's
        ``state``/``belief``).
        """

        is_init: NestedKey = "is_init"
        reward: NestedKey = ("next", "reward")
        terminated: NestedKey = ("next", "terminated")
        lambda_target: NestedKey = "lambda_target"
        discount_weight: NestedKey = "discount_weight"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    default_value_estimator = ValueEstimators.TDLambda
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.TDLambda)

    def __init__(
        self,
        actor_network: ProbabilisticTensorDictSequential,
        model_based_env: DreamerV2ImaginationEnv,
        value_loss: DreamerV2ValueLoss,
        *,
        imagination_horizon: int = 15,
        actor_grad: str = "auto",
        actor_grad_mix: float = 0.1,
        entropy_scale: float = 1e-3,
    ):
        super().__init__()
        if actor_grad not in _ACTOR_GRADS:
            raise ValueError(f"actor_grad must be one of {_ACTOR_GRADS}, got {actor_grad!r}.")
        if imagination_horizon < 2:
            raise ValueError(f"imagination_horizon must be >= 2, got {imagination_horizon}.")
        if not hasattr(actor_network, "build_dist_from_params"):
            raise TypeError(
                f"actor_network must be a ProbabilisticTensorDictSequential (e.g. torchrl's ProbabilisticActor), got "
                f"{type(actor_network).__name__}."
            )
        self.actor_network = actor_network
        # Held without registering as submodules: they belong to the model and value losses.
        self.__dict__["model_based_env"] = model_based_env
        self._critic_holder = [value_loss]
        self.imagination_horizon = imagination_horizon
        self.action_key = actor_network.dist_sample_keys[0]
        if self.action_key not in model_based_env.full_action_spec.keys(True, True):
            raise ValueError(
                f"The actor writes {self.action_key!r} but the imagination env reads "
                f"{list(model_based_env.full_action_spec.keys(True, True))}: build the env with action_key="
                f"{self.action_key!r}."
            )
        if actor_grad == "auto":  # the reference's actor_grad: auto
            actor_grad = "reinforce" if self.discrete_actions else "dynamics"
        self.actor_grad = actor_grad
        self.actor_grad_mix = actor_grad_mix
        self.entropy_scale = entropy_scale
        # not a submodule: its actor is already registered (and checkpointed) as actor_network
        self.__dict__["_policy"] = _ImaginationPolicy(
            actor_network, self.action_key, reparameterize=actor_grad != "reinforce"
        )
        # the largest |imagined reward| seen so far (not checkpointed: one batch restores it), for critic_bound
        device = next(actor_network.parameters()).device
        self.register_buffer("reward_scale", torch.zeros((), device=device), persistent=False)

    @property
    def critic_module(self) -> DreamerV2ValueLoss:
        """The value loss whose target parameters are the slow critic."""
        return self._critic_holder[0]

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams) -> None:
        """Sets the lambda-return: ``TDLambda`` (``gamma``, ``lmbda``), ``TD1`` (``lmbda = 1``) or ``TD0``
        (``lmbda = 0``), all with DreamerV2's index convention (:class:`DreamerV2LambdaEstimator`), or a
        ``ValueEstimatorBase`` instance. Defaults: ``gamma=0.999``, ``lmbda=0.95``.

        ``gamma`` discounts the start states (``gamma * (1 - terminal)``) and, without a discount head,
        every imagined step; with a head the imagined steps use its learned discount.
        """
        if isinstance(value_type, ValueEstimatorBase):
            self._value_estimator = value_type
            self.value_type = type(value_type)
            return
        value_type = self.default_value_estimator if value_type is None else value_type
        if value_type not in self.SUPPORTED_VALUE_ESTIMATORS:
            raise NotImplementedError(
                f"{value_type} is not a lambda-return: DreamerV2ActorLoss supports {self.SUPPORTED_VALUE_ESTIMATORS}."
            )
        hyperparams.setdefault("gamma", 0.999)
        hyperparams.setdefault("lmbda", {ValueEstimators.TD0: 0.0, ValueEstimators.TD1: 1.0}.get(value_type, 0.95))
        gamma = float(hyperparams["gamma"])
        if not 0.0 < gamma <= 1.0 or not 0.0 <= float(hyperparams["lmbda"]) <= 1.0:
            raise ValueError(f"gamma must be in (0, 1] and lmbda in [0, 1], got {gamma} and {hyperparams['lmbda']}.")
        # on the actor's device, with the loss's other tensors (no host copies in an update)
        self._value_estimator = DreamerV2LambdaEstimator(**hyperparams).to(self.reward_scale.device)
        self.value_type = value_type

    @property
    def in_keys(self):
        keys = self.tensor_keys
        return [*self.model_based_env.model_state_keys, keys.is_init, keys.reward, keys.terminated]

    @property
    def out_keys(self):
        keys = ["loss_actor", "actor_loss", "actor_ent", "actor_ent_fraction", "advantage_scale", "reward_mean",
                "reward_std", "reward_max", "discount_mean", "discount_min", "critic_slow", "critic_target",
                "critic_bound"]
        return keys if self.discrete_actions else [key for key in keys if key != "actor_ent_fraction"]

    @property
    def discrete_actions(self) -> bool:
        """Whether the actions are discrete (one-hot): only then has the entropy a maximum to compare with."""
        return isinstance(self.model_based_env.full_action_spec[self.action_key], (OneHot, Categorical))

    @property
    def max_entropy(self) -> float:
        """The largest entropy of one action: ``log n`` for ``n`` discrete actions, the log-volume of the action
        box for bounded continuous ones (the uniform distribution's)."""
        spec = self.model_based_env.full_action_spec[self.action_key]
        if isinstance(spec, (OneHot, Categorical)):
            return math.log(spec.space.n)
        return float((spec.space.high - spec.space.low).log().sum())

    @property
    def rho(self) -> float:
        """Weight of the REINFORCE term (1 - weight of the dynamics term)."""
        return {"reinforce": 1.0, "dynamics": 0.0, "both": 1.0 - self.actor_grad_mix}[self.actor_grad]

    def _imagine(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, TensorDict]:
        """Start states and the ``[N, H]`` imagined rollout."""
        keys, env = self.tensor_keys, self.model_based_env
        gamma = self.value_estimator.gamma
        _, _, terminal = transition_targets(
            tensordict.get(keys.reward), tensordict.get(keys.terminated), tensordict.get(keys.is_init)
        )
        # the start's discount is the true one, gamma * (1 - terminal), not the head's prediction
        discount = gamma.to(terminal.device) * (1.0 - terminal) if env.has_discount else None
        start = env.start_states(tensordict, discount)
        # shared state is set here, not in the rollouts: they run in several threads at once when sharded
        with hold_out_net(env), set_exploration_type(ExplorationType.RANDOM):
            out = run_sharded(self._rollout, start, self.actor_network.parameters())
        return out.get("start_reward"), out.get("traj")

    def _rollout(self, start: TensorDictBase) -> TensorDict:
        """The reward head at the start states and the ``[n, H]`` rollout from them (per start state)."""
        env = self.model_based_env
        start = env.reset(start)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.actor_grad != "reinforce"):
            start_reward = env.heads.reward(*(start.get(key) for key in env.model_state_keys)).unsqueeze(1)
        traj = env.rollout(
            self.imagination_horizon, self._policy, auto_reset=False, tensordict=start, break_when_any_done=False
        )
        return TensorDict({"start_reward": start_reward, "traj": traj}, start.batch_size[:1])

    def forward(self, tensordict: TensorDictBase) -> tuple[TensorDict, TensorDict]:
        keys, env = self.tensor_keys, self.model_based_env
        state_key, belief_key = env.model_state_keys
        start_reward, traj = self._imagine(tensordict)
        horizon = self.imagination_horizon
        # the slow critic at every imagined state z_0 .. z_H, [N, H + 1]: on the rollout's states and on the last
        # next state (two calls rather than a concatenated copy of all the states)
        last = traj[:, -1:].get("next").select(state_key, belief_key)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.actor_grad != "reinforce"):
            target_value = self.critic_module.target_value
            value = torch.cat([target_value(traj.select(state_key, belief_key)), target_value(last)], 1).float()
        next_reward = traj.get(("next", "reward"))
        reward = torch.cat([start_reward, next_reward[:, :-1]], 1)  # r_0 .. r_{H-1}, the reward at each state
        if env.has_discount:
            discount = torch.cat([traj.get("discount"), traj.get(("next", "discount"))[:, -1:]], 1)  # d_0 .. d_H
        else:
            discount = self.value_estimator.gamma.to(value).expand_as(value)
        returns_in = TensorDict({"reward": reward, "discount": discount[:, :-1]}, traj.batch_size)
        target = self.value_estimator.value_estimate(returns_in, next_value=value[:, 1:])  # V_0 .. V_{H-1}
        weight = discount_weights(discount.transpose(0, 1)).transpose(0, 1)  # w_0 .. w_H

        dist = self.actor_network.build_dist_from_params(traj[:, :-1])  # t = 0 .. H-2
        entropy = dist.entropy()
        objective = self.entropy_scale * entropy
        rho = self.rho
        if rho > 0:
            advantage = (target[:, 1:] - value[:, :-2]).squeeze(-1).detach()
            objective = objective + rho * dist.log_prob(traj[:, :-1].get(self.action_key).detach()) * advantage
        if rho < 1:
            objective = objective + (1 - rho) * target[:, 1:].squeeze(-1)
        actor_loss = -(weight[:, :-2].squeeze(-1) * objective).mean()

        all_rewards = torch.cat([start_reward, next_reward], 1).detach()
        with torch.no_grad():
            # learning health: the slow critic's largest value as a fraction of the largest discounted return the
            # reward scale allows (max |reward| so far / (1 - gamma)); above 1 the critic has diverged
            largest = all_rewards.abs().max().float()
            # a non-finite reward (an update the optimisers skip) must not poison the scale for good
            largest = torch.where(torch.isfinite(largest), largest, torch.zeros_like(largest))
            self.reward_scale.copy_(torch.maximum(self.reward_scale, largest))
            gamma = self.value_estimator.gamma.to(value)
            bound = self.reward_scale.clamp_min(1e-8) / (1.0 - gamma).clamp_min(1e-8)
            advantage_scale = (target[:, 1:] - value[:, :-2]).abs().mean()
        losses = TensorDict(
            {
                "loss_actor": actor_loss,
                "actor_loss": actor_loss.detach(),
                "actor_ent": entropy.detach().mean(),
                "advantage_scale": advantage_scale,
                "reward_mean": all_rewards.mean(),
                "reward_std": all_rewards.std(),
                "reward_max": all_rewards.abs().max(),
                "discount_mean": discount.detach().mean(),
                "discount_min": discount.detach().min(),
                "critic_slow": value.detach().mean(),
                "critic_target": target.detach().mean(),
                "critic_bound": value.detach().abs().max() / bound,
            },
            [],
        )
        if self.discrete_actions:  # a continuous actor's entropy has no maximum it can be a fraction of
            losses.set("actor_ent_fraction", entropy.detach().mean() / self.max_entropy)
        # [N, H] trajectory for the critic: states 0..H-1 with their targets and weights
        trajectory = TensorDict(
            {
                state_key: traj.get(state_key).detach(),
                belief_key: traj.get(belief_key).detach(),
                keys.lambda_target: target.detach(),
                keys.discount_weight: weight[:, :-1],
            },
            [traj.shape[0], horizon],
        )
        return losses, trajectory
