"""Golden values of the DreamerV2 maths against torch.distributions and hand-written loops."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torch import distributions as D

from torchrl_dreamer.objectives import (
    DreamerV2LambdaEstimator,
    balanced_kl_loss,
    bernoulli_nll,
    categorical_entropy,
    categorical_kl,
    discount_weights,
    gaussian_nll,
    transition_targets,
)


def _reference_kl(post, prior):
    """sum over the categoricals of KL(Cat(post) || Cat(prior)), via torch.distributions."""
    q = D.Independent(D.OneHotCategorical(logits=post), 1)
    p = D.Independent(D.OneHotCategorical(logits=prior), 1)
    return D.kl_divergence(q, p)


def test_categorical_kl_matches_torch_distributions():
    post, prior = torch.randn(4, 5, 32, 32), torch.randn(4, 5, 32, 32)
    torch.testing.assert_close(categorical_kl(post, prior), _reference_kl(post, prior))
    ent = D.Independent(D.OneHotCategorical(logits=post), 1).entropy()
    torch.testing.assert_close(categorical_entropy(post), ent)


@pytest.mark.parametrize("free_nats", [0.0, 1.0, 1e3])
def test_balanced_kl_golden(free_nats):
    post, prior = torch.randn(3, 7, 4, 5) * 0.3, torch.randn(3, 7, 4, 5) * 0.3
    kl = _reference_kl(post, prior).mean()
    loss, logged = balanced_kl_loss(post, prior, balance=0.8, free_nats=free_nats)
    # both terms have the same value; the free-nats floor applies to the mean (free_avg)
    expected = 0.8 * max(kl.item(), free_nats) + 0.2 * max(kl.item(), free_nats)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logged.item() == pytest.approx(kl.item(), rel=1e-5)


def test_free_nats_after_averaging_not_per_sample():
    # one sample with a large KL, others ~0: mean above the floor -> no clamp in free_avg mode
    post = torch.zeros(4, 2, 3)
    prior = torch.zeros(4, 2, 3)
    post[0] = torch.tensor([5.0, -5.0, 0.0])
    kl = _reference_kl(post, prior)
    free = kl.mean().item() * 0.5
    loss_avg, _ = balanced_kl_loss(post, prior, free_nats=free, free_avg=True)
    loss_per, _ = balanced_kl_loss(post, prior, free_nats=free, free_avg=False)
    assert loss_avg.item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert loss_per.item() == pytest.approx(kl.clamp_min(free).mean().item(), rel=1e-5)
    assert loss_per.item() > loss_avg.item()


def test_balanced_kl_gradient_routing():
    post = torch.randn(3, 4, 4, 5, requires_grad=True)
    prior = torch.randn(3, 4, 4, 5, requires_grad=True)
    # balance 1: only the prior-training term -> the posterior gets exactly no gradient
    balanced_kl_loss(post, prior, balance=1.0)[0].backward()
    assert prior.grad.abs().sum() > 0
    assert torch.count_nonzero(post.grad) == 0
    post.grad = prior.grad = None
    balanced_kl_loss(post, prior, balance=0.0)[0].backward()
    assert post.grad.abs().sum() > 0
    assert torch.count_nonzero(prior.grad) == 0
    # balance 0.8: each side receives its share of the plain KL gradient
    post.grad = prior.grad = None
    balanced_kl_loss(post, prior, balance=0.8)[0].backward()
    g_post, g_prior = post.grad.clone(), prior.grad.clone()
    post.grad = prior.grad = None
    _reference_kl(post, prior).mean().backward()
    torch.testing.assert_close(g_prior, 0.8 * prior.grad)
    torch.testing.assert_close(g_post, 0.2 * post.grad)


def _loop_lambda_return(reward, value, discount, lmbda):
    horizon = reward.shape[0]
    out = [None] * horizon
    nxt = value[horizon]
    for t in reversed(range(horizon)):
        nxt = reward[t] + discount[t] * ((1 - lmbda) * value[t + 1] + lmbda * nxt)
        out[t] = nxt
    return torch.stack(out)


def _lambda_return(reward, value, discount, lmbda):
    """DreamerV2's estimator on time-major [H] / [H + 1] tensors (it reads [*B, H, 1])."""
    est = DreamerV2LambdaEstimator(gamma=0.999, lmbda=lmbda)
    td = TensorDict({"reward": reward.T[..., None], "discount": discount.T[..., None]}, [reward.shape[1], reward.shape[0]])
    return est.value_estimate(td, next_value=value[1:].T[..., None])[..., 0].T


def test_lambda_return_against_loop_and_hand_values():
    """TorchRL's td_lambda_return_estimate under DreamerV2's index convention (reward and discount at the state)."""
    reward, value, discount = torch.randn(15, 8), torch.randn(16, 8), torch.rand(15, 8)
    torch.testing.assert_close(
        _lambda_return(reward, value, discount, 0.95), _loop_lambda_return(reward, value, discount, 0.95)
    )
    # hand computed, H = 2: V_1 = r_1 + g_1 * v_2; V_0 = r_0 + g_0 * ((1 - l) v_1 + l V_1)
    r, v, g = torch.tensor([[1.0], [2.0]]), torch.tensor([[10.0], [20.0], [30.0]]), torch.tensor([[0.5], [0.9]])
    v1 = 2.0 + 0.9 * 30.0
    v0 = 1.0 + 0.5 * (0.05 * 20.0 + 0.95 * v1)
    torch.testing.assert_close(_lambda_return(r, v, g, 0.95), torch.tensor([[v0], [v1]]))
    # lambda = 0: one-step TD targets; lambda = 1: discounted Monte-Carlo with bootstrap
    torch.testing.assert_close(_lambda_return(r, v, g, 0.0), r + g * v[1:])
    torch.testing.assert_close(_lambda_return(r, v, g, 1.0), torch.tensor([[1 + 0.5 * (2 + 0.9 * 30)], [2 + 0.9 * 30]]))


def test_lambda_return_without_learned_discount_uses_gamma():
    est = DreamerV2LambdaEstimator(gamma=0.5, lmbda=0.0)
    td = TensorDict({"reward": torch.ones(1, 2, 1), "terminated": torch.tensor([[[False], [True]]])}, [1, 2])
    out = est.value_estimate(td, next_value=torch.full((1, 2, 1), 4.0))
    torch.testing.assert_close(out, torch.tensor([[[3.0], [1.0]]]))  # 1 + 0.5 * 4, then 1 + 0 * 4


def test_discount_weights():
    discount = torch.tensor([[0.9], [0.5], [0.1], [0.7]], requires_grad=True)
    w = discount_weights(discount)
    torch.testing.assert_close(w, torch.tensor([[1.0], [0.9], [0.45], [0.045]]))
    assert not w.requires_grad


def test_log_likelihood_terms():
    mean, target = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    expected = -D.Independent(D.Normal(mean, 1.0), 3).log_prob(target)
    torch.testing.assert_close(gaussian_nll(mean, target, event_dims=3), expected)
    logits, soft = torch.randn(10), torch.rand(10)
    expected = -(soft * torch.log(torch.sigmoid(logits)) + (1 - soft) * torch.log(1 - torch.sigmoid(logits)))
    torch.testing.assert_close(bernoulli_nll(logits, soft), expected)
    assert gaussian_nll(torch.zeros(()), torch.zeros(())).item() == pytest.approx(0.5 * math.log(2 * math.pi))


def test_transition_targets_shift():
    next_reward = torch.tensor([[1.0], [2.0], [3.0], [4.0]])[None]
    terminated = torch.tensor([[False], [False], [True], [False]])[None]
    is_init = torch.tensor([[False], [False], [False], [True]])[None]
    reward, mask, terminal = transition_targets(next_reward, terminated, is_init)
    # step t models o_t: reward/terminal entering it are the previous row's outcome
    torch.testing.assert_close(reward[0, :, 0], torch.tensor([0.0, 1.0, 2.0, 0.0]))
    torch.testing.assert_close(mask[0, :, 0], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(terminal[0, :, 0], torch.tensor([0.0, 0.0, 0.0, 0.0]))
    # a terminal observation is the row after the terminating transition
    terminated = torch.tensor([[False], [True], [False], [False]])[None]
    is_init = torch.zeros(1, 4, 1, dtype=torch.bool)
    is_init[0, 0] = True
    reward, mask, terminal = transition_targets(next_reward, terminated, is_init)
    torch.testing.assert_close(terminal[0, :, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(mask[0, :, 0], torch.ones(4))
