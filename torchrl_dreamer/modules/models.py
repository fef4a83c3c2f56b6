"""TensorDict modules of DreamerV2: world model, sequence filter, acting policy.

Key layout of a training batch ``[B, T]`` (TorchRL's transition convention)::

    root:   observation entries o_t (e.g. pixels), action a_t (taken at o_t), is_init
    next:   reward r_{t+1}, terminated                      (outcome of a_t)

Model step ``t`` filters ``o_t`` from ``(z_{t-1}, h_{t-1}, a_{t-1})``, so it
predicts the reward and the terminal flag *entering* ``o_t``, i.e.
``("next", "reward")[t - 1]``: the losses do that shift.  The world model
writes, at root and aligned with ``o_t``: ``encoded_latents``, ``state``
(flattened one-hot ``z_t``), ``belief`` (``h_t``), ``prior_logits``,
``posterior_logits``, one ``reco_<entry>`` per observation entry (e.g.
``reco_pixels``), ``reward_pred``, ``continue_pred`` (discount logits).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import (
    TensorDictModule,
    TensorDictModuleBase,
    TensorDictSequential,
)
from tensordict.utils import NestedKey, unravel_key
from torch import nn

from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer

from torchrl_dreamer.modules.rssm import RSSMV2

__all__ = ["RSSMObserveV2", "RSSMPosteriorStepV2", "RSSMPriorStepV2", "WorldModelV2", "DreamerV2Policy"]


def shift_actions(action: torch.Tensor) -> torch.Tensor:
    """``prev_action[:, t] = action[:, t - 1]`` with zeros at ``t = 0`` (time is dim -2)."""
    return torch.cat([torch.zeros_like(action[..., :1, :]), action[..., :-1, :]], -2)


class RSSMObserveV2(TensorDictModuleBase):
    """Runs :meth:`RSSMV2.observe` over a ``[*B, T]`` tensordict (time is the last batch dim).

    The previous action of step ``t`` is ``action[t - 1]`` (zero at ``t = 0`` and at ``is_init``).

    Args:
        rssm (RSSMV2): the model.

    Keyword Args:
        in_keys: ``[encoded_latents, action, is_init]``.
        out_keys: ``[state, belief, prior_logits, posterior_logits]``.

    Examples:
        >>> from tensordict import TensorDict
        >>> rssm = RSSMV2(action_dim=2, embed_dim=4, num_categoricals=2, num_classes=3, rnn_hidden_dim=5, hidden_dim=5)
        >>> td = TensorDict({"encoded_latents": torch.zeros(3, 7, 4), "action": torch.zeros(3, 7, 2),
        ...                  "is_init": torch.zeros(3, 7, 1, dtype=torch.bool)}, [3, 7])
        >>> RSSMObserveV2(rssm)(td)["state"].shape
        torch.Size([3, 7, 6])
    """

    def __init__(
        self,
        rssm: RSSMV2,
        *,
        in_keys: Sequence[NestedKey] = ("encoded_latents", "action", "is_init"),
        out_keys: Sequence[NestedKey] = ("state", "belief", "prior_logits", "posterior_logits"),
    ):
        super().__init__()
        self.rssm = rssm
        self.in_keys = list(in_keys)
        self.out_keys = list(out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if tensordict.ndim < 1:
            raise ValueError("RSSMObserveV2 needs a tensordict with a time dimension (batch [*B, T]).")
        embed, action, is_init = (tensordict.get(k) for k in self.in_keys)
        lead = tensordict.batch_size
        steps = lead[-1]
        out = self.rssm.observe(
            embed.reshape(-1, steps, embed.shape[-1]),
            shift_actions(action.reshape(-1, steps, action.shape[-1])),
            is_init.reshape(-1, steps, 1),
        )
        for key, name in zip(self.out_keys, ("state", "belief", "prior_logits", "posterior_logits")):
            value = out[name]
            tensordict.set(key, value.reshape(*lead, *value.shape[2:]))
        return tensordict


class WorldModelV2(TensorDictSequential):
    """The DreamerV2 world model: encoder, RSSM filter, decoder, reward and discount heads.

    A :class:`~tensordict.nn.TensorDictSequential` of TensorDictModules; the
    underlying networks are reachable as ``encoder`` (an
    :class:`~torchrl_dreamer.modules.observation.ObsEncoderV2`), ``rssm``,
    ``decoder`` (an :class:`~torchrl_dreamer.modules.observation.ObsDecoderV2`),
    ``reward_head`` and ``continue_head`` (``None`` without a discount head).
    The observation entries it models are ``obs_keys`` (``cnn_keys``, then
    ``mlp_keys``); their reconstructions are written under ``reco_keys``.

    Examples:
        >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
        >>> from torchrl.data import Composite, Unbounded, OneHot
        >>> import torch
        >>> obs = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
        >>> wm = make_dreamerv2_models(obs, OneHot(4), **DEBUG_SIZES).world_model
        >>> wm.obs_keys, wm.reco_keys
        (['pixels'], {'pixels': 'reco_pixels'})
    """

    def __init__(
        self,
        encoder: TensorDictModule,
        rssm: RSSMObserveV2,
        decoder: TensorDictModule,
        reward_head: TensorDictModule,
        continue_head: TensorDictModule | None = None,
    ):
        modules = [encoder, rssm, decoder, reward_head] + ([continue_head] if continue_head is not None else [])
        super().__init__(*modules)
        self.has_continue_head = continue_head is not None

    @property
    def encoder(self) -> nn.Module:
        return self.module[0].module

    @property
    def rssm(self) -> RSSMV2:
        return self.module[1].rssm

    @property
    def decoder(self) -> nn.Module:
        return self.module[2].module

    @property
    def reward_head(self) -> nn.Module:
        return self.module[3].module

    @property
    def continue_head(self) -> nn.Module | None:
        return self.module[4].module if self.has_continue_head else None

    @property
    def obs_keys(self) -> list[NestedKey]:
        """The observation entries encoded and reconstructed: ``cnn_keys`` then ``mlp_keys``."""
        return list(self.module[0].in_keys)

    @property
    def cnn_keys(self) -> list[NestedKey]:
        """The image entries (one CNN over all of them, stacked along channels)."""
        return self.obs_keys[: len(self.encoder.cnn_shapes)]

    @property
    def mlp_keys(self) -> list[NestedKey]:
        """The vector entries (one MLP over all of them, concatenated)."""
        return self.obs_keys[len(self.encoder.cnn_shapes) :]

    @property
    def reco_keys(self) -> dict[NestedKey, NestedKey]:
        """``{observation key: key of its reconstruction}``."""
        return dict(zip(self.obs_keys, self.module[2].out_keys))

    def rename_in_keys(self, mapping: dict[NestedKey, NestedKey]) -> None:
        """Makes every module read ``mapping[key]`` where it read ``key`` (observation entries, ``action``,
        ``is_init``); what the model writes keeps its names.

        Examples:
            >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
            >>> from torchrl.data import Composite, Unbounded, OneHot
            >>> obs = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))
            >>> wm = make_dreamerv2_models(obs, OneHot(4), **DEBUG_SIZES).world_model
            >>> wm.rename_in_keys({"pixels": "camera", "action": ("agent", "action")})
            >>> wm.obs_keys, wm.in_keys
            (['camera'], ['camera', ('agent', 'action'), 'is_init'])
        """
        mapping = {unravel_key(old): unravel_key(new) for old, new in mapping.items()}
        for module in self.module:
            module.in_keys = [mapping.get(key, key) for key in module.in_keys]
        self.in_keys, self.out_keys = self._compute_in_and_out_keys(list(self.module))

    def decode(self, state: torch.Tensor, belief: torch.Tensor) -> dict[NestedKey, torch.Tensor]:
        """The reconstruction of every observation entry from model states, ``{observation key: mean}``."""
        return dict(zip(self.obs_keys, self.decoder(state, belief)))


class RSSMPosteriorStepV2(TensorDictModuleBase):
    """One acting step of the RSSM: ``(z_{t-1}, h_{t-1}, a_{t-1}, o_t) -> (z_t, h_t)``.

    Reads the carried ``state``, ``belief`` and ``prev_action`` (zeros when
    absent) and resets them to zero where ``is_init`` is True, exactly as the
    training filter does at an episode's first observation; writes ``z_t`` and
    ``h_t`` under ``("next", "state")`` and ``("next", "belief")``.

    Args:
        rssm (RSSMV2): the model.

    Keyword Args:
        in_keys: ``[state, belief, prev_action, encoded_latents, is_init]``.
        out_keys: ``[("next", "state"), ("next", "belief")]``.
    """

    def __init__(
        self,
        rssm: RSSMV2,
        *,
        in_keys: Sequence[NestedKey] = ("state", "belief", "prev_action", "encoded_latents", "is_init"),
        out_keys: Sequence[NestedKey] = (("next", "state"), ("next", "belief")),
    ):
        super().__init__()
        self.rssm = rssm
        self.in_keys = list(in_keys)
        self.out_keys = list(out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        state_key, belief_key, action_key, embed_key, init_key = self.in_keys
        embed = tensordict.get(embed_key)
        batch = embed.shape[:-1]
        zero_state, zero_belief = self.rssm.initial(batch, device=embed.device, dtype=embed.dtype)
        state = tensordict.get(state_key, zero_state)
        belief = tensordict.get(belief_key, zero_belief)
        prev_action = tensordict.get(action_key, None)
        if prev_action is None:
            prev_action = torch.zeros(*batch, self.rssm.action_dim, device=embed.device, dtype=embed.dtype)
        is_init = tensordict.get(init_key, None)
        if is_init is not None:
            keep = (~is_init.bool()).to(embed.dtype).reshape(*batch, 1)
            state, belief, prev_action = state * keep, belief * keep, prev_action.to(embed.dtype) * keep
        belief = self.rssm.deter_step(state, prev_action, belief)
        state = self.rssm.sample(self.rssm.posterior_logits(belief, embed), straight_through=False)
        tensordict.set(self.out_keys[0], state)
        tensordict.set(self.out_keys[1], belief)
        return tensordict


class RSSMPriorStepV2(TensorDictModuleBase):
    """One imagined step of the RSSM: ``(z_t, h_t, a_t) -> (z_{t+1}, h_{t+1})`` with the prior.

    ``h_{t+1} = GRU(ELU(W [z_t, a_t]), h_t)`` and ``z_{t+1}`` a straight-through one-hot sample of
    the prior ``p(z | h_{t+1})``. By default it writes over ``state`` and ``belief``, as a
    :class:`~torchrl.envs.model_based.ModelBasedEnvBase` step expects.

    Args:
        rssm (RSSMV2): the model.

    Keyword Args:
        in_keys: ``[state, belief, action]``.
        out_keys: ``[state, belief]``.

    Examples:
        >>> from tensordict import TensorDict
        >>> rssm = RSSMV2(action_dim=2, embed_dim=4, num_categoricals=2, num_classes=3, rnn_hidden_dim=5, hidden_dim=5)
        >>> td = TensorDict({"state": torch.zeros(3, 6), "belief": torch.zeros(3, 5), "action": torch.zeros(3, 2)}, [3])
        >>> RSSMPriorStepV2(rssm)(td)["state"].sum(-1)
        tensor([2., 2., 2.], grad_fn=<SumBackward1>)
    """

    def __init__(
        self,
        rssm: RSSMV2,
        *,
        in_keys: Sequence[NestedKey] = ("state", "belief", "action"),
        out_keys: Sequence[NestedKey] = ("state", "belief"),
    ):
        super().__init__()
        self.rssm = rssm
        self.in_keys = list(in_keys)
        self.out_keys = list(out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        state, belief, action = (tensordict.get(key) for key in self.in_keys)
        belief = self.rssm.deter_step(state, action, belief)
        state = self.rssm.sample(self.rssm.prior_logits(belief))
        tensordict.set(self.out_keys[0], state)
        tensordict.set(self.out_keys[1], belief)
        return tensordict


class _ActOnPosterior(TensorDictModuleBase):
    """Runs an actor that reads ``state``/``belief`` on the posterior ``("next", state)``/``("next", belief)``."""

    def __init__(self, actor: TensorDictModuleBase, action_key: NestedKey):
        super().__init__()
        self.actor = actor
        self.action_key = action_key
        self.in_keys = [unravel_key(("next", key)) for key in actor.in_keys]
        self.out_keys = [action_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        # not strict: an actor may read keys the posterior does not give (a planner over the imagination env reads
        # its observation keys, "discount" among them, and only needs the model state)
        inputs = tensordict.get("next").select(*self.actor.in_keys, strict=False)
        tensordict.set(self.action_key, self.actor(inputs).get(self.action_key))
        return tensordict


class _AsFloat(nn.Module):
    """Carries the action as float32 (one-hot modes come out as integers)."""

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        return action.float()


class DreamerV2Policy(TensorDictSequential):
    """The acting policy: encoder, posterior step, actor; carries ``(z, h, a)`` in the tensordict.

    Per environment step::

        root:  pixels o_t, is_init, state z_{t-1}, belief h_{t-1}, prev_action a_{t-1}
        out:   action a_t, ("next", "state") z_t, ("next", "belief") h_t, ("next", "prev_action") a_t

    Append :meth:`make_tensordict_primer` (and TorchRL's ``InitTracker``) to
    the environment so that collectors carry the recurrent keys between steps.
    ``actor`` is the training actor itself (any ``ProbabilisticTensorDictSequential``
    reading ``state``/``belief``, e.g. :func:`~torchrl_dreamer.modules.make_dreamerv2_actor`):
    it is run on the posterior ``(z_t, h_t)``. It samples under TorchRL's random
    exploration type and takes its mode under the deterministic one; the latent
    ``z_t`` is always sampled, as in the reference.

    Examples:
        >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
        >>> from torchrl.data import Composite, Unbounded, OneHot
        >>> from tensordict import TensorDict
        >>> obs = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
        >>> policy = make_dreamerv2_models(obs, OneHot(4), **DEBUG_SIZES).policy
        >>> td = TensorDict({"pixels": torch.zeros(2, 1, 64, 64, dtype=torch.uint8),
        ...                  "is_init": torch.ones(2, 1, dtype=torch.bool)}, [2])
        >>> policy(td)["action"].shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        encoder: TensorDictModule,
        posterior_step: RSSMPosteriorStepV2,
        actor: TensorDictModuleBase,
        *,
        action_key: NestedKey = "action",
        prev_action_key: NestedKey = "prev_action",
    ):
        copy_action = TensorDictModule(_AsFloat(), in_keys=[action_key], out_keys=[("next", prev_action_key)])
        super().__init__(encoder, posterior_step, _ActOnPosterior(actor, action_key), copy_action)
        self.actor = actor
        self.rssm = posterior_step.rssm
        self.state_keys = posterior_step.in_keys[:3]

    def make_tensordict_primer(self) -> TensorDictPrimer:
        """A primer that registers (and zero-initialises at reset) ``state``, ``belief`` and ``prev_action``."""
        rssm = self.rssm
        sizes = (rssm.state_dim, rssm.rnn_hidden_dim, rssm.action_dim)
        spec = Composite({key: Unbounded((size,)) for key, size in zip(self.state_keys, sizes)})
        return TensorDictPrimer(spec, default_value=0.0, expand_specs=True)
