"""Learning-health metrics of the actor loss and the trainer's warnings while it runs."""
from __future__ import annotations

import math

import torch
from torchrl.data import Bounded, Composite, OneHot, Unbounded

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
from torchrl_dreamer.objectives import make_dreamerv2_loss
from torchrl_dreamer.trainers import health_warnings, make_dreamerv2_trainer

from conftest import make_batch

PIXELS = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))


def _last_linear(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]


def test_health_metrics_measure_the_critic_against_the_reward_scale():
    models = make_dreamerv2_models(PIXELS, OneHot(3), **DEBUG_SIZES)
    loss = make_dreamerv2_loss(models, imagination_horizon=4)
    _, posteriors = loss.model_loss(make_batch(2, 6))
    actor_loss = loss.actor_loss
    assert math.isclose(actor_loss.max_entropy, math.log(3))
    out, _ = actor_loss(posteriors)
    for key in ("actor_ent_fraction", "advantage_scale", "reward_max", "discount_mean", "discount_min", "critic_bound"):
        assert torch.isfinite(out[key]) and not out[key].requires_grad, key
    assert 0.5 < out["actor_ent_fraction"] <= 1.0 + 1e-6  # a fresh actor is near uniform
    assert 0.0 < out["discount_min"] <= out["discount_mean"] <= 1.0
    assert out["critic_bound"] < 1.0 and health_warnings({k: float(v.detach()) for k, v in out.items()}) == []
    # the largest imagined reward so far sets the bound: max |r| / (1 - gamma)
    scale = float(actor_loss.reward_scale)
    assert scale >= float(out["reward_max"]) > 0
    # a non-finite imagined reward (an update the optimisers skip) leaves the scale as it was
    bias = _last_linear(models.world_model.reward_head).bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(float("nan"))
    actor_loss(posteriors)
    assert float(actor_loss.reward_scale) == scale
    with torch.no_grad():
        bias.copy_(saved)
    # a slow critic worth 1e4 per state is far above any return of rewards this small
    target = loss.value_loss.target_value_network_params
    bias = [key for key in target.keys(True, True) if key[-1] == "bias"][-1]
    target.set(bias, target.get(bias) + 1e4)
    out, _ = actor_loss(posteriors)
    expected = 1e4 / (float(actor_loss.reward_scale) / (1 - 0.999))
    assert math.isclose(float(out["critic_bound"]), expected, rel_tol=0.05)
    assert float(out["critic_bound"]) > 1
    (line,) = health_warnings({k: float(v.detach()) for k, v in out.items()})
    assert line.startswith("the critic is diverging")
    # a collapsed discrete actor is reported; a continuous actor's entropy is not compared with a floor
    assert health_warnings({"actor_ent_fraction": 0.01})[0].startswith("the actor's entropy has collapsed")
    assert health_warnings({"actor_ent_fraction": -2.0}, entropy=False) == []
    continuous = make_dreamerv2_models(PIXELS, Bounded(-1.0, 1.0, (2,)), **DEBUG_SIZES)
    assert math.isclose(make_dreamerv2_loss(continuous).actor_loss.max_entropy, 2 * math.log(2.0), rel_tol=1e-6)


def test_trainer_says_while_running_that_the_critic_diverges(tmp_path, capsys):
    config = DreamerV2Config.preset(
        "debug", env="catch", total_steps=260, prefill=100, train_every=20, log_every=60, eval_every=10**9,
        video_every=10**9, checkpoint_every=10**9,
    )
    trainer = make_dreamerv2_trainer(config, tmp_path / "run", device="cpu", progress=False)
    critic = trainer.loss_module.value_loss.value_network
    with torch.no_grad():  # copied into the slow critic after the first update
        _last_linear(critic).bias.add_(1e5)
        _last_linear(critic).weight.zero_()
    trainer.train()
    printed = capsys.readouterr().out
    assert "the critic is diverging" in printed, printed[-2000:]
    rows = (tmp_path / "run" / "scalars" / "critic_bound.csv").read_text().splitlines()
    assert len(rows) > 1 and all(float(row.split(",")[-1]) > 1 for row in rows[1:])
