"""Typed DreamerV2 hyperparameter presets (``atari``, ``dmc``, ``debug``) that build the components.

The presets reproduce the paper's settings (spec sections 2 and 3). The
library's constructors take explicit keyword arguments; this module is the
only place that maps a config onto them.

Examples:
    >>> cfg = DreamerV2Config.preset("atari", env="atari:Boxing")
    >>> cfg.gamma, cfg.batch_size, cfg.batch_length, cfg.train_every
    (0.999, 16, 50, 16)
    >>> DreamerV2Config.preset("debug").rnn_hidden_dim
    32
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torchrl.data import Composite, TensorSpec

__all__ = ["DreamerV2Config", "PRESETS"]


@dataclass
class DreamerV2Config:
    """All hyperparameters of a DreamerV2 run. Defaults are the paper's Atari preset.

    Schedules (``total_steps``, ``prefill``, ``train_every``, ``eval_every``,
    ``checkpoint_every``, ``log_every``) count agent steps summed over all
    environments; logged x-axes are frames (``action_repeat`` x agent steps).
    """

    # environment
    env: str = "atari:Pong"
    action_repeat: int = 4
    num_envs: int = 1
    # world model
    num_categoricals: int = 32
    num_classes: int = 32
    rnn_hidden_dim: int = 600
    hidden_dim: int = 600
    cnn_depth: int = 48
    mlp_units: int = 400
    mlp_layers: int = 4
    discount_head: bool = True
    # observation keys: None picks them from the env's spec (uint8 [C, H, W] images -> CNN, float vectors -> MLP);
    # otherwise comma-separated keys ("" for none), as the reference's cnn_keys / mlp_keys
    cnn_keys: str | None = None
    mlp_keys: str | None = None
    # world-model loss
    lambda_kl: float = 0.1
    lambda_reco: float = 1.0
    lambda_reward: float = 1.0
    lambda_discount: float = 5.0
    kl_balance: float = 0.8
    free_nats: float = 0.0
    reward_transform: Literal["tanh", "identity"] = "tanh"
    # behaviour
    gamma: float = 0.999
    lmbda: float = 0.95
    imagination_horizon: int = 15
    actor_grad: Literal["reinforce", "dynamics", "both"] = "reinforce"
    actor_grad_mix: float = 0.1
    entropy_scale: float = 1e-3
    min_std: float = 0.1
    target_update_interval: int = 100
    # optimisers
    model_lr: float = 2e-4
    actor_lr: float = 4e-5
    critic_lr: float = 1e-4
    adam_eps: float = 1e-5
    weight_decay: float = 1e-6
    max_grad_norm: float = 100.0
    # data and schedule
    total_steps: int = 50_000_000
    prefill: int = 50_000
    pretrain: int = 1
    train_every: int = 16
    batch_size: int = 16
    batch_length: int = 50
    replay_capacity: int = 2_000_000
    prioritize_ends: bool = True
    # False: episodes shorter than batch_length are trained on too (a sequence that reaches such an episode's end
    # continues at another episode's start; the RSSM resets at is_init). Windows inside episodes of batch_length
    # rows or more are the reference's either way. True: the reference exactly (shorter episodes never sampled).
    strict_length: bool = True
    eval_every: int = 250_000
    eval_episodes: int = 1
    log_every: int = 10_000
    video_every: int = 250_000
    checkpoint_every: int = 100_000
    # execution
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DreamerV2Config:
        """The named preset (``atari``, ``dmc``, ``debug``) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return dataclasses.replace(cls(**PRESETS[name]), **overrides)

    def replace(self, **overrides: Any) -> DreamerV2Config:
        """A copy with some fields changed; unknown names raise ``TypeError``."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- builders -------------------------------------------------------------------------
    def make_models(
        self, observation_spec: Composite, action_spec: TensorSpec, *, device: torch.device | str | None = None
    ):
        """World model, actor, critic and policy for the given specs."""
        from torchrl_dreamer.modules import make_dreamerv2_models

        return make_dreamerv2_models(
            observation_spec,
            action_spec,
            num_categoricals=self.num_categoricals,
            num_classes=self.num_classes,
            rnn_hidden_dim=self.rnn_hidden_dim,
            hidden_dim=self.hidden_dim,
            cnn_depth=self.cnn_depth,
            mlp_units=self.mlp_units,
            mlp_layers=self.mlp_layers,
            discount_head=self.discount_head,
            cnn_keys=_key_list(self.cnn_keys),
            mlp_keys=_key_list(self.mlp_keys),
            min_std=self.min_std,
            device=device,
        )

    def make_loss(self, models):
        """The composite :class:`~torchrl_dreamer.objectives.DreamerV2Loss`."""
        from torchrl_dreamer.objectives import make_dreamerv2_loss

        return make_dreamerv2_loss(
            models,
            lambda_kl=self.lambda_kl,
            lambda_reco=self.lambda_reco,
            lambda_reward=self.lambda_reward,
            lambda_discount=self.lambda_discount,
            kl_balance=self.kl_balance,
            free_nats=self.free_nats,
            reward_transform=self.reward_transform,
            imagination_horizon=self.imagination_horizon,
            gamma=self.gamma,
            lmbda=self.lmbda,
            actor_grad=self.actor_grad,
            actor_grad_mix=self.actor_grad_mix,
            entropy_scale=self.entropy_scale,
        )

    def make_target_updater(self, loss):
        """TorchRL's ``HardUpdate`` of the slow critic, a copy every ``target_update_interval`` updates."""
        from torchrl_dreamer.objectives import make_target_updater

        return make_target_updater(loss.value_loss, interval=self.target_update_interval)

    def make_optimizers(self, loss):
        """The three reference optimisers ``{"model", "actor", "critic"}``."""
        from torchrl_dreamer.trainers import make_dreamerv2_optimizers

        return make_dreamerv2_optimizers(
            loss,
            model_lr=self.model_lr,
            actor_lr=self.actor_lr,
            critic_lr=self.critic_lr,
            eps=self.adam_eps,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )

    def make_stepper(self, loss, optimizers=None):
        """The :class:`~torchrl_dreamer.trainers.DreamerV2OptimizationStepper` of one update."""
        from torchrl_dreamer.trainers import DreamerV2OptimizationStepper

        return DreamerV2OptimizationStepper(
            loss, optimizers if optimizers is not None else self.make_optimizers(loss), precision=self.precision
        )


def _key_list(keys: str | None) -> list[str] | None:
    return None if keys is None else [key.strip() for key in keys.split(",") if key.strip()]


PRESETS: dict[str, dict[str, Any]] = {
    # the paper's Atari settings (spec section 2): the dataclass defaults
    "atari": {},
    # continuous control from pixels (spec section 3)
    "dmc": dict(
        env="dmc:walker-walk",
        action_repeat=2,
        rnn_hidden_dim=200,
        hidden_dim=200,
        lambda_kl=1.0,
        free_nats=1.0,
        discount_head=False,
        reward_transform="identity",
        model_lr=3e-4,
        actor_lr=8e-5,
        critic_lr=8e-5,
        entropy_scale=1e-4,
        gamma=0.99,
        actor_grad="dynamics",
        train_every=5,
        prefill=1000,
        pretrain=100,
        total_steps=500_000,
        eval_every=5_000,
        video_every=50_000,
        log_every=2_500,
        checkpoint_every=25_000,
        eval_episodes=5,
    ),
    # tiny networks on the built-in Catch game: seconds on a CPU
    "debug": dict(
        env="catch",
        action_repeat=1,
        num_categoricals=4,
        num_classes=4,
        rnn_hidden_dim=32,
        hidden_dim=32,
        cnn_depth=4,
        mlp_units=32,
        mlp_layers=2,
        imagination_horizon=5,
        model_lr=1e-3,
        actor_lr=1e-3,
        critic_lr=1e-3,
        total_steps=400,
        prefill=150,
        pretrain=2,
        train_every=10,
        batch_size=4,
        batch_length=10,
        replay_capacity=10_000,
        eval_every=200,
        eval_episodes=2,
        log_every=100,
        video_every=200,
        checkpoint_every=200,
        target_update_interval=10,
        strict_length=False,
    ),
}
