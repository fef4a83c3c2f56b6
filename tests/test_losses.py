"""DreamerV2 losses: values, gradient routing, keys, target critic, optimiser."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Composite, OneHot, Unbounded

from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
from torchrl_dreamer.objectives import (
    DreamerV2ModelLoss,
    make_dreamerv2_loss,
    make_target_updater,
)
from torchrl_dreamer.trainers import DreamerV2Optimizer

from conftest import make_batch
from test_functional import _loop_lambda_return

PIXELS = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))


def _setup(actor_grad="reinforce", discrete=True, horizon=6, entropy_scale=1e-3):
    spec = OneHot(3) if discrete else Bounded(-1.0, 1.0, (3,))
    models = make_dreamerv2_models(PIXELS, spec, **DEBUG_SIZES)
    loss = make_dreamerv2_loss(
        models, imagination_horizon=horizon, actor_grad=actor_grad, entropy_scale=entropy_scale
    )
    batch = make_batch(2, 5, discrete=discrete)
    return models, loss, batch


def _grads_none(module):
    return all(p.grad is None for p in module.parameters())


def test_model_loss_values_and_diagnostics():
    models, loss, batch = _setup()
    before = set(batch.keys(True))
    out, batch = loss.model_loss(batch)
    assert set(batch.keys(True)) > before  # the model's outputs are in the returned copy...
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    torch.testing.assert_close(total.detach(), out["model_loss"])
    torch.testing.assert_close(out["loss_model_kl"].detach(), 0.1 * out["kl_loss"])
    torch.testing.assert_close(out["loss_model_continue"].detach(), 5.0 * out["discount_loss"])
    for key in DreamerV2ModelLoss.diagnostic_keys:
        assert not out[key].requires_grad, key
    # image loss = -mean_bt sum_pixels log N(x; x_hat, 1)
    target = batch["pixels"].float() / 255 - 0.5
    nll = torch.distributions.Normal(batch["reco_pixels"], 1.0).log_prob(target).sum((-3, -2, -1))
    torch.testing.assert_close(out["image_loss"], -nll.mean().detach())
    # reward target is tanh(r) entering each observation (step 0 masked when not an episode start)
    r = torch.tanh(batch["next", "reward"][:, :-1])
    ll = torch.distributions.Normal(batch["reward_pred"][:, 1:], 1.0).log_prob(r)
    torch.testing.assert_close(out["reward_loss"], -ll.mean().detach())


def test_discount_head_trained_on_terminated_not_truncated():
    models, loss, batch = _setup()
    batch["next", "terminated"][:, 2] = True
    batch["next", "truncated"] = torch.zeros_like(batch["next", "terminated"])
    batch["next", "truncated"][:, 3] = True
    out, batch = loss.model_loss(batch)
    logits = batch["continue_pred"]
    target = torch.full_like(logits, 0.999)
    target[:, 3] = 0.0  # o_3 follows the terminating transition of row 2
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(out["discount_loss"], expected.detach(), rtol=1e-3, atol=1e-3)


def test_every_head_trains_encoder_and_rssm():
    models, loss, batch = _setup()
    out, _ = loss.model_loss(batch)
    wm = models.world_model
    for key in ("loss_model_reco", "loss_model_reward", "loss_model_continue", "loss_model_kl"):
        wm.zero_grad(set_to_none=True)
        out[key].backward(retain_graph=True)
        enc = sum(p.grad.abs().sum() for p in wm.encoder.parameters() if p.grad is not None)
        rssm = sum(p.grad.abs().sum() for p in wm.rssm.parameters() if p.grad is not None)
        assert enc > 0 and rssm > 0, key


def test_kl_trains_prior_and_posterior_separately():
    """With balance 1 the KL reaches only the prior network; with balance 0 only the posterior.

    One-step sequences: over longer ones the prior at t also depends (correctly, as in the
    reference) on the straight-through posterior samples of earlier steps.
    """
    models = make_dreamerv2_models(PIXELS, OneHot(3), **DEBUG_SIZES)
    rssm = models.world_model.rssm
    for balance, trained, untouched in ((1.0, rssm.img_logits, rssm.obs_logits), (0.0, rssm.obs_logits, rssm.img_logits)):
        loss = DreamerV2ModelLoss(models.world_model, kl_balance=balance)
        models.world_model.zero_grad(set_to_none=True)
        loss(make_batch(4, 1))[0]["loss_model_kl"].backward()
        assert trained.bias.grad.abs().sum() > 0
        for p in untouched.parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_model_loss_key_renaming():
    models, loss, batch = _setup()
    batch.rename_key_(("next", "reward"), ("next", "true_reward"))
    with pytest.raises(KeyError):
        loss.model_loss(batch.clone())
    loss.model_loss.set_keys(reward=("next", "true_reward"))
    assert ("next", "true_reward") in loss.model_loss.in_keys
    out, _ = loss.model_loss(batch)
    assert torch.isfinite(out["reward_loss"])
    with pytest.raises(ValueError):
        loss.model_loss.set_keys(not_a_key="x")


def test_model_loss_reads_observation_keys_from_the_world_model():
    spec = Composite(camera=Unbounded((1, 16, 16), dtype=torch.uint8), proprio=Unbounded((3,)))
    models = make_dreamerv2_models(spec, OneHot(3), **DEBUG_SIZES)
    loss = DreamerV2ModelLoss(models.world_model)
    assert loss.in_keys[:2] == ["camera", "proprio"]
    assert {"reco_loss_camera", "reco_loss_proprio"} <= set(loss.out_keys)
    for removed in ("pixels", "reco_pixels"):
        with pytest.raises(ValueError):
            loss.set_keys(**{removed: "x"})
    batch = make_batch(2, 4, obs_key="camera")
    with pytest.raises(KeyError, match="proprio"):
        loss(batch.clone())
    batch["proprio"] = torch.randn(2, 4, 3)
    out, _ = loss(batch)
    assert set(loss.out_keys) == set(out.keys())
    torch.testing.assert_close(out["image_loss"], out["reco_loss_camera"] + out["reco_loss_proprio"])
    # a single entry: no per-entry diagnostics, the same out_keys as before
    single = make_dreamerv2_models(PIXELS, OneHot(3), **DEBUG_SIZES).world_model
    assert not any(k.startswith("reco_loss_") for k in DreamerV2ModelLoss(single).out_keys)


def _capture_rollout(loss):
    captured = {}
    env = loss.actor_loss.model_based_env
    original = env.rollout

    def rollout(*args, **kwargs):
        captured["traj"] = original(*args, **kwargs)
        return captured["traj"]

    env.rollout = rollout
    return captured


def test_actor_loss_reinforce_golden_and_indices():
    models, loss, batch = _setup(horizon=6)
    _, posteriors = loss.model_loss(batch)
    captured = _capture_rollout(loss)
    out, traj = loss.actor_loss(posteriors)
    wm, actor_loss = models.world_model, loss.actor_loss
    rollout = captured["traj"]  # [N, H]
    assert rollout.batch_size == (10, 6)
    with torch.no_grad():
        # time-major states z_0 .. z_H
        s = torch.cat([rollout["state"], rollout["next", "state"][:, -1:]], 1).transpose(0, 1)
        b = torch.cat([rollout["belief"], rollout["next", "belief"][:, -1:]], 1).transpose(0, 1)
        torch.testing.assert_close(s[0], posteriors["state"].reshape(10, -1))  # imagination starts at the posteriors
        reward = wm.reward_head(s, b)
        discount = torch.sigmoid(wm.continue_head(s, b))
        discount[0] = 0.999  # no terminal in the batch
        with loss.value_loss.target_value_network_params.to_module(loss.value_loss.value_network):
            value = loss.value_loss.value_network.module(s, b)
        weight = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]]), 0)
        target = _loop_lambda_return(reward[:-1], value, discount[:-1], 0.95)
        logits = rollout["logits"][:, :-1].transpose(0, 1)
        torch.testing.assert_close(logits, models.actor_network(s[:-2], b[:-2]))  # pi(. | z_t), t = 0 .. H-2
        logp = (rollout["action"][:, :-1].transpose(0, 1) * logits.log_softmax(-1)).sum(-1)
        ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        adv = (target[1:] - value[:-2]).squeeze(-1)  # V_{t+1} - v_t, t = 0..H-2
        expected = -(weight[:-2].squeeze(-1) * (logp * adv + 1e-3 * ent)).mean()
    torch.testing.assert_close(out["loss_actor"].detach(), expected)
    torch.testing.assert_close(out["critic_target"], target.mean())
    assert traj.batch_size == (10, 6)
    torch.testing.assert_close(traj["lambda_target"], target.transpose(0, 1))
    torch.testing.assert_close(traj["discount_weight"], weight[:-1].transpose(0, 1))
    assert actor_loss.rho == 1.0


def test_start_discount_uses_true_terminal():
    models, loss, batch = _setup(horizon=4)
    batch["next", "terminated"][:, 1] = True  # o_2 is terminal
    _, posteriors = loss.model_loss(batch)
    _, traj = loss.actor_loss(posteriors)
    w = traj["discount_weight"].reshape(2, 5, 4, 1)
    assert torch.all(w[:, 2, 1:] == 0)  # nothing after a terminal start state counts
    assert torch.all(w[:, 1, 1:] > 0)


def test_reinforce_leaves_world_model_and_target_without_gradient():
    models, loss, batch = _setup("reinforce")
    _, posteriors = loss.model_loss(batch)
    models.world_model.zero_grad(set_to_none=True)
    out, traj = loss.actor_loss(posteriors)
    out["loss_actor"].backward()
    assert _grads_none(models.world_model)
    assert all(p.grad is None for p in loss.value_loss.target_value_network_params.values(True, True))
    assert _grads_none(models.critic)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.actor_network.parameters())
    assert not traj["state"].requires_grad and not traj["lambda_target"].requires_grad


@pytest.mark.parametrize("actor_grad", ["reinforce", "dynamics", "both"])
def test_actor_input_is_stop_gradient(actor_grad):
    models, loss, batch = _setup(actor_grad)
    _, posteriors = loss.model_loss(batch)
    seen = []
    trunk = models.actor_network.trunk  # FeatHead(state, belief)
    handle = trunk.register_forward_pre_hook(lambda mod, args: seen.extend(a.requires_grad for a in args))
    loss.actor_loss(posteriors)
    handle.remove()
    assert seen and not any(seen)


@pytest.mark.parametrize("discrete", [True, False])
def test_dynamics_gradient_flows_through_imagined_transitions(discrete):
    # no entropy, no REINFORCE term: the only path from the actor to the loss is
    # action -> imagined transition -> reward/discount/value -> lambda-return
    models, loss, batch = _setup("dynamics", discrete=discrete, entropy_scale=0.0)
    _, posteriors = loss.model_loss(batch)
    models.world_model.zero_grad(set_to_none=True)
    out, _ = loss.actor_loss(posteriors)
    out["loss_actor"].backward()
    grad = sum(p.grad.abs().sum() for p in models.actor_network.parameters() if p.grad is not None)
    assert grad > 0
    assert _grads_none(models.world_model)
    assert _grads_none(models.critic)
    # the slow critic carries the gradient through its inputs, never into its parameters
    target = list(loss.value_loss.target_value_network_params.values(True, True))
    assert all(p.grad is None and not p.requires_grad for p in target)
    make_target_updater(loss.value_loss)  # refuses target parameters that are part of a graph
    # with REINFORCE and no entropy the loss is zero-gradient wrt the transitions' parameters too
    models2, loss2, batch2 = _setup("reinforce", discrete=discrete, entropy_scale=0.0)
    _, posteriors2 = loss2.model_loss(batch2)
    out2, _ = loss2.actor_loss(posteriors2)
    assert out2["loss_actor"].grad_fn is not None


def test_critic_target_is_stop_gradient():
    models, loss, batch = _setup()
    target = torch.randn(4, 3, 1, requires_grad=True)
    traj = TensorDict(
        {
            "state": torch.randn(4, 3, 16, requires_grad=True),
            "belief": torch.randn(4, 3, 32, requires_grad=True),
            "lambda_target": target,
            "discount_weight": torch.rand(4, 3, 1),
        },
        [4, 3],
    )
    out = loss.value_loss(traj)
    out["loss_value"].backward()
    assert target.grad is None and traj["state"].grad is None
    assert all(p.grad is not None for p in models.critic.parameters())
    with torch.no_grad():
        v = models.critic.module(traj["state"], traj["belief"])
        expected = (traj["discount_weight"] * 0.5 * (v - target) ** 2).mean()
    torch.testing.assert_close(out["loss_value"].detach(), expected)


def test_target_critic_hard_copy_schedule():
    """TorchRL's HardUpdate, stepped after each update, copies after updates 0, 3, 6 (counting from 0), as the
    reference's update_slow_target at the end of each update."""
    models, loss, _ = _setup()
    updater = make_target_updater(loss.value_loss, interval=3)
    critic_w = next(models.critic.parameters())
    target_w = loss.value_loss.target_value_network_params["module", "mlp", "0", "weight"]
    assert torch.equal(target_w, critic_w) and not target_w.requires_grad
    seen = []
    for done in range(1, 8):
        with torch.no_grad():
            critic_w.add_(1.0)  # the critic after `done` updates
        updater.step()  # the trainer's TargetNetUpdaterHook at post_optim
        seen.append(int(target_w[0, 0] - critic_w[0, 0] + done))  # how many updates the slow critic has seen
    assert seen == [1, 1, 1, 4, 4, 4, 7]
    with pytest.raises(ValueError):
        make_target_updater(loss.value_loss, interval=0)


def test_make_value_estimator_sets_the_lambda_return():
    from torchrl.objectives import ValueEstimators

    models, loss, batch = _setup(horizon=4)
    _, posteriors = loss.model_loss(batch)
    captured = _capture_rollout(loss)
    loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.9, lmbda=0.0)  # one-step targets
    torch.manual_seed(3)
    _, traj = loss.actor_loss(posteriors)
    rollout, wm = captured["traj"], models.world_model
    with torch.no_grad():
        s = torch.cat([rollout["state"], rollout["next", "state"][:, -1:]], 1)
        b = torch.cat([rollout["belief"], rollout["next", "belief"][:, -1:]], 1)
        with loss.value_loss.target_value_network_params.to_module(loss.value_loss.value_network):
            value = loss.value_loss.value_network.module(s, b)
        discount = torch.sigmoid(wm.continue_head(s, b))
        discount[:, 0] = 0.9  # the start: gamma * (1 - terminal), with the estimator's gamma
        expected = wm.reward_head(s, b)[:, :-1] + discount[:, :-1] * value[:, 1:]
    torch.testing.assert_close(traj["lambda_target"], expected)
    assert loss.value_estimator.lmbda == 0.0
    with pytest.raises(NotImplementedError):
        loss.make_value_estimator(ValueEstimators.GAE)
    with pytest.raises(NotImplementedError):
        loss.value_loss.make_value_estimator(ValueEstimators.TDLambda)


def test_composite_loss_single_backward_routes_gradients():
    models, loss, batch = _setup()
    out = loss(batch)
    keys = sorted(k for k in out.keys() if k.startswith("loss_"))
    assert keys == ["loss_actor", "loss_model_continue", "loss_model_kl", "loss_model_reco", "loss_model_reward", "loss_value"]
    # actor loss alone: no world-model or critic gradient
    out["loss_actor"].backward(retain_graph=True)
    assert _grads_none(models.world_model) and _grads_none(models.critic)
    out["loss_value"].backward(retain_graph=True)
    assert _grads_none(models.world_model)
    sum(out[k] for k in keys).backward()
    assert not _grads_none(models.world_model)


def test_reference_optimiser_weight_decay_and_clipping():
    w = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = DreamerV2Optimizer([w], lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    (w * torch.tensor([300.0, 400.0, 0.0, 0.0])).sum().backward()
    opt.step()
    assert float(opt.last_grad_norm) == pytest.approx(500.0)
    # decay not scaled by the lr: 2 * 0.9 = 1.8, then Adam's first step moves by ~lr * sign(g)
    torch.testing.assert_close(w.detach(), torch.tensor([1.8 - 1e-3, 1.8 - 1e-3, 1.8, 1.8]), atol=1e-5, rtol=0)
    assert opt.param_groups[0]["eps"] == 1e-5
    # clipping to norm 1 happened before Adam (Adam is scale-invariant, so check the stored moment)
    exp_avg = opt.state[w]["exp_avg"]
    torch.testing.assert_close(exp_avg, 0.1 * torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_reference_optimiser_leaves_gradients_under_the_clip_untouched():
    grads = torch.tensor([300.0, 400.0, 1e-3, -7.0])
    results = []
    for clip in (None, 1e3):
        w = torch.nn.Parameter(torch.full((4,), 2.0))
        opt = DreamerV2Optimizer([w], lr=1e-3, max_grad_norm=clip)
        w.grad = grads.clone()
        opt.step()
        assert torch.equal(w.grad, grads)  # under the clip the gradients keep their exact values
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_reference_optimiser_runs_fused_adam_with_the_plain_update():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    ref = torch.nn.Linear(5, 3)
    ref.load_state_dict(net.state_dict())
    opt = DreamerV2Optimizer(net.named_parameters(), lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)
    assert all(group["fused"] for group in opt.param_groups)
    plain = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-5, foreach=False)
    for _ in range(3):
        x = torch.randn(8, 5)
        for model, optimiser in ((net, opt), (ref, None)):
            model.zero_grad()
            model(x).square().sum().backward()
            if optimiser is not None:
                optimiser.step()
        grads = [p.grad for p in ref.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        torch._foreach_mul_(grads, (0.5 / (norm + 1e-6)).clamp(max=1.0))
        with torch.no_grad():
            torch._foreach_mul_(list(ref.parameters()), 0.99)
        plain.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("discrete", [True, False])
def test_actor_grad_auto_is_the_reference_choice(discrete):
    """``actor_grad="auto"`` (the default, the reference's ``actor_grad: auto``): REINFORCE for one-hot actions,
    dynamics backpropagation for continuous ones, and the same loss as the explicit choice."""
    models, loss, batch = _setup("auto", discrete=discrete)
    expected = "reinforce" if discrete else "dynamics"
    assert loss.actor_loss.actor_grad == expected and loss.actor_loss.rho == (1.0 if discrete else 0.0)
    assert make_dreamerv2_loss(models).actor_loss.actor_grad == expected  # the builder's default
    from torchrl_dreamer.config import DreamerV2Config

    assert DreamerV2Config().actor_grad == "auto" and DreamerV2Config.preset("dmc").actor_grad == "auto"
    explicit = make_dreamerv2_loss(models, imagination_horizon=6, actor_grad=expected)
    _, posteriors = loss.model_loss(batch)
    torch.manual_seed(3)
    auto_out, _ = loss.actor_loss(posteriors)
    torch.manual_seed(3)
    explicit_out, _ = explicit.actor_loss(posteriors)
    torch.testing.assert_close(auto_out["loss_actor"], explicit_out["loss_actor"])


@pytest.mark.parametrize("discrete", [True, False])
def test_reward_transform_auto_is_the_reference_setting(discrete):
    """``reward_transform="auto"`` (the default): the reference's Atari setting (tanh) for one-hot actions, its DMC
    setting (identity) for continuous ones; the world model's targets and the imagination env agree."""
    models, _, _ = _setup("auto", discrete=discrete)
    loss = make_dreamerv2_loss(models)
    expected = "tanh" if discrete else "identity"
    assert loss.model_loss.reward_transform == expected
    assert loss.actor_loss.model_based_env.reward_transform == expected
    assert make_dreamerv2_loss(models, reward_transform="tanh").model_loss.reward_transform == "tanh"
    from torchrl_dreamer.envs import DreamerV2ImaginationEnv

    action_spec = models.actor.spec[models.actor.dist_sample_keys[0]]
    assert DreamerV2ImaginationEnv(models.world_model, action_spec).reward_transform == expected  # built by hand
    from torchrl_dreamer.config import DreamerV2Config

    assert DreamerV2Config().reward_transform == "auto" and DreamerV2Config.preset("small").reward_transform == "auto"
