"""Builders: from environment specs to the DreamerV2 world model, actor, critic and policy.

This is the only place that names tensordict keys for the modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from tensordict.utils import NestedKey
from torchrl.data import Bounded, Categorical, Composite, OneHot, TensorSpec

from torchrl_dreamer.modules.actor import ActorV2
from torchrl_dreamer.modules.models import (
    DreamerV2Policy,
    RSSMObserveV2,
    RSSMPosteriorStepV2,
    WorldModelV2,
    make_probabilistic_actor,
)
from torchrl_dreamer.modules.networks import (
    ConvDecoderV2,
    ConvEncoderV2,
    FeatHead,
    MLPDecoderV2,
    MLPEncoderV2,
)
from torchrl_dreamer.modules.rssm import RSSMV2

__all__ = ["DreamerV2Models", "make_dreamerv2_models", "DEBUG_SIZES", "infer_obs_key", "is_discrete_action_spec"]

#: Small sizes for tests, docs and the ``debug`` preset.
DEBUG_SIZES = dict(
    num_categoricals=4, num_classes=4, rnn_hidden_dim=32, hidden_dim=32, cnn_depth=4, mlp_units=32, mlp_layers=2
)


@dataclass
class DreamerV2Models:
    """The components built by :func:`make_dreamerv2_models`.

    Attributes:
        world_model (WorldModelV2): encoder, RSSM, decoder, reward and discount heads.
        actor (TensorDictSequential): probabilistic actor on ``[state, belief]`` writing ``action``.
        critic (TensorDictModule): value network on ``[state, belief]`` writing ``state_value``.
        policy (DreamerV2Policy): the acting policy for collectors (shares all weights).
    """

    world_model: WorldModelV2
    actor: TensorDictSequential
    critic: TensorDictModule
    policy: DreamerV2Policy

    @property
    def actor_network(self) -> ActorV2:
        """The :class:`ActorV2` network inside :attr:`actor`."""
        return self.actor.module[0].module.actor

    @property
    def critic_network(self) -> FeatHead:
        return self.critic.module


def infer_obs_key(observation_spec: Composite) -> NestedKey:
    """``"pixels"`` when present in the spec, else ``"observation"``."""
    keys = list(observation_spec.keys(True, True))
    for key in ("pixels", "observation"):
        if key in keys:
            return key
    raise ValueError(f"The observation spec has neither 'pixels' nor 'observation' (keys: {keys}); pass obs_key=.")


def is_discrete_action_spec(action_spec: TensorSpec) -> bool:
    """True for one-hot action specs, False for continuous ones bounded in ``[-1, 1]``."""
    if isinstance(action_spec, OneHot):
        return True
    if isinstance(action_spec, Categorical):
        raise ValueError(
            "DreamerV2 needs one-hot discrete actions: build the env with categorical_action_encoding=False "
            "(a OneHot action spec)."
        )
    if isinstance(action_spec, Bounded) and action_spec.dtype.is_floating_point:
        low, high = action_spec.space.low, action_spec.space.high
        if not (torch.allclose(low.float(), torch.tensor(-1.0)) and torch.allclose(high.float(), torch.tensor(1.0))):
            raise ValueError(
                "Continuous actions must be bounded in [-1, 1]; rescale them first (e.g. torchrl's ActionScaling "
                f"or make_env's gym: suite), got low={low.tolist()} high={high.tolist()}."
            )
        return False
    raise ValueError(f"Unsupported action spec {type(action_spec).__name__}: expected OneHot or Bounded[-1, 1].")


def make_dreamerv2_models(
    observation_spec: Composite,
    action_spec: TensorSpec,
    *,
    obs_key: NestedKey | None = None,
    num_categoricals: int = 32,
    num_classes: int = 32,
    rnn_hidden_dim: int = 600,
    hidden_dim: int = 600,
    cnn_depth: int = 48,
    mlp_units: int = 400,
    mlp_layers: int = 4,
    discount_head: bool = True,
    min_std: float = 0.1,
    device: torch.device | str | None = None,
) -> DreamerV2Models:
    """Builds the DreamerV2 components for an environment's specs.

    Image observations (``uint8 [C, H, W]``, H = W in 16/32/64) get the CNN
    encoder/decoder; vector observations (``[d]``) get the MLP ones. One-hot
    action specs get a categorical actor; continuous specs in ``[-1, 1]`` a
    truncated-normal actor. Defaults are the paper's Atari sizes.

    Args:
        observation_spec (Composite): the env's observation spec.
        action_spec (TensorSpec): the env's action spec (``OneHot`` or ``Bounded``).

    Keyword Args:
        obs_key: observation key (default: ``"pixels"`` if present, else ``"observation"``).
        num_categoricals (int): categorical latents. Default: ``32``.
        num_classes (int): classes per latent. Default: ``32``.
        rnn_hidden_dim (int): deterministic state size. Default: ``600``.
        hidden_dim (int): RSSM hidden units. Default: ``600``.
        cnn_depth (int): CNN base channels. Default: ``48``.
        mlp_units (int): units of the heads and vector encoder/decoder. Default: ``400``.
        mlp_layers (int): hidden layers of those MLPs. Default: ``4``.
        discount_head (bool): learn the discount (Atari) or use a constant (DMC). Default: ``True``.
        min_std (float): minimum std of the continuous actor. Default: ``0.1``.
        device: where to put the parameters.

    Returns: a :class:`DreamerV2Models`.

    Examples:
        >>> import torch
        >>> from torchrl.data import Composite, Unbounded, OneHot
        >>> obs = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
        >>> models = make_dreamerv2_models(obs, OneHot(18))
        >>> round(sum(p.numel() for p in models.world_model.parameters()) / 1e6, 2)
        19.98
    """
    obs_key = infer_obs_key(observation_spec) if obs_key is None else obs_key
    obs_shape = tuple(observation_spec[obs_key].shape)
    discrete = is_discrete_action_spec(action_spec)
    action_dim = action_spec.shape[-1]
    state_dim = num_categoricals * num_classes
    heads = dict(num_cells=mlp_units, depth=mlp_layers)

    if len(obs_shape) == 3:
        channels, height, width = obs_shape
        if height != width:
            raise ValueError(f"Image observations must be square, got {obs_shape}.")
        encoder = ConvEncoderV2(channels, depth=cnn_depth, image_size=height)
        decoder = ConvDecoderV2(state_dim, rnn_hidden_dim, channels, depth=cnn_depth, image_size=height)
    elif len(obs_shape) == 1:
        encoder = MLPEncoderV2(obs_shape[0], **heads)
        decoder = MLPDecoderV2(state_dim, rnn_hidden_dim, obs_shape[0], **heads)
    else:
        raise ValueError(f"Observations must be images [C, H, W] or vectors [d], got shape {obs_shape}.")

    rssm = RSSMV2(
        action_dim=action_dim,
        embed_dim=encoder.embed_dim,
        num_categoricals=num_categoricals,
        num_classes=num_classes,
        rnn_hidden_dim=rnn_hidden_dim,
        hidden_dim=hidden_dim,
    )
    feat_keys = ["state", "belief"]
    encoder_module = TensorDictModule(encoder, in_keys=[obs_key], out_keys=["encoded_latents"])
    world_model = WorldModelV2(
        encoder_module,
        RSSMObserveV2(rssm),
        TensorDictModule(decoder, in_keys=feat_keys, out_keys=["reco_pixels"]),
        TensorDictModule(FeatHead(state_dim, rnn_hidden_dim, 1, **heads), in_keys=feat_keys, out_keys=["reward_pred"]),
        TensorDictModule(FeatHead(state_dim, rnn_hidden_dim, 1, **heads), in_keys=feat_keys, out_keys=["continue_pred"])
        if discount_head
        else None,
    )
    actor_net = ActorV2(state_dim, rnn_hidden_dim, action_dim, discrete=discrete, min_std=min_std, **heads)
    actor = make_probabilistic_actor(actor_net, in_keys=feat_keys)
    critic = TensorDictModule(FeatHead(state_dim, rnn_hidden_dim, 1, **heads), in_keys=feat_keys, out_keys=["state_value"])
    policy = DreamerV2Policy(
        encoder_module,
        RSSMPosteriorStepV2(rssm),
        make_probabilistic_actor(actor_net, in_keys=[("next", "state"), ("next", "belief")]),
    )
    models = DreamerV2Models(world_model=world_model, actor=actor, critic=critic, policy=policy)
    if device is not None:
        for module in (world_model, actor, critic):
            module.to(device)
    return models
