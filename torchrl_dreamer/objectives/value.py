"""DreamerV2's lambda-return as a TorchRL value estimator.

TorchRL's :class:`~torchrl.objectives.value.TDLambdaEstimator` reads the reward of the
*transition* ``("next", "reward")`` and one scalar ``gamma``. DreamerV2 indexes the reward
and the discount by *state* (spec section 7, "reward at the same state")::

    V_t = r_t + d_t * ((1 - lambda) * v_{t+1} + lambda * V_{t+1}),    V_H = v_H

with ``r_t`` the reward head at ``z_t`` (the reward entering it), ``d_t`` the learned soft
discount at ``z_t`` and ``v_t`` the slow critic. Once each row of a trajectory carries its
state's ``reward`` and ``discount`` at the root, this is TorchRL's
:func:`~torchrl.objectives.value.functional.td_lambda_return_estimate` with a per-step
``gamma = d_t``, ``reward = r_t`` and ``next_state_value = v_{t+1}``, which is what
:class:`DreamerV2LambdaEstimator` calls.
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.objectives.value import TDLambdaEstimator
from torchrl.objectives.value.functional import td_lambda_return_estimate

__all__ = ["DreamerV2LambdaEstimator"]


class DreamerV2LambdaEstimator(TDLambdaEstimator):
    """TD(lambda) returns with DreamerV2's index convention: reward and discount of the same state.

    Reads, on a ``[*B, T]`` trajectory (time is ``time_dim``, default the last batch dim):

    * ``reward`` (root): ``r_t``, the predicted reward at ``z_t``;
    * ``discount`` (root): ``d_t``; without it ``gamma * (1 - terminated)`` (a constant ``gamma``
      when nothing terminates);
    * ``next_value`` (argument) or ``("next", value_key)``: ``v_{t+1}`` (the last one bootstraps).

    Returns ``V_0 .. V_{T-1}``, ``[*B, T, 1]``. ``gamma`` is thus the discount of the true
    transitions and of models without a discount head; a learned discount already holds
    ``gamma`` (its head learns ``gamma * (1 - terminal)``).

    Keyword Args:
        gamma (float): see above. lmbda (float): ``lambda``.
        differentiable (bool): let gradients flow through the returns (the dynamics actor gradient
            needs it). Default: ``True``.

    Examples:
        >>> from tensordict import TensorDict
        >>> est = DreamerV2LambdaEstimator(gamma=0.5, lmbda=1.0, value_network=None)
        >>> traj = TensorDict({"reward": torch.ones(1, 2, 1), "discount": torch.full((1, 2, 1), 0.5)}, [1, 2])
        >>> est.value_estimate(traj, next_value=torch.tensor([[[2.0], [4.0]]])).flatten().tolist()
        [2.5, 3.0]
    """

    def __init__(self, *, gamma: float, lmbda: float, differentiable: bool = True, **kwargs):
        kwargs.setdefault("value_network", None)
        kwargs["vectorized"] = False
        super().__init__(gamma=gamma, lmbda=lmbda, differentiable=differentiable, **kwargs)

    def value_estimate(
        self,
        tensordict: TensorDictBase,
        target_params: TensorDictBase | None = None,
        next_value: torch.Tensor | None = None,
        time_dim: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        keys = self.tensor_keys
        reward = tensordict.get(keys.reward)
        if next_value is None:
            next_value = tensordict.get(("next", keys.value))
        discount = tensordict.get("discount", None)
        if discount is None:
            terminated = tensordict.get(keys.terminated, None)
            gamma = self.gamma.to(reward.device)
            discount = gamma * torch.ones_like(reward) if terminated is None else gamma * (~terminated).to(reward.dtype)
        done = torch.zeros(reward.shape, dtype=torch.bool, device=reward.device)
        time_dim = self._get_time_dim(time_dim, tensordict)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            return td_lambda_return_estimate(
                discount, self.lmbda.to(reward.device), next_value, reward, done=done, terminated=done,
                time_dim=time_dim,
            )
