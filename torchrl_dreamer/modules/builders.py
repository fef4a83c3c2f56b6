"""Builders: from environment specs to the DreamerV2 world model, actor, critic and policy.

This is the only place that names tensordict keys for the modules.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from tensordict.nn import TensorDictModule
from tensordict.utils import NestedKey, unravel_key
from torchrl.data import (
    Binary,
    Bounded,
    Categorical,
    Composite,
    MultiCategorical,
    MultiOneHot,
    OneHot,
    TensorSpec,
    Unbounded,
)

from torchrl.modules import ProbabilisticActor

from torchrl_dreamer.modules.actor import ActorV2, make_dreamerv2_actor
from torchrl_dreamer.modules.models import DreamerV2Policy, RSSMObserveV2, RSSMPosteriorStepV2, WorldModelV2
from torchrl_dreamer.modules.networks import FeatHead
from torchrl_dreamer.modules.observation import ObsDecoderV2, ObsEncoderV2
from torchrl_dreamer.modules.rssm import RSSMV2

__all__ = [
    "DreamerV2Models",
    "make_dreamerv2_models",
    "DEBUG_SIZES",
    "select_obs_keys",
    "unused_observation_keys",
    "reco_key",
    "is_discrete_action_spec",
]

#: Small sizes for tests, docs and the ``debug`` preset.
DEBUG_SIZES = dict(
    num_categoricals=4, num_classes=4, rnn_hidden_dim=32, hidden_dim=32, cnn_depth=4, mlp_units=32, mlp_layers=2
)


@dataclass
class DreamerV2Models:
    """The components built by :func:`make_dreamerv2_models`.

    Attributes:
        world_model (WorldModelV2): encoder, RSSM, decoder, reward and discount heads.
        actor (ProbabilisticActor): the actor on ``[state, belief]`` writing ``action`` (TorchRL distributions).
        critic (TensorDictModule): value network on ``[state, belief]`` writing ``state_value``.
        policy (DreamerV2Policy): the acting policy for collectors: encoder, posterior step and :attr:`actor`
            (shares all weights).
    """

    world_model: WorldModelV2
    actor: ProbabilisticActor
    critic: TensorDictModule
    policy: DreamerV2Policy

    @property
    def actor_network(self) -> ActorV2:
        """The :class:`ActorV2` network inside :attr:`actor`."""
        return self.actor.module[0].module

    @property
    def critic_network(self) -> FeatHead:
        return self.critic.module


#: Observation entries never modelled automatically: the episode-start flag and the policy's carried state.
_EXCLUDED_KEYS = ("is_init", "state", "belief", "prev_action")


def _leaf_shapes(observation_spec: Composite) -> dict[NestedKey, tuple[torch.Size, torch.dtype]]:
    """``{key: (shape without the spec's batch dims, dtype)}`` of every leaf of the spec."""
    return {
        key: (spec.shape[observation_spec.ndim :], spec.dtype)
        for key, spec in observation_spec.items(include_nested=True, leaves_only=True)
    }


def select_obs_keys(
    observation_spec: Composite,
    *,
    cnn_keys: Sequence[NestedKey] | None = None,
    mlp_keys: Sequence[NestedKey] | None = None,
) -> tuple[list[NestedKey], list[NestedKey]]:
    """The observation entries the world model encodes and reconstructs: images (CNN) and vectors (MLP).

    Automatic choice (for a list left to ``None``): ``cnn_keys`` are the image leaves, ``[C, H, W]``,
    either ``uint8`` or floating with ``H, W >= 16`` (in ``[0, 1]``, as TorchRL's ``ToTensorImage`` gives
    them; encoded like their ``uint8`` frames); ``mlp_keys`` the floating ``[d]`` leaves, in spec order.
    Never chosen automatically: ``is_init``, ``state``, ``belief``, ``prev_action`` and anything under
    ``collector``; other leaves (e.g. integer vectors) are not modelled, and
    :func:`make_dreamerv2_models` warns once naming them. An explicit list replaces the automatic choice
    for its kind (pass ``[]`` for none) and is checked: each key must be a leaf of the spec with 3
    dims (cnn) or 1 dim (mlp). A floating image whose spec is bounded outside ``[0, 1]`` is refused.

    Args:
        observation_spec (Composite): the env's observation spec (batch dims are ignored).

    Keyword Args:
        cnn_keys (sequence of NestedKey, optional): image keys. Default: automatic.
        mlp_keys (sequence of NestedKey, optional): vector keys. Default: automatic.

    Returns: ``(cnn_keys, mlp_keys)``.

    Raises:
        ValueError: an unknown key or one of the wrong rank, or no key at all.

    Examples:
        >>> from torchrl.data import Composite, Unbounded
        >>> spec = Composite(pixels=Unbounded((3, 64, 64), dtype=torch.uint8), observation=Unbounded((5,)),
        ...                  ball=Unbounded((2,), dtype=torch.int64), is_init=Unbounded((1,), dtype=torch.bool))
        >>> select_obs_keys(spec)
        (['pixels'], ['observation'])
        >>> select_obs_keys(spec, mlp_keys=[])
        (['pixels'], [])
    """
    leaves = _leaf_shapes(observation_spec)
    available = ", ".join(
        f"{key!r} {list(shape)} {str(dtype).replace('torch.', '')}" for key, (shape, dtype) in leaves.items()
    )

    def automatic(key: NestedKey) -> str | None:
        if key in _EXCLUDED_KEYS or (isinstance(key, tuple) and key[0] == "collector"):
            return None
        shape, dtype = leaves[key]
        if len(shape) == 3 and dtype == torch.uint8:
            return "cnn"
        if len(shape) == 3 and dtype is not None and dtype.is_floating_point and min(shape[-2:]) >= 16:
            return "cnn"  # floating images in [0, 1]; smaller 3-D float leaves are not images the CNN can encode
        if len(shape) == 1 and dtype is not None and dtype.is_floating_point:
            return "mlp"
        return None

    def chosen(keys: Sequence[NestedKey] | None, kind: str, rank: int) -> list[NestedKey]:
        if keys is None:
            return [key for key in leaves if automatic(key) == kind]
        keys = [unravel_key(key) for key in keys]
        for key in keys:
            if key not in leaves:
                raise ValueError(f"{kind}_keys: {key!r} is not in the observation spec (available: {available}).")
            if len(leaves[key][0]) != rank:
                raise ValueError(
                    f"{kind}_keys: {key!r} has shape {list(leaves[key][0])}, {kind} keys need "
                    f"{'[C, H, W]' if rank == 3 else '[d]'} (available: {available})."
                )
        return keys

    cnn, mlp = chosen(cnn_keys, "cnn", 3), chosen(mlp_keys, "mlp", 1)
    for key in cnn:
        _check_image_range(key, observation_spec[key])
    if not cnn and not mlp:
        raise ValueError(
            "No observation to model: DreamerV2 needs uint8 [C, H, W] images or floating [d] vectors "
            f"(available: {available}); pass cnn_keys= or mlp_keys=."
        )
    return cnn, mlp


def _check_image_range(key: NestedKey, spec: TensorSpec) -> None:
    """Floating images must lie in ``[0, 1]``: refused when the spec's bounds say otherwise."""
    if not spec.dtype.is_floating_point or not hasattr(spec, "space") or not hasattr(spec.space, "low"):
        return
    low, high = float(spec.space.low.min()), float(spec.space.high.max())
    unbounded = torch.finfo(spec.dtype).max / 2  # an Unbounded spec's box spans the dtype's range
    if -unbounded < low < -1e-6 or 1 + 1e-6 < high < unbounded:
        raise ValueError(
            f"Floating image {key!r} has bounds [{low:g}, {high:g}]: images are uint8 in [0, 255] or floats in [0, 1] "
            "(as torchrl.envs.ToTensorImage gives them); rescale it with a transform, or pass its uint8 frames."
        )


def unused_observation_keys(observation_spec: Composite, used: Sequence[NestedKey]) -> list[NestedKey]:
    """Leaves of the spec that the world model does not model (the policy's own state keys excepted)."""
    return [
        key for key in _leaf_shapes(observation_spec)
        if key not in used and key not in _EXCLUDED_KEYS and not (isinstance(key, tuple) and key[0] == "collector")
    ]


def reco_key(key: NestedKey) -> str:
    """Where the reconstruction of an observation entry is written: ``"reco_<name>"``.

    Examples:
        >>> reco_key("pixels"), reco_key(("camera", "rgb"))
        ('reco_pixels', 'reco_camera_rgb')
    """
    return "reco_" + (key if isinstance(key, str) else "_".join(key))


def is_discrete_action_spec(action_spec: TensorSpec) -> bool:
    """True for a one-hot action spec, False for a continuous one bounded in ``[-1, 1]``; raises otherwise.

    Examples:
        >>> from torchrl.data import Bounded, OneHot
        >>> is_discrete_action_spec(OneHot(4)), is_discrete_action_spec(Bounded(-1.0, 1.0, (2,)))
        (True, False)
    """
    name = type(action_spec).__name__
    if isinstance(action_spec, (MultiOneHot, MultiCategorical)):
        raise ValueError(
            f"DreamerV2 takes one discrete action, got {name} (several sub-actions): expose them as one OneHot "
            "action over their combinations."
        )
    if isinstance(action_spec, OneHot):
        return True
    if isinstance(action_spec, Binary):
        raise ValueError(
            f"DreamerV2 needs one-hot discrete actions, got {name}: expose the binary choices as one OneHot action "
            "over their combinations."
        )
    if isinstance(action_spec, Categorical):
        raise ValueError(
            f"DreamerV2 needs one-hot discrete actions, got {name}: build the env with "
            "categorical_action_encoding=False (a OneHot action spec)."
        )
    if isinstance(action_spec, Bounded) and action_spec.dtype.is_floating_point:
        low, high = action_spec.space.low, action_spec.space.high
        if not (torch.allclose(low.float(), torch.tensor(-1.0)) and torch.allclose(high.float(), torch.tensor(1.0))):
            raise ValueError(
                f"Continuous actions must be bounded in [-1, 1], got low={low.tolist()} high={high.tolist()}: "
                "append torchrl.envs.ActionScaling() to the env (or use make_env's gym: suite)."
            )
        return False
    if isinstance(action_spec, Unbounded) and action_spec.dtype.is_floating_point:
        raise ValueError(
            f"Continuous actions must be bounded in [-1, 1], got {name}: give the env a Bounded action spec and "
            "append torchrl.envs.ActionScaling() to map it to [-1, 1]."
        )
    raise ValueError(
        f"Unsupported action spec {name} (dtype {action_spec.dtype}): DreamerV2 needs a OneHot spec (discrete) "
        "or a floating Bounded spec in [-1, 1] (continuous)."
    )


def make_dreamerv2_models(
    observation_spec: Composite,
    action_spec: TensorSpec,
    *,
    cnn_keys: Sequence[NestedKey] | None = None,
    mlp_keys: Sequence[NestedKey] | None = None,
    num_categoricals: int = 32,
    num_classes: int = 32,
    rnn_hidden_dim: int = 600,
    hidden_dim: int = 600,
    cnn_depth: int = 48,
    mlp_units: int = 400,
    mlp_layers: int = 4,
    full_coverage: bool | None = None,
    discount_head: bool = True,
    min_std: float = 0.1,
    device: torch.device | str | None = None,
) -> DreamerV2Models:
    """Builds the DreamerV2 components for an environment's specs.

    The observation entries come from :func:`select_obs_keys`: image entries
    (``[C, H, W]``, at least 16 x 16, sharing ``H x W``) go through one CNN
    encoder/decoder, stacked along channels; vector entries (``[d]``) through
    one MLP encoder/decoder. Each reconstruction is written under
    :func:`reco_key` (e.g. ``"reco_pixels"``). One-hot action specs get a
    categorical actor; continuous specs in ``[-1, 1]`` a truncated-normal actor
    (:func:`is_discrete_action_spec`). Defaults are the paper's Atari sizes.

    Args:
        observation_spec (Composite): the env's observation spec.
        action_spec (TensorSpec): the env's action spec (``OneHot`` or ``Bounded`` in ``[-1, 1]``).

    Keyword Args:
        cnn_keys (sequence of NestedKey, optional): image entries. Default: the ``uint8 [C, H, W]`` leaves.
        mlp_keys (sequence of NestedKey, optional): vector entries. Default: the floating ``[d]`` leaves.
        num_categoricals (int): categorical latents. Default: ``32``.
        num_classes (int): classes per latent. Default: ``32``.
        rnn_hidden_dim (int): deterministic state size. Default: ``600``.
        hidden_dim (int): RSSM hidden units. Default: ``600``.
        cnn_depth (int): CNN base channels. Default: ``48``.
        mlp_units (int): units of the heads and vector encoder/decoder. Default: ``400``.
        mlp_layers (int): hidden layers of those MLPs. Default: ``4``.
        full_coverage (bool, optional): the CNN stack: ``None`` is the reference one at 64 x 64 and
            the full-coverage one elsewhere; ``True`` forces the latter (see
            :func:`~torchrl_dreamer.modules.networks.conv_layout`). Default: ``None``.
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
        >>> obs = Composite(pixels=Unbounded((3, 16, 16), dtype=torch.uint8), observation=Unbounded((5,)))
        >>> wm = make_dreamerv2_models(obs, OneHot(3), **DEBUG_SIZES).world_model
        >>> wm.cnn_keys, wm.mlp_keys, wm.reco_keys
        (['pixels'], ['observation'], {'pixels': 'reco_pixels', 'observation': 'reco_observation'})
    """
    automatic = cnn_keys is None or mlp_keys is None
    cnn_keys, mlp_keys = select_obs_keys(observation_spec, cnn_keys=cnn_keys, mlp_keys=mlp_keys)
    leaves = _leaf_shapes(observation_spec)
    unused = unused_observation_keys(observation_spec, [*cnn_keys, *mlp_keys])
    if automatic and unused:
        described = ", ".join(f"{key!r} {list(leaves[key][0])} {str(leaves[key][1]).replace('torch.', '')}"
                              for key in unused)
        warnings.warn(
            f"The world model does not model the observation entries {described}: it models images ([C, H, W], "
            "uint8 or floats in [0, 1]) and float vectors ([d]); pass cnn_keys= / mlp_keys= (--cnn-keys, --mlp-keys) "
            "to choose, or convert the entries with a transform.",
            stacklevel=2,
        )
    shapes = {key: tuple(shape) for key, (shape, _) in leaves.items()}
    cnn_shapes = {key: shapes[key] for key in cnn_keys}
    for key, (channels, height, width) in cnn_shapes.items():
        if width in (1, 3, 4) and min(channels, height) >= 16:  # [H, W, C] read as [C, H, W]
            raise ValueError(
                f"The image {key!r} is {list(cnn_shapes[key])}: channels last ([H, W, C]); the CNN takes channels "
                f"first, [C, H, W]: append torchrl.envs.ToTensorImage(in_keys=[{key!r}]) to the env (channels first, "
                f"floats in [0, 1]), or torchrl.envs.PermuteTransform((-1, -3, -2), in_keys=[{key!r}])."
            )
    mlp_sizes = {key: shapes[key][0] for key in mlp_keys}
    discrete = is_discrete_action_spec(action_spec)
    action_dim = action_spec.shape[-1]
    state_dim = num_categoricals * num_classes
    heads = dict(num_cells=mlp_units, depth=mlp_layers)
    obs_nets = dict(cnn_depth=cnn_depth, mlp_units=mlp_units, mlp_layers=mlp_layers, full_coverage=full_coverage)
    encoder = ObsEncoderV2(cnn_shapes, mlp_sizes, image_dtypes={key: leaves[key][1] for key in cnn_keys}, **obs_nets)
    decoder = ObsDecoderV2(state_dim, rnn_hidden_dim, cnn_shapes, mlp_sizes, **obs_nets)

    rssm = RSSMV2(
        action_dim=action_dim,
        embed_dim=encoder.embed_dim,
        num_categoricals=num_categoricals,
        num_classes=num_classes,
        rnn_hidden_dim=rnn_hidden_dim,
        hidden_dim=hidden_dim,
    )
    feat_keys = ["state", "belief"]
    obs_keys = [*cnn_keys, *mlp_keys]
    encoder_module = TensorDictModule(encoder, in_keys=obs_keys, out_keys=["encoded_latents"])
    world_model = WorldModelV2(
        encoder_module,
        RSSMObserveV2(rssm),
        TensorDictModule(decoder, in_keys=feat_keys, out_keys=[reco_key(key) for key in obs_keys]),
        TensorDictModule(FeatHead(state_dim, rnn_hidden_dim, 1, **heads), in_keys=feat_keys, out_keys=["reward_pred"]),
        TensorDictModule(FeatHead(state_dim, rnn_hidden_dim, 1, **heads), in_keys=feat_keys, out_keys=["continue_pred"])
        if discount_head
        else None,
    )
    actor_net = ActorV2(state_dim, rnn_hidden_dim, action_dim, discrete=discrete, min_std=min_std, **heads)
    actor = make_dreamerv2_actor(actor_net, in_keys=feat_keys, spec=action_spec.clone())
    critic = TensorDictModule(FeatHead(state_dim, rnn_hidden_dim, 1, **heads), in_keys=feat_keys, out_keys=["state_value"])
    policy = DreamerV2Policy(encoder_module, RSSMPosteriorStepV2(rssm), actor)
    models = DreamerV2Models(world_model=world_model, actor=actor, critic=critic, policy=policy)
    if device is not None:
        for module in (world_model, actor, critic):
            module.to(device)
    return models
