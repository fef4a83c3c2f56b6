"""Builders, TensorDict modules and the acting policy."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, set_interaction_type
from torchrl.collectors import Collector
from torchrl.data import (
    Binary,
    Bounded,
    Categorical,
    Composite,
    MultiCategorical,
    MultiOneHot,
    OneHot,
    Unbounded,
)
from torchrl.envs import InitTracker, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreamer.envs import CatchEnv
from torchrl_dreamer.modules import DEBUG_SIZES, count_parameters, make_dreamerv2_models, select_obs_keys
from torchrl_dreamer.objectives import DreamerV2ModelLoss

from conftest import make_batch


def _pixels(c=1, size=64):
    return Composite(pixels=Unbounded((c, size, size), dtype=torch.uint8))


def test_parameter_counts_at_atari_preset():
    models = make_dreamerv2_models(_pixels(), OneHot(18))
    wm = models.world_model
    expected = {
        "world_model": (count_parameters(wm), 19.98e6),
        "rssm": (count_parameters(wm.rssm), 5.66e6),
        "encoder": (count_parameters(wm.encoder), 1.55e6),
        "decoder": (count_parameters(wm.decoder), 10.50e6),
        "reward": (count_parameters(wm.reward_head), 1.13e6),
        "discount": (count_parameters(wm.continue_head), 1.13e6),
        "actor": (count_parameters(models.actor_network), 1.14e6),
        "critic": (count_parameters(models.critic_network), 1.13e6),
    }
    for name, (got, want) in expected.items():
        assert abs(got - want) / want < 0.01, (name, got, want)


def test_reference_initialisation():
    models = make_dreamerv2_models(_pixels(), OneHot(18), **DEBUG_SIZES)
    for module in models.world_model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            assert torch.count_nonzero(module.bias) == 0
            fan_in = module.weight[0].numel() if not isinstance(module, torch.nn.ConvTranspose2d) else None
            if isinstance(module, torch.nn.Linear):
                bound = (6 / (module.in_features + module.out_features)) ** 0.5
                assert module.weight.abs().max() <= bound + 1e-6
                assert module.weight.abs().max() > 0.8 * bound  # not the torch default kaiming bound
            del fan_in


@pytest.mark.parametrize(
    "obs_spec,action_spec,obs_shape",
    [
        (_pixels(1, 64), OneHot(5), (1, 64, 64)),
        (_pixels(3, 32), Bounded(-1.0, 1.0, (2,)), (3, 32, 32)),
        (_pixels(1, 16), OneHot(3), (1, 16, 16)),
        (_pixels(3, 84), OneHot(3), (3, 84, 84)),
        (Composite(pixels=Unbounded((1, 17, 20), dtype=torch.uint8)), OneHot(3), (1, 17, 20)),
        (Composite(observation=Unbounded((6,))), OneHot(4), (6,)),
        (Composite(observation=Unbounded((6,))), Bounded(-1.0, 1.0, (3,)), (6,)),
    ],
)
def test_world_model_and_actor_shapes(obs_spec, action_spec, obs_shape):
    models = make_dreamerv2_models(obs_spec, action_spec, **DEBUG_SIZES)
    discrete = isinstance(action_spec, OneHot)
    key = "pixels" if len(obs_shape) == 3 else "observation"
    assert models.world_model.reco_keys == {key: f"reco_{key}"}
    batch = make_batch(2, 5, action_dim=action_spec.shape[-1], image=obs_shape, discrete=discrete, obs_key=key)
    out = models.world_model(batch)
    assert out["state"].shape == (2, 5, 16) and out["belief"].shape == (2, 5, 32)
    assert out["prior_logits"].shape == (2, 5, 4, 4)
    assert out[f"reco_{key}"].shape == (2, 5, *obs_shape) and out[f"reco_{key}"].dtype == torch.float32
    assert out["reward_pred"].shape == out["continue_pred"].shape == (2, 5, 1)
    act = models.actor(out.select("state", "belief"))["action"]
    assert act.shape == (2, 5, action_spec.shape[-1])
    if discrete:
        assert torch.equal(act.sum(-1), torch.ones(2, 5, dtype=act.dtype))
    else:
        assert act.abs().max() <= 1.0
    value = models.critic(out.select("state", "belief"))["state_value"]
    assert value.shape == (2, 5, 1)


@pytest.mark.parametrize(
    "action_spec,match",
    [
        (Categorical(4), "one-hot.*categorical_action_encoding=False"),
        (Binary(3), "one-hot.*one OneHot action"),
        (MultiOneHot([2, 3]), "MultiOneHot.*one OneHot action"),
        (MultiCategorical([2, 3]), "MultiCategorical.*one OneHot action"),
        (Bounded(-2.0, 2.0, (2,)), r"\[-1, 1\].*ActionScaling"),
        (Unbounded((2,)), r"\[-1, 1\].*Bounded action spec.*ActionScaling"),
        (Bounded(0, 4, (2,), dtype=torch.int64), "Unsupported action spec.*OneHot"),
    ],
)
def test_unsupported_action_specs_name_the_fix(action_spec, match):
    with pytest.raises(ValueError, match=match) as error:
        make_dreamerv2_models(_pixels(1, 16), action_spec, **DEBUG_SIZES)
    assert "\n" not in str(error.value)


def test_bad_observation_specs_raise_clear_errors():
    with pytest.raises(ValueError, match="at least 16 x 16.*Resize"):
        make_dreamerv2_models(_pixels(1, 8), OneHot(4), **DEBUG_SIZES)
    with pytest.raises(ValueError, match="only at 64 x 64"):
        make_dreamerv2_models(_pixels(1, 48), OneHot(4), full_coverage=False, **DEBUG_SIZES)
    two_sizes = Composite(a=Unbounded((1, 16, 16), dtype=torch.uint8), b=Unbounded((1, 32, 32), dtype=torch.uint8))
    with pytest.raises(ValueError, match="share H x W"):
        make_dreamerv2_models(two_sizes, OneHot(4), **DEBUG_SIZES)
    models = make_dreamerv2_models(_pixels(), OneHot(4), **DEBUG_SIZES)
    with pytest.raises(ValueError, match="Expected images"):
        models.world_model(make_batch(2, 3, action_dim=4, image=(1, 32, 32)))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = make_dreamerv2_models(_pixels(1, 16), OneHot(3), **DEBUG_SIZES)
    torch.manual_seed(1)
    b = make_dreamerv2_models(_pixels(1, 16), OneHot(3), **DEBUG_SIZES)
    for name in ("world_model", "actor", "critic"):
        getattr(b, name).load_state_dict(getattr(a, name).state_dict())
    batch = make_batch(2, 4)
    torch.manual_seed(5)
    out_a = a.world_model(batch.clone())
    torch.manual_seed(5)
    out_b = b.world_model(batch.clone())
    torch.testing.assert_close(out_a["reco_pixels"], out_b["reco_pixels"])
    torch.testing.assert_close(out_a["prior_logits"], out_b["prior_logits"])


def test_policy_exploration_types():
    models = make_dreamerv2_models(_pixels(1, 16), OneHot(3), **DEBUG_SIZES)
    td = TensorDict(
        {"pixels": torch.zeros(64, 1, 16, 16, dtype=torch.uint8), "is_init": torch.ones(64, 1, dtype=torch.bool)}, [64]
    )
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        out = models.policy(td.clone())
        mode = models.actor_network(out["next", "state"], out["next", "belief"]).argmax(-1)  # the posterior's
    assert torch.equal(out["action"].argmax(-1), mode)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        sampled = torch.stack([models.policy(td.clone())["action"].argmax(-1) for _ in range(10)])
    assert (sampled != mode).any()  # sampling, not the mode
    with set_interaction_type(InteractionType.RANDOM):
        assert out["next", "state"].shape == (64, 16)


def test_policy_matches_training_filter():
    """Acting and training see the same thing: filtering a recorded episode step by step with the
    policy's posterior step gives the world model's beliefs on the same sequence."""
    models = make_dreamerv2_models(_pixels(1, 16), OneHot(3), **DEBUG_SIZES)
    batch = make_batch(1, 6)
    batch["is_init"][:, 0] = True
    with torch.no_grad():
        torch.manual_seed(0)
        seq = models.world_model(batch.clone())
        carried = TensorDict({}, [1])
        beliefs = []
        for t in range(6):
            step = batch[:, t].clone()
            step.update(carried)
            encoded = models.policy.module[0](step)
            models.policy.module[1](encoded)
            beliefs.append(encoded["next", "belief"])
            # carry the *training* sample so both paths see the same latent
            carried = TensorDict(
                {"state": seq["state"][:, t], "belief": encoded["next", "belief"], "prev_action": batch["action"][:, t]},
                [1],
            )
    torch.testing.assert_close(torch.stack(beliefs, 1), seq["belief"])


def test_policy_in_collector_carries_state_and_resets():
    env = TransformedEnv(CatchEnv(size=16, seed=0), InitTracker())
    models = make_dreamerv2_models(env.observation_spec, env.action_spec, **DEBUG_SIZES)
    assert models.world_model.obs_keys == ["pixels"]  # Catch's int64 "ball" and "paddle" are not modelled
    env.append_transform(models.policy.make_tensordict_primer())
    collector = Collector(env, models.policy, frames_per_batch=40, total_frames=40)
    data = next(iter(collector))
    collector.shutdown()
    assert data["action"].shape == (40, 3)
    init = data["is_init"].squeeze(-1)
    assert init[0] and init.sum() >= 2  # catch episodes last 15 steps
    # the carried state is the previous step's output, except at episode starts where it is zero
    carried, produced = data["belief"], data["next", "belief"]
    torch.testing.assert_close(carried[1:][~init[1:]], produced[:-1][~init[1:]])
    assert torch.count_nonzero(carried[init]) == 0
    torch.testing.assert_close(data["next", "prev_action"], data["action"].float())
    assert torch.count_nonzero(data["prev_action"][init]) == 0


# ---- observation keys from the spec ----------------------------------------------------------

MIXED = Composite(
    pixels=Unbounded((3, 16, 16), dtype=torch.uint8),
    depth=Unbounded((1, 16, 16), dtype=torch.uint8),
    observation=Unbounded((5,)),
    velocity=Unbounded((2,), dtype=torch.float64),
    ball=Unbounded((2,), dtype=torch.int64),
    frame=Unbounded((3, 16, 16)),  # a float image (in [0, 1], as ToTensorImage gives): chosen too
    matrix=Unbounded((4, 4)),
    scalar=Unbounded(()),
    is_init=Unbounded((1,), dtype=torch.bool),
    state=Unbounded((16,)),
    belief=Unbounded((32,)),
    prev_action=Unbounded((3,)),
    collector=Composite(traj_ids=Unbounded((1,))),
    agent=Composite(position=Unbounded((3,))),
)


def test_select_obs_keys_automatic_rules():
    assert select_obs_keys(MIXED) == (["pixels", "depth", "frame"], ["observation", "velocity", ("agent", "position")])
    # the batch dims of a batched env's spec are not part of the entry's shape
    batched = Composite(pixels=Unbounded((4, 1, 16, 16), dtype=torch.uint8), observation=Unbounded((4, 3)), shape=(4,))
    assert select_obs_keys(batched) == (["pixels"], ["observation"])


def test_select_obs_keys_explicit_lists_override_and_are_checked():
    assert select_obs_keys(MIXED, cnn_keys=["frame"], mlp_keys=[]) == (["frame"], [])
    assert select_obs_keys(MIXED, cnn_keys=[], mlp_keys=["ball", ("agent", "position")]) == (
        [],
        ["ball", ("agent", "position")],
    )
    with pytest.raises(ValueError, match=r"cnn_keys: 'nope' is not in the observation spec \(available: 'pixels'"):
        select_obs_keys(MIXED, cnn_keys=["nope"])
    with pytest.raises(ValueError, match=r"mlp_keys: 'pixels' has shape \[3, 16, 16\].*\[d\].*'observation' \[5\]"):
        select_obs_keys(MIXED, mlp_keys=["pixels"])
    with pytest.raises(ValueError, match=r"cnn_keys: 'matrix' has shape \[4, 4\]"):
        select_obs_keys(MIXED, cnn_keys=["matrix"])
    with pytest.raises(ValueError, match="No observation to model.*'ball' \\[2\\] int64"):
        select_obs_keys(Composite(ball=Unbounded((2,), dtype=torch.int64)))


def test_vector_env_models_like_cartpole():
    """A CartPole-like spec: float "observation" [4], two one-hot actions; loss and policy run and train."""
    spec = Composite(observation=Unbounded((4,)), is_init=Unbounded((1,), dtype=torch.bool))
    models = make_dreamerv2_models(spec, OneHot(2), **DEBUG_SIZES)
    wm = models.world_model
    assert (wm.cnn_keys, wm.mlp_keys, wm.reco_keys) == ([], ["observation"], {"observation": "reco_observation"})
    batch = make_batch(2, 5, action_dim=2, image=(4,), obs_key="observation")
    out, batch = DreamerV2ModelLoss(wm)(batch)
    target = batch["observation"]
    nll = -torch.distributions.Normal(batch["reco_observation"], 1.0).log_prob(target).sum(-1).mean()
    torch.testing.assert_close(out["image_loss"], nll.detach())
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert all(p.grad is not None for p in wm.encoder.parameters())
    td = TensorDict({"observation": torch.randn(3, 4), "is_init": torch.ones(3, 1, dtype=torch.bool)}, [3])
    assert models.policy(td)["action"].shape == (3, 2)


def test_dict_observation_image_and_vector():
    """Catch with vector_obs: one CNN on "pixels", one MLP on "observation", both reconstructed and trained."""
    env = TransformedEnv(CatchEnv(size=16, seed=0, vector_obs=True), InitTracker())
    models = make_dreamerv2_models(env.observation_spec, env.action_spec, **DEBUG_SIZES)
    wm = models.world_model
    assert wm.obs_keys == ["pixels", "observation"]
    assert wm.reco_keys == {"pixels": "reco_pixels", "observation": "reco_observation"}
    assert wm.encoder.embed_dim == wm.encoder.cnn.embed_dim + wm.encoder.mlp.embed_dim
    env.append_transform(models.policy.make_tensordict_primer())
    rollout = env.rollout(15, models.policy).unsqueeze(0)
    rollout["action"] = rollout["action"].float()
    out, rollout = DreamerV2ModelLoss(wm)(rollout)
    # a rollout is stock transitions: its 15 transitions are read as 16 observations, the final one included
    assert rollout["reco_pixels"].shape == (1, 16, 1, 16, 16) and rollout["reco_observation"].shape == (1, 16, 3)
    parts = {}
    for key in ("pixels", "observation"):
        x = rollout[key].float() / 255 - 0.5 if key == "pixels" else rollout[key]
        nll = -torch.distributions.Normal(rollout[f"reco_{key}"], 1.0).log_prob(x)
        parts[key] = nll.flatten(2).sum(-1).mean()
        torch.testing.assert_close(out[f"reco_loss_{key}"], parts[key].detach())
    torch.testing.assert_close(out["image_loss"], (parts["pixels"] + parts["observation"]).detach())
    out["loss_model_reco"].backward()
    for net in (wm.encoder.cnn, wm.encoder.mlp, wm.decoder.cnn, wm.decoder.mlp):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_open_loop_video_uses_the_first_image_entry():
    from torchrl_dreamer.record import open_loop_video

    spec = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8), observation=Unbounded((3,)))
    wm = make_dreamerv2_models(spec, OneHot(3), **DEBUG_SIZES).world_model
    batch = make_batch(2, 6)
    batch["observation"] = torch.randn(2, 6, 3)
    video = open_loop_video(wm, batch, context=3)
    assert video.dtype == torch.uint8 and video.shape == (6, 1, 3 * 16, 2 * 16)
    assert torch.equal(video[:, :, :16, :16], batch["pixels"][0])  # the truth row
    vectors = make_dreamerv2_models(Composite(observation=Unbounded((3,))), OneHot(3), **DEBUG_SIZES).world_model
    with pytest.raises(ValueError, match="needs an image entry"):
        open_loop_video(vectors, batch)


def test_float_images_in_unit_range_are_encoded_like_their_uint8_frames():
    """Images as TorchRL's ToTensorImage gives them (floats in [0, 1]) are modelled, and encoded, reconstructed
    and scored exactly as their uint8 frames; other leaves are named once, not dropped in silence."""
    import warnings

    from torchrl.data import Bounded, Composite, OneHot, Unbounded

    from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
    from torchrl_dreamer.objectives import DreamerV2ModelLoss

    float_spec = Composite(pixels=Bounded(0.0, 1.0, (1, 16, 16)), lives=Unbounded((1,), dtype=torch.int64))
    uint8_spec = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        float_models = make_dreamerv2_models(float_spec, OneHot(3), **DEBUG_SIZES)
    assert [str(w.message) for w in caught if "does not model" in str(w.message) and "'lives'" in str(w.message)]
    uint8_models = make_dreamerv2_models(uint8_spec, OneHot(3), **DEBUG_SIZES)
    uint8_models.world_model.load_state_dict(float_models.world_model.state_dict())
    assert float_models.world_model.cnn_keys == ["pixels"]
    frames = torch.randint(0, 256, (2, 5, 1, 16, 16), dtype=torch.uint8)
    batch = TensorDict({"action": torch.nn.functional.one_hot(torch.randint(3, (2, 5)), 3).float(),
                        "is_init": torch.zeros(2, 5, 1, dtype=torch.bool),
                        ("next", "reward"): torch.randn(2, 5, 1),
                        ("next", "terminated"): torch.zeros(2, 5, 1, dtype=torch.bool)}, [2, 5])
    out = {}
    for name, models, pixels in (("float", float_models, frames.float() / 255), ("uint8", uint8_models, frames)):
        torch.manual_seed(0)
        out[name], _ = DreamerV2ModelLoss(models.world_model)(batch.clone().set("pixels", pixels))
    torch.testing.assert_close(out["float"]["image_loss"], out["uint8"]["image_loss"])
    torch.testing.assert_close(out["float"]["model_loss"], out["uint8"]["model_loss"])
    # bounds that say the floats are not in [0, 1] are refused with one line
    with pytest.raises(ValueError, match=r"bounds \[0, 255\].*ToTensorImage"):
        make_dreamerv2_models(Composite(pixels=Bounded(0.0, 255.0, (1, 16, 16))), OneHot(3), **DEBUG_SIZES)
