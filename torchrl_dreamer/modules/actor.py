"""The DreamerV2 actor network and its action distributions.

Discrete action specs (one-hot) use a one-hot categorical; continuous specs
(bounded in ``[-1, 1]``) use the reference's truncated normal
``TruncNormal(tanh(mean), 2 * sigmoid(std / 2) + min_std, -1, 1)``.
"""
from __future__ import annotations

import torch
from torch import nn

from torchrl.modules.distributions import OneHotCategorical, TruncatedNormal

from torchrl_dreamer.modules.networks import FeatHead
from torchrl_dreamer.modules.rssm import straight_through_sample

__all__ = ["ActorV2", "DiscreteActorHead", "TruncatedNormalActorHead"]


class DiscreteActorHead(nn.Module):
    """Maps network outputs to categorical logits (identity) and builds the distribution.

    Examples:
        >>> head = DiscreteActorHead(3)
        >>> head.distribution(torch.zeros(2, 3)).sample().shape
        torch.Size([2, 3])
    """

    discrete = True

    def __init__(self, action_dim: int):
        super().__init__()
        self.action_dim = action_dim
        self.num_params = action_dim

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def distribution(self, params: torch.Tensor) -> OneHotCategorical:
        return OneHotCategorical(logits=params.float())

    def sample(self, params: torch.Tensor, *, straight_through: bool) -> torch.Tensor:
        return straight_through_sample(params.float(), straight_through=straight_through)

    def log_prob(self, params: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return (action * params.float().log_softmax(-1)).sum(-1)

    def entropy(self, params: torch.Tensor) -> torch.Tensor:
        logp = params.float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)


class TruncatedNormalActorHead(nn.Module):
    """Bounded normal for actions in ``[-1, 1]`` with a minimum standard deviation.

    ``loc = tanh(mean)``, ``scale = 2 * sigmoid(std / 2) + min_std``, truncated to ``[-1, 1]``.

    Examples:
        >>> head = TruncatedNormalActorHead(2)
        >>> params = head(torch.zeros(5, 4))
        >>> head.distribution(params).rsample().shape
        torch.Size([5, 2])
    """

    discrete = False

    def __init__(self, action_dim: int, *, min_std: float = 0.1):
        super().__init__()
        self.action_dim = action_dim
        self.num_params = 2 * action_dim
        self.min_std = min_std

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        mean, std = out.float().chunk(2, -1)
        return torch.cat([torch.tanh(mean), 2 * torch.sigmoid(std / 2) + self.min_std], -1)

    def distribution(self, params: torch.Tensor) -> TruncatedNormal:
        loc, scale = params.float().chunk(2, -1)
        return TruncatedNormal(loc, scale, low=-1.0, high=1.0, tanh_loc=False)

    def sample(self, params: torch.Tensor, *, straight_through: bool) -> torch.Tensor:
        dist = self.distribution(params)
        return dist.rsample() if straight_through else dist.sample()

    def log_prob(self, params: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.distribution(params).log_prob(action)

    def entropy(self, params: torch.Tensor) -> torch.Tensor:
        return self.distribution(params).entropy()


class ActorV2(nn.Module):
    """Actor network: an MLP on ``[state, belief]`` followed by a distribution head.

    Args:
        state_dim (int): stochastic state size.
        belief_dim (int): deterministic state size.
        action_dim (int): action size.

    Keyword Args:
        discrete (bool): one-hot categorical (True) or truncated normal (False). Default: ``True``.
        num_cells (int): hidden units. Default: ``400``.
        depth (int): hidden layers. Default: ``4``.
        min_std (float): minimum std of the continuous head. Default: ``0.1``.

    Returns: distribution parameters (logits ``[*, A]``, or ``[loc, scale]`` ``[*, 2A]``).

    Examples:
        >>> actor = ActorV2(6, 4, 3, num_cells=8, depth=2)
        >>> actor(torch.zeros(2, 6), torch.zeros(2, 4)).shape
        torch.Size([2, 3])
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
        self.head = DiscreteActorHead(action_dim) if discrete else TruncatedNormalActorHead(action_dim, min_std=min_std)
        self.trunk = FeatHead(state_dim, belief_dim, self.head.num_params, num_cells=num_cells, depth=depth)
        self.discrete = discrete
        self.action_dim = action_dim

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(state, belief))

    def forward_feat(self, feat: torch.Tensor) -> torch.Tensor:
        """Distribution parameters from ``feat = [state, belief]``."""
        return self.head(self.trunk.mlp(feat))
