"""Imagination in a trained DreamerV2 world model, as a TorchRL environment.

:class:`DreamerV2ImaginationEnv` is a :class:`~torchrl.envs.model_based.ModelBasedEnvBase`
whose ``step`` is the RSSM's prior step followed by the reward and discount heads, so that
any TorchRL policy, loss or rollout can run inside the world model. DreamerV2's own actor
loss imagines through it. TorchRL's :class:`~torchrl.envs.model_based.DreamerEnv` and
:class:`~torchrl.envs.model_based.WorldModelEnv` do not fit: the first decodes ``pixels``
and has no learned discount, the second takes spec templates from a real env and no
termination rule; DreamerV2 needs the learned soft discount and its thresholded
``terminated`` flag.

One step from ``(z_t, h_t)`` under ``a_t``::

    root:  state z_t, belief h_t, action a_t
    next:  state z_{t+1}, belief h_{t+1}
           reward      the reward head at z_{t+1} (the reward entering it)
           discount    the discount head's probability at z_{t+1} (learned towards gamma * (1 - terminal));
                       only with a discount head
           terminated  discount < discount_threshold (always False without a discount head); done = terminated
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torchrl.data import Categorical, Composite, TensorSpec, Unbounded
from torchrl.envs.model_based import ModelBasedEnvBase
from torchrl.envs.transforms import Transform

from torchrl_dreamer.modules.builders import is_discrete_action_spec
from torchrl_dreamer.modules.models import RSSMPriorStepV2, WorldModelV2

# torchrl_dreamer.objectives.functional (REWARD_TRANSFORMS, transition_targets) is imported where it is used: the
# objectives package imports this module (the actor loss imagines in this env)


def _thread_key() -> int:
    """The key of this thread's start states: the thread (shards roll out in several threads at once); one key
    under ``torch.compile``, which runs one thread and cannot trace ``threading.get_ident``."""
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


def _reward_transforms() -> dict:
    from torchrl_dreamer.objectives.functional import REWARD_TRANSFORMS

    return REWARD_TRANSFORMS

__all__ = ["DreamerV2ImaginationEnv", "DecodeObservation", "ImaginationHeads", "InverseRewardTransform"]


class ImaginationHeads(TensorDictModuleBase):
    """The world model's heads on model states: ``reward``, and with a discount head ``discount`` (its
    probability), ``terminated`` (``discount < threshold``) and ``done``.

    Args:
        world_model (WorldModelV2): the model whose heads to use.

    Keyword Args:
        threshold (float): see :class:`DreamerV2ImaginationEnv`. Default: ``0.5``.
        state_keys: the model states read. Default: ``("state", "belief")``.
    """

    def __init__(self, world_model: WorldModelV2, *, threshold: float = 0.5,
                 state_keys: Sequence[NestedKey] = ("state", "belief")):
        super().__init__()
        self.reward_head = world_model.reward_head
        self.continue_head = world_model.continue_head
        self.threshold = threshold
        self.in_keys = list(state_keys)
        self.out_keys = ["reward"] + (["discount", "terminated", "done"] if self.continue_head is not None else [])

    def reward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        """The reward head's prediction at the states (the reward entering them)."""
        return self.reward_head(state, belief).float()

    def discount(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        """The discount head's probability ``sigmoid(logits)`` (it learns ``gamma * (1 - terminal)``)."""
        return torch.sigmoid(self.continue_head(state, belief).float())

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        state, belief = (tensordict.get(key) for key in self.in_keys)
        tensordict.set("reward", self.reward(state, belief))
        if self.continue_head is not None:
            discount = self.discount(state, belief)
            terminated = discount.detach() < self.threshold
            tensordict.set("discount", discount)
            tensordict.set("terminated", terminated)
            tensordict.set("done", terminated.clone())
        return tensordict


class _ImaginationStep(TensorDictModuleBase):
    """The env's step: the RSSM's prior step, then the heads on the new state (one module, few dispatches)."""

    def __init__(self, prior_step: RSSMPriorStepV2, heads: ImaginationHeads):
        super().__init__()
        self.prior_step = prior_step
        self.heads = heads
        self.in_keys = list(prior_step.in_keys)
        self.out_keys = list(dict.fromkeys([*prior_step.out_keys, *heads.out_keys]))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.heads(self.prior_step(tensordict))


class DreamerV2ImaginationEnv(ModelBasedEnvBase):
    """A TorchRL env that imagines with a DreamerV2 world model (see the module docstring for one step).

    **Start states.** Reset it from start states: a tensordict holding ``state`` and ``belief`` (and, optionally,
    each start's ``discount``), for instance :meth:`start_states` of a world-model pass over a replay batch. A
    ``reset()`` without them starts from the RSSM's initial state (zeros, the state before an episode's first
    observation), so that TorchRL's ``check_env_specs`` and stock transforms can reset it like any env.

    **Batch size.** With ``batch_size=()`` (the default) the batch follows the tensordict given to ``reset`` (any
    number of start states). With a batch size, the specs are batched and the env takes exactly that many start
    states: stock reset and step transforms (``RewardSum``, ``InitTracker``, ``StepCounter``...) then work on it.

    **Ends.** ``terminated`` behaves as in a real env: ``rollout`` stops there by default, and with
    ``break_when_any_done=False`` a terminated trajectory restarts (a partial reset) from its start state of the
    last full reset with start states, or from the initial state when there was none (planners such as
    ``CEMPlanner`` roll out from given states without a reset, and mask the rewards after an end). DreamerV2's own
    actor loss sets ``discount_threshold=0``: it imagines the fixed horizon of the reference and weighs the steps
    with the soft discount instead.

    **Rewards** are the reward head's predictions of the *transformed* reward the world model was trained on
    (:attr:`reward_transform`: ``tanh(r)`` on Atari, the paper's, so every imagined reward lies in ``(-1, 1)``).
    :class:`InverseRewardTransform` maps them back to the env's scale.

    Args:
        world_model (WorldModelV2): a (trained) world model; the env holds it and does not train it.
        action_spec (TensorSpec): the real env's action spec (``OneHot`` or ``Bounded`` in ``[-1, 1]``), unbatched.

    Keyword Args:
        discount_threshold (float): ``terminated = discount < discount_threshold``. Default: ``0.5``
            (the head learns ``gamma * (1 - terminal)``, so this reads "more likely to end than not");
            ``0`` never terminates.
        reward_transform (str): the transform of the rewards the world model learnt, ``"tanh"`` or
            ``"identity"`` (the world-model loss's), or ``"auto"``: ``"tanh"`` for a one-hot ``action_spec``,
            ``"identity"`` for a continuous one, as :func:`~torchrl_dreamer.objectives.make_dreamerv2_loss` and
            the config choose. Default: ``"auto"``.
        batch_size (sequence of int): see above. Default: ``()``.
        action_key (NestedKey): where the policy writes the action. Default: ``"action"``.
        state_keys (sequence of two NestedKey): the stochastic and deterministic states. Default:
            ``("state", "belief")``.
        device: Default: the world model's.

    Attributes:
        heads (ImaginationHeads): ``state``/``belief`` -> ``reward`` (and ``discount``, ``terminated``,
            ``done``); what ``step`` runs after the prior step, usable on any state (e.g. the start states).

    Examples:
        >>> from torchrl.data import Composite, OneHot, Unbounded
        >>> from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
        >>> obs = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))
        >>> models = make_dreamerv2_models(obs, OneHot(3), **DEBUG_SIZES)
        >>> env = DreamerV2ImaginationEnv(models.world_model, OneHot(3))
        >>> start = TensorDict({"state": torch.zeros(4, 16), "belief": torch.zeros(4, 32)}, [4])
        >>> with torch.no_grad():
        ...     traj = env.rollout(5, models.actor, tensordict=env.reset(start), auto_reset=False,
        ...                        break_when_any_done=False)
        >>> traj.batch_size, traj["next", "reward"].shape, traj["next", "discount"].shape
        (torch.Size([4, 5]), torch.Size([4, 5, 1]), torch.Size([4, 5, 1]))
        >>> from torchrl.envs import RewardSum, TransformedEnv, check_env_specs
        >>> batched = TransformedEnv(DreamerV2ImaginationEnv(models.world_model, OneHot(3), batch_size=[4]),
        ...                          RewardSum())
        >>> check_env_specs(batched)
    """

    def __init__(
        self,
        world_model: WorldModelV2,
        action_spec: TensorSpec,
        *,
        discount_threshold: float = 0.5,
        reward_transform: str = "auto",
        batch_size: Sequence[int] = (),
        action_key: NestedKey = "action",
        state_keys: Sequence[NestedKey] = ("state", "belief"),
        device: torch.device | str | None = None,
    ):
        if reward_transform == "auto":
            reward_transform = "tanh" if is_discrete_action_spec(action_spec) else "identity"
        if reward_transform not in _reward_transforms():
            raise ValueError(
                f"reward_transform must be one of {sorted(_reward_transforms()) + ['auto']}, got {reward_transform!r}."
            )
        state_key, belief_key = state_keys
        feat = [state_key, belief_key]
        heads = ImaginationHeads(world_model, threshold=discount_threshold, state_keys=feat)
        step = _ImaginationStep(
            RSSMPriorStepV2(world_model.rssm, in_keys=[state_key, belief_key, action_key], out_keys=feat), heads
        )
        if device is None:
            device = next(world_model.parameters()).device
        batch_size = torch.Size(batch_size)
        super().__init__(step, device=device, batch_size=batch_size, allow_done_after_reset=True)
        self.heads = heads
        self.source_world_model = world_model
        self.model_state_keys = list(feat)
        self.discount_threshold = discount_threshold
        self.reward_transform = reward_transform
        # the last full reset's start states, where terminated trajectories restart; per thread, as the shards of a
        # sharded pass (torchrl_dreamer.modules.shards) roll out in several threads at once
        self._starts = {}
        self.has_discount = world_model.continue_head is not None
        rssm = world_model.rssm
        bs = tuple(batch_size)
        obs = {state_key: Unbounded((*bs, rssm.state_dim)), belief_key: Unbounded((*bs, rssm.rnn_hidden_dim))}
        if self.has_discount:
            obs["discount"] = Unbounded((*bs, 1))
        self.observation_spec = Composite(obs, shape=batch_size, device=self.device)
        # the model states are also the step's inputs (as a primer's recurrent states): TorchRL carries them
        self.state_spec = Composite({key: obs[key].clone() for key in feat}, shape=batch_size, device=self.device)
        self.full_action_spec = Composite(
            {action_key: action_spec.clone().expand(*bs, *action_spec.shape)}, shape=batch_size, device=self.device
        )
        self.reward_spec = Unbounded((*bs, 1), device=self.device)
        self.full_done_spec = Composite(
            done=Categorical(2, (*bs, 1), dtype=torch.bool), terminated=Categorical(2, (*bs, 1), dtype=torch.bool),
            shape=batch_size, device=self.device,
        )

    def start_states(
        self, tensordict: TensorDictBase, discount: torch.Tensor | None = None, *, drop_terminal: bool = False
    ) -> TensorDict:
        """Start states from every step of a world-model pass: ``state``/``belief`` of a ``[*B, T]`` tensordict,
        flattened to ``[N]`` and detached (and ``discount`` ``[*B, T, 1]``, flattened, when given).

        Keyword Args:
            drop_terminal (bool): leave out the states of terminal observations (an episode's last row in the
                replay, after a ``terminated`` transition: every imagined step from one ends at once). It reads the
                batch's ``("next", "terminated")`` and ``is_init`` (the observation of row ``t`` is terminal when
                row ``t - 1`` terminated). Default: ``False``.

        Examples:
            >>> from torchrl.data import Composite, OneHot, Unbounded
            >>> from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
            >>> models = make_dreamerv2_models(Composite(obs=Unbounded((3,))), OneHot(2), **DEBUG_SIZES)
            >>> env = DreamerV2ImaginationEnv(models.world_model, OneHot(2))
            >>> posteriors = TensorDict({"state": torch.zeros(2, 5, 16), "belief": torch.zeros(2, 5, 32)}, [2, 5])
            >>> env.start_states(posteriors).batch_size
            torch.Size([10])
        """
        start = TensorDict(
            {key: tensordict.get(key).detach().flatten(0, tensordict.ndim - 1) for key in self.model_state_keys},
            batch_size=[tensordict.batch_size.numel()],
            device=self.device,
        )
        if discount is not None:
            start.set("discount", discount.reshape(-1, 1).to(start.get(self.model_state_keys[0]).dtype))
        if drop_terminal:
            missing = [key for key in (("next", "terminated"), "is_init") if key not in tensordict.keys(True)]
            if missing:
                raise KeyError(f"start_states(drop_terminal=True) reads {missing} from the world model's batch.")
            from torchrl_dreamer.objectives.functional import transition_targets

            terminated = tensordict.get(("next", "terminated"))
            _, _, terminal = transition_targets(torch.zeros_like(terminated, dtype=torch.float32), terminated,
                                                tensordict.get("is_init"))
            start = start[~terminal.reshape(-1).bool()]
        return start

    def _initial(self, batch_size: torch.Size) -> TensorDict:
        """The RSSM's initial (zero) state, for ``batch_size`` rows."""
        state, belief = self.source_world_model.rssm.initial(tuple(batch_size), device=self.device)
        return TensorDict(dict(zip(self.model_state_keys, (state, belief))), batch_size, device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        keys = set(tensordict.keys(True)) if tensordict is not None else set()
        batch = tensordict.batch_size if tensordict is not None and tensordict.batch_size else self.batch_size
        if "_reset" in keys:
            # a partial reset during a rollout: the ended trajectories restart from their start states (those of the
            # last full reset in this thread), or from the initial state
            starts = self._starts.get(_thread_key())
            if starts is not None and starts.batch_size == batch:
                return starts.clone()
            return self._with_heads(self._initial(batch), None)
        if not all(key in keys for key in self.model_state_keys):
            if keys & set(self.model_state_keys):
                raise ValueError(
                    f"DreamerV2ImaginationEnv.reset needs all the start states {self.model_state_keys} (got only "
                    f"{sorted(map(str, keys & set(self.model_state_keys)))}): pass "
                    "env.start_states(world_model_output)."
                )
            out = self._with_heads(self._initial(batch), None)  # no start states: the initial state
        else:  # (TorchRL refuses start states of another batch size than a batched env's)
            out = tensordict.select(*self.model_state_keys, *(["discount"] if "discount" in keys else [])).copy()
            out = self._with_heads(out, out.get("discount", None))
        self._starts[_thread_key()] = out.detach()
        return out

    def _with_heads(self, out: TensorDictBase, discount: torch.Tensor | None) -> TensorDictBase:
        """Adds the start's discount (the head's when not given) and clear end flags."""
        if self.has_discount and discount is None:
            out.set("discount", self.heads.discount(*(out.get(key) for key in self.model_state_keys)))
        zeros = torch.zeros(*out.batch_size, 1, dtype=torch.bool, device=out.device)
        out.set("terminated", zeros)
        out.set("done", zeros.clone())
        return out

    def any_done(self, tensordict: TensorDictBase) -> bool:
        """False without a threshold (``discount_threshold <= 0``): nothing can end, no host sync per step."""
        return self.has_discount and self.discount_threshold > 0 and super().any_done(tensordict)

    def _set_seed(self, seed: int | None) -> None:
        """Imagination draws from torch's global generator."""


class InverseRewardTransform(Transform):
    """Maps imagined rewards back to the env's scale: the inverse of the world model's reward transform.

    A :class:`DreamerV2ImaginationEnv` imagines the reward the world model was trained on, ``tanh(r)`` on Atari
    (:attr:`DreamerV2ImaginationEnv.reward_transform`); this writes ``atanh`` of it (clamped to ``|r| < 1 - eps``)
    back under the same key. With ``"identity"`` it changes nothing.

    Keyword Args:
        reward_transform (str): ``"tanh"`` or ``"identity"``. Default: ``"tanh"``.
        eps (float): margin from ``+-1`` before ``atanh``. Default: ``1e-6``.
        in_keys (sequence of NestedKey): the rewards, as keys of a step's ``next`` entries. Default: ``["reward"]``.

    Examples:
        >>> from torchrl.data import Composite, OneHot, Unbounded
        >>> from torchrl.envs import TransformedEnv
        >>> from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
        >>> models = make_dreamerv2_models(Composite(obs=Unbounded((3,))), OneHot(2), **DEBUG_SIZES)
        >>> inner = DreamerV2ImaginationEnv(models.world_model, OneHot(2))
        >>> env = TransformedEnv(inner, InverseRewardTransform(reward_transform=inner.reward_transform))
        >>> start = TensorDict({"state": torch.zeros(2, 16), "belief": torch.zeros(2, 32)}, [2])
        >>> with torch.no_grad():
        ...     raw = env.rollout(3, tensordict=env.reset(start), auto_reset=False, break_when_any_done=False)
        >>> raw["next", "reward"].shape
        torch.Size([2, 3, 1])
    """

    def __init__(self, *, reward_transform: str = "tanh", eps: float = 1e-6, in_keys=None):
        if reward_transform not in _reward_transforms():
            raise ValueError(
                f"reward_transform must be one of {sorted(_reward_transforms())}, got {reward_transform!r}."
            )
        in_keys = ["reward"] if in_keys is None else list(in_keys)
        super().__init__(in_keys=in_keys, out_keys=list(in_keys))
        self.reward_transform, self.eps = reward_transform, eps

    def _apply_transform(self, reward: torch.Tensor) -> torch.Tensor:
        if self.reward_transform == "identity":
            return reward
        return torch.atanh(reward.clamp(-1 + self.eps, 1 - self.eps))

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset


class DecodeObservation(Transform):
    """Decodes the world model's observation entries from the imagined states (an env transform).

    Writes each observation entry under its own key (e.g. ``pixels``), as the real env shows it: images
    in their own dtype (``uint8`` frames from the decoder's mean mapped back from ``x / 255 - 0.5``, floating ones
    in ``[0, 1]`` from ``x - 0.5``), vectors as floats.

    Args:
        world_model (WorldModelV2): the world model whose decoder to use.

    Keyword Args:
        keys (sequence of NestedKey, optional): the entries to decode. Default: all of ``world_model.obs_keys``.
        state_keys: the model states read. Default: ``("state", "belief")``.

    Examples:
        >>> from torchrl.envs import TransformedEnv
        >>> from torchrl.data import Composite, OneHot, Unbounded
        >>> from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
        >>> models = make_dreamerv2_models(Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8)),
        ...                                OneHot(3), **DEBUG_SIZES)
        >>> env = TransformedEnv(DreamerV2ImaginationEnv(models.world_model, OneHot(3)),
        ...                      DecodeObservation(models.world_model))
        >>> start = TensorDict({"state": torch.zeros(2, 16), "belief": torch.zeros(2, 32)}, [2])
        >>> with torch.no_grad():
        ...     traj = env.rollout(3, tensordict=env.reset(start), auto_reset=False,
        ...                        break_when_any_done=False)
        >>> traj["next", "pixels"].shape, traj["next", "pixels"].dtype
        (torch.Size([2, 3, 1, 16, 16]), torch.uint8)
    """

    def __init__(
        self,
        world_model: WorldModelV2,
        *,
        keys: Sequence[NestedKey] | None = None,
        state_keys: Sequence[NestedKey] = ("state", "belief"),
    ):
        keys = list(world_model.obs_keys if keys is None else keys)
        unknown = [key for key in keys if key not in world_model.obs_keys]
        if unknown:
            raise ValueError(f"DecodeObservation: {unknown} are not observation entries of the world model "
                             f"({world_model.obs_keys}).")
        super().__init__(in_keys=list(state_keys), out_keys=keys)
        self.world_model = [world_model]  # not registered: the env's model, not this transform's
        encoder = world_model.encoder
        self.shapes = {**{k: tuple(s) for k, s in encoder.cnn_shapes.items()},
                       **{k: (n,) for k, n in encoder.mlp_sizes.items()}}
        self.images = dict(encoder.image_dtypes)

    def _decode(self, tensordict: TensorDictBase) -> TensorDictBase:
        state, belief = (tensordict.get(key) for key in self.in_keys)
        decoded = self.world_model[0].decode(state, belief)
        for key in self.out_keys:
            value = decoded[key]
            if self.images.get(key) == torch.uint8:
                value = ((value.float() + 0.5) * 255).clamp(0, 255).round().to(torch.uint8)
            elif key in self.images:
                value = (value + 0.5).clamp(0, 1).to(self.images[key])
            tensordict.set(key, value)
        return tensordict

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._decode(next_tensordict)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._decode(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        for key in self.out_keys:
            dtype = self.images.get(key, torch.float32)
            observation_spec[key] = Unbounded(
                (*observation_spec.shape, *self.shapes[key]), dtype=dtype, device=observation_spec.device
            )
        return observation_spec
