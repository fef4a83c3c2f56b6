"""Composition with the rest of TorchRL: the imagination env, stock losses, user actors, value and target tools,
renamed keys."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import Bounded, Composite, OneHot, Unbounded
from torchrl.envs import TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator
from torchrl.modules.distributions import OneHotCategorical
from torchrl.objectives import A2CLoss, HardUpdate, ValueEstimators
from torchrl.trainers import TargetNetUpdaterHook

from torchrl_dreamer.envs import DecodeObservation, DreamerV2ImaginationEnv
from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
from torchrl_dreamer.objectives import DreamerV2ActorLoss, DreamerV2ValueLoss, make_dreamerv2_loss
from torchrl_dreamer.trainers import DreamerV2OptimizationStepper, make_dreamerv2_optimizers

from conftest import make_batch

PIXELS = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))


def _models(spec=PIXELS, action=OneHot(3)):
    return make_dreamerv2_models(spec, action, **DEBUG_SIZES)


def _starts(models, n=6):
    _, posteriors = make_dreamerv2_loss(models).model_loss(make_batch(2, n // 2))
    return posteriors


def test_imagination_env_step_is_the_prior_step_and_the_heads():
    models = _models()
    wm = models.world_model
    env = DreamerV2ImaginationEnv(wm, OneHot(3), discount_threshold=0.9)
    start = env.start_states(_starts(models))
    assert start.batch_size == (6,) and not start["state"].requires_grad
    td = env.reset(start)
    td["action"] = torch.nn.functional.one_hot(torch.randint(3, (6,)), 3).float()
    torch.manual_seed(5)
    out = env.step(td.clone())
    torch.manual_seed(5)
    with torch.no_grad():
        belief = wm.rssm.deter_step(start["state"], td["action"], start["belief"])
        state = wm.rssm.sample(wm.rssm.prior_logits(belief))
        reward = wm.reward_head(state, belief)
        discount = torch.sigmoid(wm.continue_head(state, belief))
    nxt = out["next"]
    torch.testing.assert_close(nxt["belief"], belief)
    torch.testing.assert_close(nxt["state"], state)
    torch.testing.assert_close(nxt["reward"], reward)
    torch.testing.assert_close(nxt["discount"], discount)
    assert torch.equal(nxt["terminated"], discount < 0.9) and torch.equal(nxt["done"], nxt["terminated"])
    with pytest.raises(ValueError, match="start states"):
        env.reset(TensorDict({"state": torch.zeros(2, 16)}, [2]))


def test_imagination_env_restarts_terminated_trajectories_from_their_start():
    models = _models()
    env = DreamerV2ImaginationEnv(models.world_model, OneHot(3), discount_threshold=1.0)  # every step terminates
    start = env.start_states(_starts(models))
    with torch.no_grad():
        traj = env.rollout(3, models.actor, auto_reset=False, tensordict=env.reset(start), break_when_any_done=False)
    assert traj["next", "terminated"].all()
    for t in range(3):  # each step starts again from the start states
        torch.testing.assert_close(traj["state"][:, t], start["state"])
    with torch.no_grad():
        short = env.rollout(3, models.actor, auto_reset=False, tensordict=env.reset(start))
    assert short.shape == (6, 1)  # a default rollout stops at the first terminated step, as in a real env
    without = DreamerV2ImaginationEnv(models.world_model, OneHot(3), discount_threshold=0.0)
    with torch.no_grad():
        traj = without.rollout(4, models.actor, auto_reset=False, tensordict=without.reset(start))
    assert traj.shape == (6, 4) and not traj["next", "terminated"].any()


def test_decode_observation_transform_and_no_discount_head():
    spec = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8), vec=Unbounded((3,)))
    models = make_dreamerv2_models(spec, OneHot(3), discount_head=False, **DEBUG_SIZES)
    env = TransformedEnv(DreamerV2ImaginationEnv(models.world_model, OneHot(3)), DecodeObservation(models.world_model))
    assert "discount" not in env.observation_spec.keys()
    assert env.observation_spec["pixels"].dtype == torch.uint8 and env.observation_spec["vec"].shape[-1] == 3
    start = TensorDict({"state": torch.zeros(2, 16), "belief": torch.zeros(2, 32)}, [2])
    with torch.no_grad():
        traj = env.rollout(3, models.actor, auto_reset=False, tensordict=env.reset(start))
        decoded = models.world_model.decode(traj["next", "state"], traj["next", "belief"])
    assert traj.shape == (2, 3) and not traj["next", "terminated"].any()
    expected = ((decoded["pixels"] + 0.5) * 255).clamp(0, 255).round().to(torch.uint8)
    assert torch.equal(traj["next", "pixels"], expected)
    torch.testing.assert_close(traj["next", "vec"], decoded["vec"])
    with pytest.raises(ValueError, match="not observation entries"):
        DecodeObservation(models.world_model, keys=["camera"])


def test_dreamer_actor_is_a_torchrl_probabilistic_actor():
    for spec in (OneHot(3), Bounded(-1.0, 1.0, (2,))):
        models = _models(action=spec)
        actor = models.actor
        assert isinstance(actor, ProbabilisticActor)
        td = TensorDict({"state": torch.zeros(4, 16), "belief": torch.randn(4, 32)}, [4])
        dist = actor.get_dist(td.clone())
        action = dist.rsample()
        assert action.requires_grad and action.shape == (4, spec.shape[-1])
        assert dist.log_prob(action.detach()).shape == (4,) and dist.entropy().shape == (4,)
        assert actor.log_prob(actor(td.clone())).shape == (4,)
        if spec.shape[-1] == 2:
            assert float(dist.scale.detach().min()) >= 0.1  # min std
    # a stock TorchRL loss takes the project's actor (it failed on 'log_prob_keys' before)
    models = _models()
    critic = ValueOperator(MLP(in_features=48, out_features=1, num_cells=[16]), in_keys=["state", "belief"])
    a2c = A2CLoss(models.actor, critic)
    a2c.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.95)
    env = DreamerV2ImaginationEnv(models.world_model, OneHot(3))
    with torch.no_grad():
        traj = env.rollout(5, models.actor, auto_reset=False, tensordict=env.reset(env.start_states(_starts(models))),
                           break_when_any_done=False)
    out = a2c(traj)
    (out["loss_objective"] + out["loss_critic"]).backward()
    assert any(p.grad is not None for p in models.actor_network.parameters())


def test_a_user_actor_trains_under_the_dreamer_actor_loss():
    torch.manual_seed(0)
    models = _models()
    net = MLP(in_features=32, out_features=3, num_cells=[24, 24])
    with torch.no_grad():
        net[-1].bias.copy_(torch.tensor([4.0, 0.0, 0.0]))  # a nearly deterministic start
    user_actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["belief"], out_keys=["logits"]),
        in_keys=["logits"],
        out_keys=["action"],
        distribution_class=OneHotCategorical,
        return_log_prob=False,
    )
    value_loss = DreamerV2ValueLoss(models.critic)
    env = DreamerV2ImaginationEnv(models.world_model, OneHot(3), discount_threshold=0.0)
    loss = DreamerV2ActorLoss(user_actor, env, value_loss, imagination_horizon=5, entropy_scale=1.0)
    loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.99, lmbda=0.95)
    posteriors = _starts(models, 8)
    optim = torch.optim.Adam(user_actor.parameters(), lr=1e-2)
    entropies = []
    for _ in range(30):
        out, traj = loss(posteriors)
        optim.zero_grad()
        out["loss_actor"].backward()
        assert all(p.grad is None for p in models.world_model.parameters())
        optim.step()
        entropies.append(float(out["actor_ent"]))
    # with a large entropy bonus the user's actor moves towards the uniform policy (entropy log 3 = 1.0986)
    assert entropies[0] < 0.5 and entropies[-1] > 0.9
    assert traj.batch_size == (8, 5)
    with pytest.raises(TypeError, match="ProbabilisticTensorDictSequential"):
        DreamerV2ActorLoss(models.actor_network, env, value_loss)


def test_hard_update_and_target_net_updater_hook_attach():
    models = _models()
    loss = make_dreamerv2_loss(models)
    updater = HardUpdate(loss.value_loss, value_network_update_interval=1)
    hook = TargetNetUpdaterHook(updater)
    target = loss.value_loss.target_value_network_params["module", "mlp", "0", "weight"]
    with torch.no_grad():
        next(models.critic.parameters()).add_(1.0)
    hook()
    assert not torch.equal(target, next(models.critic.parameters()))
    hook()  # HardUpdate copies once its counter reaches the interval
    assert torch.equal(target, next(models.critic.parameters()))


def test_renamed_keys_reach_every_module_and_a_full_update_runs():
    torch.manual_seed(0)
    spec = Composite(camera=Unbounded((1, 16, 16), dtype=torch.uint8))
    models = make_dreamerv2_models(spec, OneHot(3), **DEBUG_SIZES)
    loss = make_dreamerv2_loss(models, imagination_horizon=4)
    batch = make_batch(2, 5, obs_key="camera")
    batch.rename_key_("camera", "rgb")
    batch.rename_key_("action", ("agent", "act"))
    batch.rename_key_(("next", "reward"), ("next", "r"))
    batch.rename_key_(("next", "terminated"), ("next", "term"))
    batch.rename_key_("is_init", "first")
    with pytest.raises(KeyError):
        loss.model_loss(batch)
    loss.set_keys(camera="rgb", action=("agent", "act"), reward=("next", "r"), terminated=("next", "term"),
                  is_init="first")
    assert models.world_model.obs_keys == ["rgb"] and ("agent", "act") in models.world_model.in_keys
    assert loss.actor_loss.tensor_keys.reward == ("next", "r") and loss.actor_loss.tensor_keys.is_init == "first"
    before = batch.clone()
    stepper = DreamerV2OptimizationStepper(loss, make_dreamerv2_optimizers(loss))
    metrics = stepper.step(None, batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert set(batch.keys(True)) == set(before.keys(True))  # the losses wrote nothing into the batch
    assert (batch == before).all()
    with pytest.raises(ValueError, match="not a key"):
        loss.set_keys(pixels="x")
    from torchrl_dreamer.record import open_loop_video

    video = open_loop_video(models.world_model, batch, context=2, num_videos=2)  # reads the renamed keys too
    assert video.shape == (5, 1, 3 * 16, 2 * 16)


# ---- the imagination env as an env -----------------------------------------------------------------------------

def test_imagination_env_with_a_batch_size_takes_stock_transforms():
    """Batched specs: TorchRL's check_env_specs passes and RewardSum, InitTracker and StepCounter work on it; a reset
    without start states starts from the RSSM's initial state; a reset with another batch is refused."""
    from torchrl.envs import Compose, InitTracker, RewardSum, StepCounter, check_env_specs

    models = _models()
    inner = DreamerV2ImaginationEnv(models.world_model, OneHot(3), batch_size=[6], discount_threshold=0.0)
    env = TransformedEnv(inner, Compose(RewardSum(), InitTracker(), StepCounter()))
    with torch.no_grad():
        check_env_specs(env)
        rollout = env.rollout(4, tensordict=env.reset(inner.start_states(_starts(models))), auto_reset=False)
        blank = env.reset()
    assert rollout.batch_size == (6, 4)
    torch.testing.assert_close(rollout["next", "episode_reward"][:, -1], rollout["next", "reward"].sum(1))
    assert rollout["is_init"][:, 0].all() and not rollout["is_init"][:, 1:].any()
    assert rollout["next", "step_count"][:, -1].eq(4).all()
    assert blank["state"].eq(0).all() and blank["belief"].eq(0).all() and blank.batch_size == (6,)
    with pytest.raises(RuntimeError, match="shape==env.batch_size"):  # TorchRL's one line
        inner.reset(inner.start_states(_starts(models, n=4)))


def test_partial_resets_without_a_full_reset_restart_from_the_initial_state():
    """A planner rolls out from given states without a reset: every trajectory ends at once here (threshold 1), and
    the partial resets restart from the initial state instead of failing."""
    models = _models()
    env = DreamerV2ImaginationEnv(models.world_model, OneHot(3), discount_threshold=1.0)
    env._starts.clear()
    starts = env.start_states(_starts(models)).set("discount", torch.ones(6, 1)).set(
        "terminated", torch.zeros(6, 1, dtype=torch.bool)).set("done", torch.zeros(6, 1, dtype=torch.bool))
    with torch.no_grad():
        rollout = env.rollout(3, models.actor, auto_reset=False, tensordict=starts, break_when_any_done=False)
    assert rollout.batch_size == (6, 3) and rollout["next", "done"].all()
    assert rollout["belief"][:, 1:].eq(0).all()  # restarted from the initial state


def test_start_states_can_drop_terminal_observations():
    models = _models()
    loss = make_dreamerv2_loss(models)
    batch = make_batch(2, 5)
    batch["next", "terminated"][0, 2] = True  # row 3 of sequence 0 is an episode's final (terminal) observation
    _, posteriors = loss.model_loss(batch)
    env = DreamerV2ImaginationEnv(models.world_model, OneHot(3))
    kept = env.start_states(posteriors, drop_terminal=True)
    assert kept.batch_size == (9,)
    everything = env.start_states(posteriors)
    torch.testing.assert_close(kept["state"], torch.cat([everything["state"][:3], everything["state"][4:]]))


def test_imagined_rewards_are_the_transformed_ones_and_can_be_mapped_back():
    from torchrl_dreamer.envs import InverseRewardTransform

    models = _models()
    inner = DreamerV2ImaginationEnv(models.world_model, OneHot(3), discount_threshold=0.0)
    assert inner.reward_transform == "tanh" and make_dreamerv2_loss(models).actor_loss.model_based_env.reward_transform == "tanh"
    env = TransformedEnv(inner, InverseRewardTransform(reward_transform=inner.reward_transform))
    starts = inner.start_states(_starts(models))
    torch.manual_seed(1)
    with torch.no_grad():
        squashed = inner.rollout(3, models.actor, tensordict=inner.reset(starts), auto_reset=False)
    torch.manual_seed(1)
    with torch.no_grad():
        raw = env.rollout(3, models.actor, tensordict=env.reset(starts), auto_reset=False)
    torch.testing.assert_close(raw["next", "reward"], torch.atanh(squashed["next", "reward"].clamp(-1 + 1e-6, 1 - 1e-6)))
    with pytest.raises(ValueError, match="reward_transform"):
        DreamerV2ImaginationEnv(models.world_model, OneHot(3), reward_transform="log")


@pytest.mark.parametrize("planner", ["cem", "mppi"])
def test_planners_over_the_imagination_env_act_in_a_continuous_env(planner):
    """TorchRL's CEMPlanner and MPPIPlanner plan over the imagination env (trajectories that end mid-plan included),
    and the planner runs inside the package's acting policy on Pendulum-v1."""
    from torchrl.modules import CEMPlanner, MPPIPlanner
    from tensordict.nn import TensorDictModule

    from torchrl_dreamer.envs import make_env, prepare_env
    from torchrl_dreamer.modules import DreamerV2Policy, RSSMPosteriorStepV2

    real = make_env("gym:Pendulum-v1")
    action_spec = real.action_spec
    models = make_dreamerv2_models(real.observation_spec, action_spec, **DEBUG_SIZES)
    imagination = DreamerV2ImaginationEnv(models.world_model, action_spec, discount_threshold=0.5)
    if planner == "cem":
        plan = CEMPlanner(imagination, planning_horizon=4, optim_steps=2, num_candidates=8, top_k=3)
    else:
        value = TensorDictModule(models.critic.module, in_keys=["state", "belief"], out_keys=["state_value"])
        estimator_loss = make_dreamerv2_loss(models)  # a TD(lambda) estimator reading the critic
        estimator_loss.actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.99, lmbda=0.95)
        from torchrl.objectives.value import TDLambdaEstimator

        plan = MPPIPlanner(imagination, TDLambdaEstimator(gamma=0.99, lmbda=0.95, value_network=value),
                           temperature=1.0, planning_horizon=4, optim_steps=2, num_candidates=8, top_k=3)
    policy = DreamerV2Policy(models.world_model.module[0], RSSMPosteriorStepV2(models.world_model.rssm), plan)
    env = prepare_env(real, policy.make_tensordict_primer())
    env.set_seed(0)
    with torch.no_grad():
        rollout = env.rollout(5, policy)
    assert rollout.batch_size == (5,)
    assert ((rollout["action"] >= -1) & (rollout["action"] <= 1)).all()
    assert rollout["next", "state"].shape == (5, models.world_model.rssm.state_dim)


# ---- functional calls ------------------------------------------------------------------------------------------

def _trajectory(models, n=4, horizon=5):
    rssm = models.world_model.rssm
    return TensorDict({"state": torch.randn(n, horizon, rssm.state_dim), "belief": torch.randn(n, horizon, rssm.rnn_hidden_dim),
                       "lambda_target": torch.randn(n, horizon, 1), "discount_weight": torch.rand(n, horizon, 1)},
                      [n, horizon])


def test_a_parameter_swap_of_the_whole_loss_reaches_every_network():
    """TensorDict.from_module(other).to_module(loss) computes what `other` computes: world model, actor, slow critic
    and the online critic (the value loss runs the critic with the loss's own parameters)."""
    from tensordict import TensorDict as TD

    torch.manual_seed(0)
    loss = make_dreamerv2_loss(_models(), imagination_horizon=4)
    torch.manual_seed(1)
    other = make_dreamerv2_loss(_models(), imagination_horizon=4)
    batch = make_batch(2, 5)
    torch.manual_seed(7)
    expected = other(batch.clone())
    params = TD.from_module(other)
    torch.manual_seed(7)
    with params.to_module(loss):
        swapped = loss(batch.clone())
    for key in ("loss_model_kl", "loss_model_reco", "loss_model_reward", "loss_actor", "loss_value", "critic_slow"):
        torch.testing.assert_close(swapped[key], expected[key], msg=key)
    torch.manual_seed(7)
    assert not torch.allclose(loss(batch.clone())["loss_value"], expected["loss_value"])  # the swap did something


def test_vmap_over_an_ensemble_of_critics_and_torch_func_match_a_hand_swap():
    from tensordict import TensorDict as TD

    models = _models()
    value_loss = make_dreamerv2_loss(models).value_loss
    traj = _trajectory(models)
    base = TD.from_module(value_loss)
    members = []
    for seed in range(3):  # three critics: the same architecture, other weights
        torch.manual_seed(seed)
        member = base.clone()
        for key, value in member["value_network_params"].items(True, True):
            member["value_network_params"].set(key, torch.randn_like(value) * 0.1)
        members.append(member)
    ensemble = torch.stack(members)

    def member_loss(params, trajectory):
        with params.to_module(value_loss):
            return value_loss(trajectory)["loss_value"]

    vmapped = torch.func.vmap(member_loss, (0, None))(ensemble, traj)
    by_hand = []
    for member in members:  # the hand swap: the critic's own weights overwritten in place
        with torch.no_grad():
            saved = [p.clone() for p in models.critic.parameters()]
            for p, new in zip(value_loss.value_network_params.values(True, True),
                              member["value_network_params"].values(True, True)):
                p.copy_(new)
            by_hand.append(value_loss(traj)["loss_value"])
            for p, old in zip(models.critic.parameters(), saved):
                p.copy_(old)
    torch.testing.assert_close(vmapped, torch.stack(by_hand))
