"""DreamerV2 world-model loss (spec section 5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives.common import LossModule

from torchrl_dreamer.data.rows import is_transition_batch, transitions_as_sequences
from torchrl_dreamer.modules.models import WorldModelV2
from torchrl_dreamer.objectives.functional import (
    REWARD_TRANSFORMS,
    balanced_kl_loss,
    batch_mean,
    bernoulli_nll,
    categorical_entropy,
    gaussian_nll,
    transition_targets,
)
from torchrl_dreamer.modules.networks import preprocess_obs
from torchrl_dreamer.modules.shards import run_sharded

__all__ = ["DreamerV2ModelLoss"]



class DreamerV2ModelLoss(LossModule):
    """DreamerV2 world-model loss.

    .. math::
        \\mathcal{L} = \\beta_{kl}\\,\\mathcal{L}_{kl} + \\beta_{img}\\,\\mathcal{L}_{img}
                     + \\beta_r\\,\\mathcal{L}_r + \\beta_\\gamma\\,\\mathcal{L}_\\gamma

    * ``L_kl``: :func:`balanced_kl_loss` (balance 0.8, free nats after averaging);
    * ``L_img = sum_k -mean sum_(dims of k) log N(x_k; x_hat_k, 1)`` over the world model's
      observation entries ``k`` (``x = pixels / 255 - 0.5`` for ``uint8`` images, ``x - 0.5`` for floating images
      in ``[0, 1]``, vectors as floats);
    * ``L_r = -mean log N(f(r); r_hat, 1)`` with ``f = tanh`` on Atari;
    * ``L_gamma``: Bernoulli NLL of the discount logits against ``gamma * (1 - terminal)``.

    :meth:`set_keys` renames what the loss and the world model read: ``action``,
    ``is_init``, ``reward``, ``terminated`` and each observation entry, named by its
    key (e.g. ``set_keys(pixels="camera")``); the reconstructions keep their names
    (``world_model.reco_keys``).

    The world model filters ``o_t`` at step ``t``, so the reward and terminal
    targets are those *entering* ``o_t`` (see :func:`transition_targets`).

    It reads two layouts. This package's replay rows (one row per observation, an episode's final observation
    included: :class:`~torchrl_dreamer.data.DreamerReplayBuffer`), ``[*B, T]``. Or stock TorchRL transitions, each
    observation also under ``"next"``, as a stock ``TensorDictReplayBuffer`` with a ``SliceSampler`` samples them
    (``[B, T]`` or flat): they are read as ``[B, T + 1]`` rows, the last transition's next observation being the
    last row (:func:`~torchrl_dreamer.data.transitions_as_sequences`: flat samples are cut at their slice ends, slice
    starts are not taken for episode starts, and an episode that ends inside a slice is refused with one line).
    Every head's gradient reaches the encoder and the RSSM through the
    straight-through latent sample. ``forward`` returns ``(losses, model_output)``:
    the world-model outputs (``state``, ``belief``, logits, reconstructions) are
    written into a shallow copy of the input, not into the input, and
    :class:`DreamerV2ActorLoss` starts imagination from them.

    Args:
        world_model (WorldModelV2): the model.

    Keyword Args:
        lambda_kl (float): KL scale. Default: ``0.1``.
        lambda_reco (float): image scale. Default: ``1.0``.
        lambda_reward (float): reward scale. Default: ``1.0``.
        lambda_discount (float): discount scale. Default: ``5.0``.
        kl_balance (float): KL balance. Default: ``0.8``.
        free_nats (float): free nats. Default: ``0.0``.
        free_avg (bool): free nats after averaging. Default: ``True``.
        gamma (float): discount learned on non-terminal steps. Default: ``0.999``.
        reward_transform (str): ``"tanh"`` (Atari) or ``"identity"`` (DMC). Default: ``"tanh"``.

    Returns (``forward``): ``(losses, model_output)``; ``losses`` is a TensorDict with ``loss_model_kl``, ``loss_model_reco``,
    ``loss_model_reward``, ``loss_model_continue`` (their sum is ``model_loss``) and
    the detached diagnostics ``kl_loss`` (before scaling), ``image_loss``,
    ``reward_loss``, ``discount_loss``, ``model_kl``, ``prior_ent``, ``post_ent``,
    ``model_loss``; with several observation entries also ``reco_loss_<name>`` per
    entry (``image_loss`` is their sum).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Composite, Unbounded, OneHot
        >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
        >>> obs = Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8))
        >>> models = make_dreamerv2_models(obs, OneHot(3), **DEBUG_SIZES)
        >>> loss = DreamerV2ModelLoss(models.world_model)
        >>> batch = TensorDict({
        ...     "pixels": torch.randint(0, 256, (2, 5, 1, 64, 64), dtype=torch.uint8),
        ...     "action": torch.nn.functional.one_hot(torch.randint(3, (2, 5)), 3).float(),
        ...     "is_init": torch.zeros(2, 5, 1, dtype=torch.bool),
        ...     ("next", "reward"): torch.randn(2, 5, 1),
        ...     ("next", "terminated"): torch.zeros(2, 5, 1, dtype=torch.bool)}, [2, 5])
        >>> out, model_output = loss(batch)
        >>> out["loss_model_reco"].requires_grad, out["model_kl"].requires_grad
        (True, False)
        >>> "state" in batch.keys(), model_output["state"].shape
        (False, torch.Size([2, 5, 16]))
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read and written by the loss; change them with :meth:`set_keys`.

        Attributes:
            action: the action taken at each observation. Default: ``"action"``.
            is_init: episode-start flags. Default: ``"is_init"``.
            reward: the true reward. Default: ``("next", "reward")``.
            terminated: the true terminal flag. Default: ``("next", "terminated")``.

        The model's outputs (logits, predictions) are read under the world model's own ``out_keys``.
        """

        action: NestedKey = "action"
        is_init: NestedKey = "is_init"
        reward: NestedKey = ("next", "reward")
        terminated: NestedKey = ("next", "terminated")

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys

    def __init__(
        self,
        world_model: WorldModelV2,
        *,
        lambda_kl: float = 0.1,
        lambda_reco: float = 1.0,
        lambda_reward: float = 1.0,
        lambda_discount: float = 5.0,
        kl_balance: float = 0.8,
        free_nats: float = 0.0,
        free_avg: bool = True,
        gamma: float = 0.999,
        reward_transform: str = "tanh",
    ):
        super().__init__()
        if reward_transform not in REWARD_TRANSFORMS:
            raise ValueError(f"reward_transform must be one of {sorted(REWARD_TRANSFORMS)}, got {reward_transform!r}.")
        self.world_model = world_model
        # what the world model reads now, by the name it had when built
        self._observation_names = {
            key if isinstance(key, str) else "_".join(key): key for key in world_model.obs_keys
        }
        self._model_keys = {key: key for key in world_model.obs_keys}
        self._model_keys.update(action="action", is_init="is_init")
        self.lambda_kl = lambda_kl
        self.lambda_reco = lambda_reco
        self.lambda_reward = lambda_reward
        self.lambda_discount = lambda_discount
        self.kl_balance = kl_balance
        self.free_nats = free_nats
        self.free_avg = free_avg
        self.gamma = gamma
        self.reward_transform = reward_transform

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        # No value estimator: the world model reads the renamed action and episode-start keys.
        self._rename_model_inputs({name: getattr(self.tensor_keys, name) for name in ("action", "is_init")})

    def _rename_model_inputs(self, renamed: dict) -> None:
        mapping = {self._model_keys[old]: new for old, new in renamed.items() if self._model_keys[old] != new}
        if mapping:
            self.world_model.rename_in_keys(mapping)
            for old, new in renamed.items():
                self._model_keys[old] = new

    def set_keys(self, **kwargs) -> None:
        """Renames the keys read; an observation entry is named by its default key (``set_keys(pixels="camera")``).

        Examples:
            >>> from torchrl.data import Composite, Unbounded, OneHot
            >>> from torchrl_dreamer.modules import make_dreamerv2_models, DEBUG_SIZES
            >>> models = make_dreamerv2_models(Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8)),
            ...                                OneHot(3), **DEBUG_SIZES)
            >>> loss = DreamerV2ModelLoss(models.world_model)
            >>> loss.set_keys(pixels="camera", action="act", reward=("next", "r"))
            >>> loss.in_keys
            ['camera', 'act', 'is_init', ('next', 'r'), ('next', 'terminated')]
        """
        observations = {name: kwargs.pop(name) for name in list(kwargs) if name in self._observation_names}
        super().set_keys(**kwargs)
        self._rename_model_inputs({self._observation_names[name]: new for name, new in observations.items()})

    @property
    def in_keys(self):
        keys = self.tensor_keys
        return [*self.world_model.obs_keys, keys.action, keys.is_init, keys.reward, keys.terminated]

    @property
    def out_keys(self):
        return [
            "loss_model_kl",
            "loss_model_reco",
            "loss_model_reward",
            "loss_model_continue",
            *self.diagnostic_keys,
            *self._reco_diagnostic_keys(),
        ]

    diagnostic_keys = (
        "kl_loss",
        "image_loss",
        "reward_loss",
        "discount_loss",
        "model_kl",
        "prior_ent",
        "post_ent",
        "model_loss",
    )

    def _reco_diagnostic_keys(self) -> list[str]:
        """``reco_loss_<name>`` per observation entry (reconstruction ``reco_<name>``), when there are several."""
        reco_keys = list(self.world_model.reco_keys.values())
        return [f"reco_loss_{key.removeprefix('reco_')}" for key in reco_keys] if len(reco_keys) > 1 else []

    def forward(self, tensordict: TensorDictBase) -> tuple[TensorDict, TensorDict]:
        keys = self.tensor_keys
        if is_transition_batch(tensordict, self.world_model.obs_keys):  # a stock buffer's transitions
            tensordict = transitions_as_sequences(
                tensordict, self.world_model.obs_keys, action_key=keys.action, init_key=keys.is_init,
                reward_key=keys.reward, terminated_key=keys.terminated,
            )
        if tensordict.ndim < 1 or tensordict.batch_size[-1] < 1:
            raise ValueError(f"DreamerV2ModelLoss needs a [*B, T] tensordict, got batch {tensordict.batch_size}.")
        missing = [k for k in self.in_keys if k not in tensordict.keys(True)]
        if missing:
            raise KeyError(
                f"DreamerV2ModelLoss: the batch lacks {missing} (it has {sorted(map(str, tensordict.keys(True, True)))}). "
                "Rename keys with loss.set_keys(...)."
            )
        if tensordict.ndim > 1:  # per sequence: in shards of the batch when a ShardPool is active (modules.shards)
            tensordict = run_sharded(self.world_model, tensordict.copy(), self.world_model.parameters())
        else:  # one [T] sequence: its only dimension is time
            tensordict = self.world_model(tensordict.copy())
        wm = self.world_model.module
        prior_key, post_key = wm[1].out_keys[2:4]
        post, prior = tensordict.get(post_key), tensordict.get(prior_key)
        kl_loss, model_kl = balanced_kl_loss(
            post, prior, balance=self.kl_balance, free_nats=self.free_nats, free_avg=self.free_avg
        )

        reco_losses = self._reconstruction_losses(tensordict)
        image_loss = sum(reco_losses)

        reward, mask, terminal = transition_targets(
            tensordict.get(keys.reward), tensordict.get(keys.terminated), tensordict.get(keys.is_init)
        )
        reward = REWARD_TRANSFORMS[self.reward_transform](reward)
        reward_nll = gaussian_nll(tensordict.get(wm[3].out_keys[0]), reward)
        reward_loss = batch_mean(reward_nll, mask)  # over the rows whose reward is known (every rank's)

        losses = {
            "loss_model_kl": self.lambda_kl * kl_loss,
            "loss_model_reco": self.lambda_reco * image_loss,
            "loss_model_reward": self.lambda_reward * reward_loss,
        }
        if self.world_model.has_continue_head:
            discount_target = self.gamma * (1.0 - terminal)
            discount_loss = bernoulli_nll(tensordict.get(wm[4].out_keys[0]), discount_target).mean()
            losses["loss_model_continue"] = self.lambda_discount * discount_loss
        else:
            discount_loss = torch.zeros((), device=reward_loss.device)
            losses["loss_model_continue"] = discount_loss
        model_loss = sum(losses.values())
        metrics = {
            "kl_loss": kl_loss,
            "image_loss": image_loss,
            "reward_loss": reward_loss,
            "discount_loss": discount_loss,
            "model_kl": model_kl,
            "prior_ent": categorical_entropy(prior).mean(),
            "post_ent": categorical_entropy(post).mean(),
            "model_loss": model_loss,
        }
        metrics.update(zip(self._reco_diagnostic_keys(), reco_losses))
        out = TensorDict(losses, [])
        out.update({k: v.detach() for k, v in metrics.items()})
        return out, tensordict

    def _reconstruction_losses(self, tensordict: TensorDictBase) -> list[torch.Tensor]:
        """``-mean_bt sum_(dims of k) log N(x_k; x_hat_k, 1)`` for each observation entry ``k``."""
        losses = []
        images = set(self.world_model.cnn_keys)
        for obs_key, reco_key in self.world_model.reco_keys.items():  # obs keys as the model reads them
            reco = tensordict.get(reco_key)
            target = preprocess_obs(tensordict.get(obs_key), image=obs_key in images)
            losses.append(gaussian_nll(reco, target, event_dims=reco.ndim - tensordict.ndim).mean())
        return losses
