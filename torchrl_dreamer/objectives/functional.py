"""Pure tensor maths of DreamerV2: KL balancing, imagination weights, likelihoods, targets.

The lambda-return is TorchRL's ``td_lambda_return_estimate`` (see :mod:`torchrl_dreamer.objectives.value`).

All functions are time-major where time matters (``[T, ...]``).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "categorical_kl",
    "categorical_entropy",
    "balanced_kl_loss",
    "discount_weights",
    "gaussian_nll",
    "bernoulli_nll",
    "transition_targets",
    "REWARD_TRANSFORMS",
    "data_parallel",
    "batch_mean",
]

#: the transforms of the reward targets a world model may be trained on (``tanh`` on Atari, the paper's)
REWARD_TRANSFORMS = {"tanh": torch.tanh, "identity": lambda reward: reward}

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

_DATA_PARALLEL: list = []  # the process group of the data-parallel update running now (data_parallel())


@contextlib.contextmanager
def data_parallel(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Within it, the losses' batch statistics that are not plain means span every rank's batch.

    A data-parallel update (DDP, which averages the ranks' gradients) computes the one-process update of the whole
    batch when every loss term is a mean over equal per-rank batches. Two DreamerV2 terms are not: the reward loss
    is a mean over the rows whose reward is known (their count differs between ranks), and the free-nats
    threshold is applied to the KL's batch mean. Inside this context :func:`batch_mean` sums over the group with a
    differentiable all-reduce, so each rank's loss is the whole batch's and DDP's average of the gradients is the
    whole batch's gradient. The stepper enters it on a rank of a data-parallel learner (``world_size > 1``).

    Args:
        group (ProcessGroup, optional): the data-parallel group. Default: the default group.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("data_parallel() needs an initialised torch.distributed process group.")
    _DATA_PARALLEL.append(group if group is not None else dist.group.WORLD)
    try:
        yield
    finally:
        _DATA_PARALLEL.pop()


def batch_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``values.mean()`` (or the mean where ``mask`` is 1), over the whole data-parallel batch inside
    :func:`data_parallel`: the sums are all-reduced (the numerator differentiably), so every rank gets the same
    mean and its gradient for its own rows, scaled by the group's size to undo DDP's averaging."""
    if not _DATA_PARALLEL and mask is None:
        return values.mean()
    total = values.sum() if mask is None else (values * mask).sum()
    count = torch.tensor(float(values.numel()), device=values.device) if mask is None else mask.sum().detach()
    if _DATA_PARALLEL:
        from torch.distributed.nn.functional import all_reduce  # its backward all-reduces the gradient (sum)

        group = _DATA_PARALLEL[-1]
        with warnings.catch_warnings():  # deprecated for the functional collectives, which do not differentiate
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(total, group=group)
        count = count.clone()
        dist.all_reduce(count, group=group)
    return total / count.clamp_min(1.0)


def categorical_kl(post_logits: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
    """``KL(Cat(post) || Cat(prior))`` summed over the categorical variables.

    Args:
        post_logits (Tensor): ``[..., K, C]``.
        prior_logits (Tensor): ``[..., K, C]``.

    Returns: ``[...]``, the sum over the ``K`` variables of each variable's KL.

    Examples:
        >>> float(categorical_kl(torch.zeros(2, 3), torch.zeros(2, 3)))
        0.0
    """
    post_logp = post_logits.float().log_softmax(-1)
    prior_logp = prior_logits.float().log_softmax(-1)
    return (post_logp.exp() * (post_logp - prior_logp)).sum((-2, -1))


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``K`` independent categoricals ``[..., K, C]``, summed over ``K``."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum((-2, -1))


def balanced_kl_loss(
    post_logits: torch.Tensor,
    prior_logits: torch.Tensor,
    *,
    balance: float = 0.8,
    free_nats: float = 0.0,
    free_avg: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DreamerV2's KL balancing.

    .. math::
        \\mathcal{L} = \\alpha \\max(\\overline{KL}(sg(q) \\| p), f)
                     + (1 - \\alpha) \\max(\\overline{KL}(q \\| sg(p)), f)

    where the bar is the mean over batch and time and ``KL`` sums over the
    categorical variables. The first term trains the prior, the second
    regularises the posterior. With ``free_avg`` (the reference default) the
    free-nats threshold ``f`` is applied after averaging; otherwise per sample.

    Args:
        post_logits (Tensor): posterior logits ``[..., K, C]``.
        prior_logits (Tensor): prior logits ``[..., K, C]``.

    Keyword Args:
        balance (float): ``alpha``, weight of the prior-training term. Default: ``0.8``.
        free_nats (float): ``f``. Default: ``0.0``.
        free_avg (bool): apply ``f`` after averaging. Default: ``True``.

    Returns: ``(loss, kl)``, the balanced loss and the plain mean KL (detached).

    Examples:
        >>> post, prior = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
        >>> loss, kl = balanced_kl_loss(post, prior)
        >>> bool(torch.isclose(loss, kl))
        True
    """
    kl_prior = categorical_kl(post_logits.detach(), prior_logits)
    kl_post = categorical_kl(post_logits, prior_logits.detach())
    if free_avg:  # the mean over the whole batch (every rank's in a data-parallel update: see data_parallel())
        loss_prior = batch_mean(kl_prior).clamp_min(free_nats)
        loss_post = batch_mean(kl_post).clamp_min(free_nats)
    else:
        loss_prior = kl_prior.clamp_min(free_nats).mean()
        loss_post = kl_post.clamp_min(free_nats).mean()
    return balance * loss_prior + (1 - balance) * loss_post, kl_prior.detach().mean()


def discount_weights(discount: torch.Tensor) -> torch.Tensor:
    """Imagination weights ``w_t = prod_{k < t} gamma_k`` (``w_0 = 1``), detached.

    Args:
        discount (Tensor): ``gamma_0 .. gamma_H``, time-major ``[H + 1, ...]``.

    Returns: ``w_0 .. w_H``, ``[H + 1, ...]``.

    Examples:
        >>> discount_weights(torch.tensor([0.5, 0.5, 0.5]))
        tensor([1.0000, 0.5000, 0.2500])
    """
    discount = discount.detach()
    return torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]]), 0)


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor, *, event_dims: int = 0) -> torch.Tensor:
    """``-log N(target; mean, 1)``, summed over the last ``event_dims`` dimensions."""
    nll = 0.5 * (target.float() - mean.float()).pow(2) + _HALF_LOG_2PI
    return nll.sum(tuple(range(-event_dims, 0))) if event_dims else nll


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-[c log sigmoid(l) + (1 - c) log(1 - sigmoid(l))]`` with a soft target ``c``."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")


def transition_targets(
    next_reward: torch.Tensor, next_terminated: torch.Tensor, is_init: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards and terminal flags *entering* each observation of a ``[*B, T, 1]`` sequence.

    Row ``t`` of a TorchRL batch holds ``o_t`` and the outcome of ``a_t``
    (``("next", "reward")``, ``("next", "terminated")``). DreamerV2's step ``t``
    models ``o_t``, so its targets are the previous row's outcome::

        reward_t   = next_reward[t - 1]        (0 where is_init; unknown at t = 0 -> masked)
        terminal_t = next_terminated[t - 1]    (False at t = 0 and where is_init)

    Returns: ``(reward, reward_mask, terminal)``, each ``[*B, T, 1]`` float.
    """
    is_init = is_init.bool()
    first = torch.zeros_like(next_reward[..., :1, :])
    reward = torch.cat([first, next_reward[..., :-1, :]], -2).float()
    terminal = torch.cat([first, next_terminated[..., :-1, :].to(first.dtype)], -2).float()
    reward = reward.masked_fill(is_init, 0.0)
    terminal = terminal.masked_fill(is_init, 0.0)
    mask = torch.ones_like(reward)
    mask[..., 0, :] = is_init[..., 0, :].float()
    return reward, mask, terminal
