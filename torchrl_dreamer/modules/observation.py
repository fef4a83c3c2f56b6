"""Observations made of several entries, as the reference's ``cnn_keys`` / ``mlp_keys``.

One CNN sees every image entry, stacked along channels (they share ``H x W``);
one MLP sees every vector entry, concatenated. The embedding is the
concatenation of the two; the decoders split their outputs back per entry.
"""
from __future__ import annotations

from typing import Mapping

import torch
from tensordict.utils import NestedKey
from torch import nn

from torchrl_dreamer.modules.networks import (
    ConvDecoderV2,
    ConvEncoderV2,
    MLPDecoderV2,
    MLPEncoderV2,
    preprocess_obs,
)

__all__ = ["ObsEncoderV2", "ObsDecoderV2"]


def _image_layout(cnn_shapes: Mapping[NestedKey, tuple]) -> tuple[int, tuple[int, int]] | None:
    """Total channels and the common ``(H, W)`` of the image entries (``None`` when there are none)."""
    if not cnn_shapes:
        return None
    sizes = {key: tuple(shape[-2:]) for key, shape in cnn_shapes.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Image observations are stacked along channels and must share H x W, got {sizes}.")
    return sum(shape[0] for shape in cnn_shapes.values()), next(iter(sizes.values()))


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class ObsEncoderV2(nn.Module):
    """Embeds the image entries with one :class:`ConvEncoderV2` and the vector entries with one :class:`MLPEncoderV2`.

    Each entry goes through :func:`~torchrl_dreamer.modules.networks.preprocess_obs` (``uint8``
    images to ``x / 255 - 0.5``, floating images in ``[0, 1]`` to ``x - 0.5``, vectors as floats) before being
    stacked.

    Args:
        cnn_shapes (dict): ``{key: (C, H, W)}`` of the image entries, in input order (may be empty).
        mlp_sizes (dict): ``{key: d}`` of the vector entries, which come after the images (may be empty).

    Keyword Args:
        cnn_depth (int): CNN base channels. Default: ``48``.
        mlp_units (int): MLP units per layer. Default: ``400``.
        mlp_layers (int): MLP layers. Default: ``4``.
        full_coverage (bool, optional): the CNN stack, see :func:`~torchrl_dreamer.modules.networks.conv_layout`.
        image_dtypes (dict, optional): ``{key: dtype}`` of the image entries as the env gives them (``uint8``, or a
            floating dtype for images in ``[0, 1]``), read by the decoders of imagined frames. Default: ``uint8``.

    Inputs: the images, then the vectors, each ``[*batch, *shape]``.

    Returns: ``[*batch, embed_dim]`` = ``[cnn embedding, mlp embedding]``.

    Examples:
        >>> enc = ObsEncoderV2({"pixels": (1, 16, 16)}, {"observation": 3}, cnn_depth=2, mlp_units=5, mlp_layers=1)
        >>> enc(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, 3)).shape  # 4 channels x 4 x 4 + 5
        torch.Size([4, 69])
    """

    def __init__(
        self,
        cnn_shapes: Mapping[NestedKey, tuple],
        mlp_sizes: Mapping[NestedKey, int],
        *,
        cnn_depth: int = 48,
        mlp_units: int = 400,
        mlp_layers: int = 4,
        full_coverage: bool | None = None,
        image_dtypes: Mapping[NestedKey, torch.dtype] | None = None,
    ):
        super().__init__()
        if not cnn_shapes and not mlp_sizes:
            raise ValueError("ObsEncoderV2 needs at least one image or vector entry.")
        self.cnn_shapes, self.mlp_sizes = dict(cnn_shapes), dict(mlp_sizes)
        self.image_dtypes = {key: (image_dtypes or {}).get(key, torch.uint8) for key in self.cnn_shapes}
        images = _image_layout(self.cnn_shapes)
        self.cnn = (
            ConvEncoderV2(images[0], depth=cnn_depth, image_size=images[1], full_coverage=full_coverage)
            if images
            else None
        )
        self.mlp = (
            MLPEncoderV2(sum(self.mlp_sizes.values()), num_cells=mlp_units, depth=mlp_layers) if mlp_sizes else None
        )
        self.embed_dim = sum(net.embed_dim for net in (self.cnn, self.mlp) if net is not None)

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        images, vectors = obs[: len(self.cnn_shapes)], obs[len(self.cnn_shapes) :]
        embeds = []
        if self.cnn is not None:
            embeds.append(self.cnn(_cat([preprocess_obs(x, dtype, image=True) for x in images], -3)))
        if self.mlp is not None:
            embeds.append(self.mlp(_cat([preprocess_obs(x, dtype) for x in vectors], -1)))
        return _cat(embeds, -1)


class ObsDecoderV2(nn.Module):
    """Reconstructs every entry: one :class:`ConvDecoderV2` for the images, one :class:`MLPDecoderV2` for the vectors.

    The CNN's output channels and the MLP's output features are split back per entry.

    Args:
        state_dim (int): stochastic state size.
        belief_dim (int): deterministic state size.
        cnn_shapes (dict): ``{key: (C, H, W)}`` of the image entries (may be empty).
        mlp_sizes (dict): ``{key: d}`` of the vector entries (may be empty).

    Keyword Args:
        cnn_depth (int): CNN base channels. Default: ``48``.
        mlp_units (int): MLP hidden units. Default: ``400``.
        mlp_layers (int): MLP hidden layers. Default: ``4``.
        full_coverage (bool, optional): the CNN stack, see :func:`~torchrl_dreamer.modules.networks.conv_layout`.

    Returns: a tuple of the predicted means, images first (``[*batch, C, H, W]``), then vectors (``[*batch, d]``).

    Examples:
        >>> dec = ObsDecoderV2(6, 4, {"a": (1, 16, 16), "b": (2, 16, 16)}, {"c": 3}, cnn_depth=2, mlp_units=5)
        >>> [tuple(x.shape) for x in dec(torch.zeros(7, 6), torch.zeros(7, 4))]
        [(7, 1, 16, 16), (7, 2, 16, 16), (7, 3)]
    """

    def __init__(
        self,
        state_dim: int,
        belief_dim: int,
        cnn_shapes: Mapping[NestedKey, tuple],
        mlp_sizes: Mapping[NestedKey, int],
        *,
        cnn_depth: int = 48,
        mlp_units: int = 400,
        mlp_layers: int = 4,
        full_coverage: bool | None = None,
    ):
        super().__init__()
        if not cnn_shapes and not mlp_sizes:
            raise ValueError("ObsDecoderV2 needs at least one image or vector entry.")
        self.cnn_shapes, self.mlp_sizes = dict(cnn_shapes), dict(mlp_sizes)
        images = _image_layout(self.cnn_shapes)
        self.cnn = (
            ConvDecoderV2(
                state_dim, belief_dim, images[0], depth=cnn_depth, image_size=images[1], full_coverage=full_coverage
            )
            if images
            else None
        )
        self.mlp = (
            MLPDecoderV2(state_dim, belief_dim, sum(self.mlp_sizes.values()), num_cells=mlp_units, depth=mlp_layers)
            if mlp_sizes
            else None
        )

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        if self.cnn is not None:
            channels = [shape[0] for shape in self.cnn_shapes.values()]
            out += self.cnn(state, belief).split(channels, -3)
        if self.mlp is not None:
            out += self.mlp(state, belief).split(list(self.mlp_sizes.values()), -1)
        return tuple(out)
