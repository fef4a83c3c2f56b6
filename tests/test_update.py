"""A whole DreamerV2 update on batches collected from a TorchRL mock pixel environment."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchrl.collectors import Collector
from torchrl.data import Unbounded
from torchrl.envs import InitTracker, TransformedEnv, UnaryTransform
from torchrl.testing.mocking_classes import DiscreteActionConvMockEnv

from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
from torchrl_dreamer.objectives import make_dreamerv2_loss, make_target_updater
from torchrl_dreamer.trainers import DreamerV2OptimizationStepper, make_dreamerv2_optimizers


def _to_uint8_16(pixels: torch.Tensor) -> torch.Tensor:
    """Mock 7x7 float frames -> uint8 [1, 16, 16] images."""
    lead = pixels.shape[:-3]
    x = F.interpolate(pixels.reshape(-1, 1, 7, 7), size=(16, 16), mode="nearest")
    return ((x.tanh() + 1) * 127.5).to(torch.uint8).reshape(*lead, 1, 16, 16)


def _mock_env():
    env = DiscreteActionConvMockEnv()
    transform = UnaryTransform(
        in_keys=["pixels"],
        out_keys=["pixels"],
        fn=_to_uint8_16,
        use_raw_nontensor=False,
    )
    env = TransformedEnv(env, transform)
    env.append_transform(InitTracker())
    return env


def _collect(batch=4, steps=10):
    env = _mock_env()
    collector = Collector(env, None, frames_per_batch=batch * steps, total_frames=batch * steps)
    data = next(iter(collector))
    collector.shutdown()
    data = data.reshape(batch, steps)
    data["action"] = data["action"].float()
    return data, env


def test_mock_env_batch_layout():
    data, env = _collect()
    assert data["pixels"].dtype == torch.uint8 and data["pixels"].shape == (4, 10, 1, 16, 16)
    assert ("next", "terminated") in data.keys(True)


def test_full_update_drives_world_model_loss_down():
    torch.manual_seed(0)
    data, env = _collect()
    models = make_dreamerv2_models(env.observation_spec, env.action_spec, **DEBUG_SIZES)
    loss = make_dreamerv2_loss(models, imagination_horizon=5)
    updater = make_target_updater(loss.value_loss, interval=10)
    optimizers = make_dreamerv2_optimizers(loss, model_lr=1e-3, actor_lr=1e-4, critic_lr=1e-3)
    stepper = DreamerV2OptimizationStepper(loss, optimizers)
    actor_before = [p.detach().clone() for p in models.actor_network.parameters()]
    target = loss.value_loss.target_value_network_params["module", "mlp", "0", "weight"]
    history = []
    for i in range(50):
        metrics = stepper.step(None, data.clone())
        updater.step()  # what the trainer's TargetNetUpdaterHook does after each step
        for key in ("model_loss", "actor_loss", "critic_loss", "model_grad_norm"):
            assert torch.isfinite(metrics[key]), (i, key)
        history.append(float(metrics["model_loss"]))
        if i == 0:
            assert torch.equal(target, next(models.critic.parameters()))  # copied after the first update
    # the Gaussian log-likelihoods carry a constant 0.5 log(2 pi) per pixel and per reward:
    # measure the loss above that floor
    floor = 0.5 * math.log(2 * math.pi) * (16 * 16 + 1)
    first, last = sum(history[:5]) / 5 - floor, sum(history[-5:]) / 5 - floor
    assert last < 0.5 * first, (first, last)
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, models.actor_network.parameters()))
    assert updater.counter == (50 - 1) % 10
    assert set(stepper.state_dict()) == {"model", "actor", "critic", "nonfinite_updates"}
