"""The DreamerV2 actor: a TorchRL :class:`~torchrl.modules.ProbabilisticActor` on ``[state, belief]``.

Discrete action specs (one-hot) use a one-hot categorical whose reparameterised
sample is straight-through (``sample + probs - sg(probs)``, as the reference's
``OneHotDist``); continuous specs (bounded in ``[-1, 1]``) use TorchRL's
:class:`~torchrl.modules.distributions.TruncatedNormal` with the reference's
parameters ``loc = tanh(mean)``, ``scale = 2 * sigmoid(std / 2) + min_std``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tensordict.nn import InteractionType, TensorDictModule
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import TensorSpec
from torchrl.modules import ProbabilisticActor
from torchrl.modules.distributions import OneHotCategorical, TruncatedNormal

from torchrl_dreamer.modules.networks import FeatHead
from torchrl_dreamer.modules.rssm import straight_through_sample
from torchrl_dreamer.modules.shards import shard_generator

__all__ = ["ActorV2", "StraightThroughOneHotCategorical", "make_dreamerv2_actor"]


class StraightThroughOneHotCategorical(OneHotCategorical):
    """TorchRL's one-hot categorical, drawing with the RSSM's own sampler.

    ``rsample()`` is TorchRL's pass-through estimator (``sample + probs - sg(probs)``, the
    reference's straight-through action). ``sample()`` returns a float one-hot drawn by
    inverting the cumulative distribution with one uniform number per sample
    (:func:`~torchrl_dreamer.modules.rssm.straight_through_sample`), the sampler of the RSSM's
    latents: unlike ``torch.multinomial`` it traces under ``torch.compile`` and keeps the
    latents and the actions on one random stream.

    Examples:
        >>> dist = StraightThroughOneHotCategorical(logits=torch.zeros(5, 3, requires_grad=True))
        >>> sample = dist.rsample()
        >>> sample.sum(-1).tolist(), sample.requires_grad, dist.sample().requires_grad
        ([1.0, 1.0, 1.0, 1.0, 1.0], True, False)
    """

    @property
    def mode(self) -> torch.Tensor:
        """The one-hot argmax, in the logits' dtype (as samples are)."""
        logits = self.logits
        return (logits == logits.max(-1, True)[0]).to(logits.dtype)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.mode

    def sample(self, sample_shape: torch.Size | Sequence[int] | None = None) -> torch.Tensor:
        logits = self.logits
        if sample_shape:
            logits = logits.expand(*sample_shape, *logits.shape)
        return straight_through_sample(logits.detach(), straight_through=False)


class ActorV2(nn.Module):
    """The actor network: an MLP on ``[state, belief]`` giving the distribution's parameters.

    Args:
        state_dim (int): stochastic state size.
        belief_dim (int): deterministic state size.
        action_dim (int): action size.

    Keyword Args:
        discrete (bool): one-hot categorical logits (True) or truncated-normal ``(loc, scale)`` (False).
            Default: ``True``.
        num_cells (int): hidden units. Default: ``400``.
        depth (int): hidden layers. Default: ``4``.
        min_std (float): minimum std of the continuous distribution. Default: ``0.1``.

    Returns: the logits ``[*, A]``, or ``(loc, scale)`` each ``[*, A]``.

    Examples:
        >>> actor = ActorV2(6, 4, 3, num_cells=8, depth=2)
        >>> actor(torch.zeros(2, 6), torch.zeros(2, 4)).shape
        torch.Size([2, 3])
        >>> loc, scale = ActorV2(6, 4, 3, discrete=False, num_cells=8, depth=2)(torch.zeros(2, 6), torch.zeros(2, 4))
        >>> bool((scale >= 0.1).all())
        True
    """

    def __init__(
        self,
        state_dim: int,
        belief_dim: int,
        action_dim: int,
        *,
        discrete: bool = True,
        num_cells: int = 400,
        depth: int = 4,
        min_std: float = 0.1,
    ):
        super().__init__()
        self.discrete = discrete
        self.action_dim = action_dim
        self.min_std = min_std
        out = action_dim if discrete else 2 * action_dim
        self.trunk = FeatHead(state_dim, belief_dim, out, num_cells=num_cells, depth=depth)

    def forward(self, state: torch.Tensor, belief: torch.Tensor):
        out = self.trunk(state, belief).float()
        if self.discrete:
            return out
        mean, std = out.chunk(2, -1)
        return torch.tanh(mean), 2 * torch.sigmoid(std / 2) + self.min_std


class _ShardedTruncatedNormal(TruncatedNormal):
    """TorchRL's truncated normal; in a shard of a sharded pass it draws from the shard's generator.

    TorchRL's draws ``uniform_`` from torch's global generator, which shards running in several threads would
    share in whatever order the threads reach it (:mod:`torchrl_dreamer.modules.shards`). The same draw, the same
    inverse CDF; outside shards it is TorchRL's sampling unchanged.
    """

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> torch.Tensor:
        generator = shard_generator()
        if generator is None:
            return super().rsample(torch.Size(sample_shape))
        base = self.base_dist
        shape = base._extended_shape(torch.Size(sample_shape))
        p = base.a.new_empty(shape).uniform_(base._dtype_min_gt_0, base._dtype_max_lt_1, generator=generator)
        return base.icdf(p)

    def sample(self, sample_shape: torch.Size | Sequence[int] = ()) -> torch.Tensor:
        if shard_generator() is None:
            return super().sample(torch.Size(sample_shape))
        with torch.no_grad():
            return self.rsample(sample_shape)


def make_dreamerv2_actor(
    network: ActorV2,
    *,
    in_keys: Sequence[NestedKey] = ("state", "belief"),
    action_key: NestedKey = "action",
    spec: TensorSpec | None = None,
) -> ProbabilisticActor:
    """Wraps an :class:`ActorV2` network into a TorchRL :class:`~torchrl.modules.ProbabilisticActor`.

    It samples under TorchRL's ``RANDOM`` exploration type (its default) and takes the mode
    (one-hot argmax, clipped mean) under ``DETERMINISTIC``; ``get_dist``, ``log_prob`` and
    ``build_dist_from_params`` are TorchRL's. Any other ``ProbabilisticTensorDictSequential``
    reading the model state can stand in for it in :class:`~torchrl_dreamer.objectives.DreamerV2ActorLoss`
    and :class:`~torchrl_dreamer.modules.DreamerV2Policy`.

    Examples:
        >>> from tensordict import TensorDict
        >>> actor = make_dreamerv2_actor(ActorV2(6, 4, 3, num_cells=8, depth=2))
        >>> td = actor(TensorDict({"state": torch.zeros(2, 6), "belief": torch.zeros(2, 4)}, [2]))
        >>> td["action"].shape, sorted(td.keys())
        (torch.Size([2, 3]), ['action', 'belief', 'logits', 'state'])
        >>> actor.get_dist(td).entropy().shape
        torch.Size([2])
    """
    if network.discrete:
        params_keys, dist_class, dist_kwargs = ["logits"], StraightThroughOneHotCategorical, {}
    else:
        params_keys, dist_class = ["loc", "scale"], _ShardedTruncatedNormal
        dist_kwargs = {"low": -1.0, "high": 1.0, "tanh_loc": False}
    return ProbabilisticActor(
        TensorDictModule(network, in_keys=list(in_keys), out_keys=params_keys),
        in_keys=params_keys,
        out_keys=[action_key],
        spec=spec,
        distribution_class=dist_class,
        distribution_kwargs=dist_kwargs,
        default_interaction_type=InteractionType.RANDOM,
    )
