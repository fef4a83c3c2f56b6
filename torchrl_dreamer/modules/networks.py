"""DreamerV2 networks: image/vector encoders and decoders, MLP heads.

Every network takes arbitrary leading batch dimensions (e.g. ``[B, T]``) and
uses the reference initialisation: Keras glorot-uniform weights, zero biases.
Images enter as ``uint8`` and are normalised inside the encoder as
``x / 255 - 0.5``; the decoder predicts the mean of a unit-variance Gaussian
over each normalised pixel.

Reference: Hafner et al., "Mastering Atari with Discrete World Models"
(ICLR 2021), appendix and ``common/nets.py`` of the reference code.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = [
    "glorot_init_",
    "MLP",
    "ConvEncoderV2",
    "ConvDecoderV2",
    "MLPEncoderV2",
    "MLPDecoderV2",
    "FeatHead",
    "normalise_pixels",
]

# Decoder kernels that map a 1x1 map back to the image size (stride 2, no padding):
# out = (in - 1) * 2 + kernel.  64: 1 -> 5 -> 13 -> 30 -> 64 (the paper's decoder).
_DECODER_KERNELS = {64: (5, 5, 6, 6), 32: (5, 6, 6), 16: (6, 6)}


def glorot_init_(module: nn.Module) -> nn.Module:
    """Applies glorot-uniform weights and zero biases to every linear/conv layer.

    ``torch.nn.init.xavier_uniform_`` uses the same fan-in/fan-out as Keras'
    ``glorot_uniform`` for dense and (transposed) convolution kernels.

    Args:
        module (nn.Module): the module to initialise in place.

    Returns:
        the same module.

    Examples:
        >>> layer = glorot_init_(nn.Linear(4, 3))
        >>> bool((layer.bias == 0).all())
        True
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def normalise_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Maps uint8 pixels in ``[0, 255]`` to floats in ``[-0.5, 0.5]`` (``x / 255 - 0.5``)."""
    return pixels.to(dtype) / 255.0 - 0.5


class MLP(nn.Sequential):
    """Dense layers with ELU activations and a linear output layer.

    Args:
        in_features (int): input size.
        out_features (int): output size.

    Keyword Args:
        num_cells (int): units of each hidden layer. Default: ``400``.
        depth (int): number of hidden layers. Default: ``4``.

    Examples:
        >>> mlp = MLP(8, 2, num_cells=16, depth=2)
        >>> mlp(torch.zeros(3, 5, 8)).shape
        torch.Size([3, 5, 2])
    """

    def __init__(self, in_features: int, out_features: int, *, num_cells: int = 400, depth: int = 4):
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else num_cells, num_cells), nn.ELU()]
        layers.append(nn.Linear(num_cells if depth else in_features, out_features))
        super().__init__(*layers)
        glorot_init_(self)


class FeatHead(nn.Module):
    """An MLP on the model state ``feat = [state, belief]``.

    Used for the reward head, the discount (continue) head, the critic and the
    actor's trunk: 4 dense layers of 400 units with ELU in the paper.

    Args:
        state_dim (int): size of the flattened stochastic state (32 * 32).
        belief_dim (int): size of the deterministic state (600).
        out_features (int): output size (1 for scalar heads).

    Keyword Args:
        num_cells (int): hidden units. Default: ``400``.
        depth (int): hidden layers. Default: ``4``.

    Examples:
        >>> head = FeatHead(6, 4, 1, num_cells=8, depth=2)
        >>> head(torch.zeros(2, 6), torch.zeros(2, 4)).shape
        torch.Size([2, 1])
    """

    def __init__(
        self, state_dim: int, belief_dim: int, out_features: int, *, num_cells: int = 400, depth: int = 4
    ):
        super().__init__()
        self.mlp = MLP(state_dim + belief_dim, out_features, num_cells=num_cells, depth=depth)

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([state, belief], -1))


class ConvEncoderV2(nn.Module):
    """Image encoder: stride-2 convolutions with kernel 4, no padding, ELU.

    At 64x64 with depth 48: channels 48, 96, 192, 384 and spatial sizes
    64 -> 31 -> 14 -> 6 -> 2, flattened to a 1536-dimensional embedding.
    Smaller square images (32, 16) use fewer layers (3, 2).

    Args:
        in_channels (int): image channels (1 for grayscale Atari, 3 for RGB).

    Keyword Args:
        depth (int): channels of the first layer, doubled at each layer. Default: ``48``.
        image_size (int): input height/width, one of 16, 32, 64. Default: ``64``.

    Inputs: ``uint8`` pixels ``[*batch, C, H, W]``.

    Returns: embedding ``[*batch, embed_dim]``.

    Examples:
        >>> enc = ConvEncoderV2(1, depth=4)
        >>> enc(torch.zeros(2, 3, 1, 64, 64, dtype=torch.uint8)).shape
        torch.Size([2, 3, 128])
    """

    def __init__(self, in_channels: int, *, depth: int = 48, image_size: int = 64):
        super().__init__()
        if image_size not in _DECODER_KERNELS:
            raise ValueError(f"image_size must be one of {sorted(_DECODER_KERNELS)}, got {image_size}.")
        num_layers = len(_DECODER_KERNELS[image_size])
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for i in range(num_layers):
            layers += [nn.Conv2d(channels, depth * 2**i, 4, stride=2), nn.ELU()]
            channels, size = depth * 2**i, (size - 4) // 2 + 1
        self.convs = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.image_size = image_size
        self.embed_dim = channels * size * size
        glorot_init_(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = pixels.shape[:-3]
        if pixels.shape[-3:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"Expected images of shape [*, {self.in_channels}, {self.image_size}, {self.image_size}], "
                f"got {tuple(pixels.shape)}."
            )
        x = normalise_pixels(pixels.reshape(-1, *pixels.shape[-3:]), self.convs[0].weight.dtype)
        return self.convs(x).reshape(*batch, self.embed_dim)


class ConvDecoderV2(nn.Module):
    """Image decoder: dense to ``32 * depth``, then stride-2 transposed convolutions.

    At 64x64 with depth 48: dense 1624 -> 1536, reshape to ``1536 x 1 x 1``,
    transposed convs with kernels 5, 5, 6, 6 and channels 192, 96, 48, C
    (1 -> 5 -> 13 -> 30 -> 64), ELU between them and none on the last.

    Args:
        state_dim (int): stochastic state size.
        belief_dim (int): deterministic state size.
        out_channels (int): image channels.

    Keyword Args:
        depth (int): base channel count. Default: ``48``.
        image_size (int): output size, one of 16, 32, 64. Default: ``64``.

    Returns: the predicted mean of the normalised image, ``[*batch, C, H, W]``.

    Examples:
        >>> dec = ConvDecoderV2(8, 4, 1, depth=4)
        >>> dec(torch.zeros(2, 8), torch.zeros(2, 4)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(self, state_dim: int, belief_dim: int, out_channels: int, *, depth: int = 48, image_size: int = 64):
        super().__init__()
        if image_size not in _DECODER_KERNELS:
            raise ValueError(f"image_size must be one of {sorted(_DECODER_KERNELS)}, got {image_size}.")
        kernels = _DECODER_KERNELS[image_size]
        self.hidden = 32 * depth
        self.linear = nn.Linear(state_dim + belief_dim, self.hidden)
        layers: list[nn.Module] = []
        channels = self.hidden
        for i, kernel in enumerate(kernels):
            last = i == len(kernels) - 1
            out = out_channels if last else depth * 2 ** (len(kernels) - 2 - i)
            layers.append(nn.ConvTranspose2d(channels, out, kernel, stride=2))
            if not last:
                layers.append(nn.ELU())
            channels = out
        self.deconvs = nn.Sequential(*layers)
        self.out_shape = (out_channels, image_size, image_size)
        glorot_init_(self)

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        batch = state.shape[:-1]
        x = self.linear(torch.cat([state, belief], -1)).reshape(-1, self.hidden, 1, 1)
        return self.deconvs(x).reshape(*batch, *self.out_shape)


class MLPEncoderV2(nn.Module):
    """Vector-observation encoder: 4 dense layers of 400 units with ELU (the embedding is the last hidden layer).

    Args:
        in_features (int): observation size.

    Keyword Args:
        num_cells (int): units per layer. Default: ``400``.
        depth (int): number of layers. Default: ``4``.

    Examples:
        >>> MLPEncoderV2(3, num_cells=8, depth=2)(torch.zeros(5, 3)).shape
        torch.Size([5, 8])
    """

    def __init__(self, in_features: int, *, num_cells: int = 400, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else num_cells, num_cells), nn.ELU()]
        self.mlp = nn.Sequential(*layers)
        self.embed_dim = num_cells
        glorot_init_(self)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.mlp(observation.to(self.mlp[0].weight.dtype))


class MLPDecoderV2(FeatHead):
    """Vector-observation decoder: the mean of a unit Gaussian over each feature.

    Examples:
        >>> MLPDecoderV2(6, 4, 3, num_cells=8, depth=2)(torch.zeros(2, 6), torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """


def count_parameters(modules: nn.Module | Sequence[nn.Module]) -> int:
    """Number of distinct parameters of one or several modules (shared ones counted once)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())
