"""DreamerV2 networks: image/vector encoders and decoders, MLP heads.

Every network takes arbitrary leading batch dimensions (e.g. ``[B, T]``) and
uses the reference initialisation: Keras glorot-uniform weights, zero biases.
Images enter as ``uint8`` and are normalised inside the encoder as
``x / 255 - 0.5``; the decoder predicts the mean of a unit-variance Gaussian
over each normalised pixel. Any image of at least 16 x 16 pixels is accepted
(:func:`conv_layout`): the reference stack at 64 x 64, a padded one that sees
every pixel elsewhere.

Reference: Hafner et al., "Mastering Atari with Discrete World Models"
(ICLR 2021), appendix and ``common/nets.py`` of the reference code.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "glorot_init_",
    "MLP",
    "ConvEncoderV2",
    "ConvDecoderV2",
    "MLPEncoderV2",
    "MLPDecoderV2",
    "FeatHead",
    "normalise_pixels",
    "preprocess_obs",
    "conv_layout",
    "MIN_IMAGE_SIZE",
    "conv2d_patches",
    "conv_transpose2d_1x1",
    "conv_transpose2d_subpixel",
    "conv_transpose2d_summed_bias",
    "linear_on_parts",
    "same_batch",
]

# The reference decoder's kernels (stride 2, no padding, out = (in - 1) * 2 + kernel): 1 -> 5 -> 13 -> 30 -> 64.
_REFERENCE_KERNELS = (5, 5, 6, 6)
#: Smallest image side the convolution stacks accept.
MIN_IMAGE_SIZE = 16
_MAX_LAYERS = 4


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


def preprocess_obs(obs: torch.Tensor, dtype: torch.dtype | None = None, *, image: bool = False) -> torch.Tensor:
    """What the networks see of an observation: images in ``[-0.5, 0.5]``, vectors as floats.

    ``uint8`` images ``[0, 255]`` become ``x / 255 - 0.5`` (the reference's); floating images, which are in
    ``[0, 1]`` (as TorchRL's ``ToTensorImage`` gives them), become ``x - 0.5``: the same values as their
    ``uint8`` frames. Other entries (vectors) are used as they are, as floats.

    Args:
        obs (Tensor): any observation entry.
        dtype (torch.dtype, optional): output dtype. Default: float32 for ``uint8`` and integer
            inputs, the input's own dtype for floating ones.

    Keyword Args:
        image (bool): the entry is an image (a CNN entry). Default: ``False``.

    Examples:
        >>> preprocess_obs(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-0.5000,  0.5000])
        >>> preprocess_obs(torch.tensor([0.0, 1.0]), image=True)
        tensor([-0.5000,  0.5000])
        >>> preprocess_obs(torch.tensor([1, 2])).dtype
        torch.float32
    """
    if obs.dtype == torch.uint8:
        return normalise_pixels(obs, dtype or torch.float32)
    if not obs.is_floating_point():
        obs = obs.to(dtype or torch.float32)
    elif dtype is not None:
        obs = obs.to(dtype)
    return obs - 0.5 if image else obs


# ---- convolution kernels ------------------------------------------------------------------
# Re-formulations of unpadded convolutions that compute the same function as
# ``F.conv2d`` / ``F.conv_transpose2d`` on the same weights (only the order of the
# floating-point sums differs) and are faster on CPU for the shapes of the DreamerV2
# encoder and decoder. ``tests/test_networks.py`` checks values and gradients.


class _Patches(torch.autograd.Function):
    """The ``[N * Ho * Wo, kh * kw * C]`` patch matrix of an unpadded convolution (``(kh, kw, C)`` order), with a
    column of ones appended when ``ones`` is set (the bias as one more input of the product).

    Written by hand because ``Tensor.unfold``'s backward is a generic scatter (two of them, one per unfolded
    dimension): about 35 ms for the encoder's last layer at the Atari preset. Here the gradient is ``kh * kw``
    strided additions of the patch gradients into the input's gradient (4-8 ms).
    """

    @staticmethod
    def forward(ctx, x, kh: int, kw: int, stride: int, ones: bool):
        n, channels, height, width = x.shape
        ho, wo = (height - kh) // stride + 1, (width - kw) // stride + 1
        size = kh * kw * channels
        cols = x.new_empty(n, ho, wo, size + int(ones))
        patches = x.permute(0, 2, 3, 1).unfold(1, kh, stride).unfold(2, kw, stride)  # [N, Ho, Wo, C, kh, kw]
        cols[..., :size].view(n, ho, wo, kh, kw, channels).copy_(patches.permute(0, 1, 2, 4, 5, 3))
        if ones:
            cols[..., size] = 1
        ctx.geometry = (n, channels, height, width, kh, kw, stride, ho, wo, size)
        return cols.view(n * ho * wo, size + int(ones))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        n, channels, height, width, kh, kw, stride, ho, wo, size = ctx.geometry
        grad = grad[:, :size].reshape(n, ho, wo, kh, kw, channels)
        grad_x = grad.new_zeros(n, height, width, channels)  # channels-last, as the forward read it
        rows, cols = stride * (ho - 1) + 1, stride * (wo - 1) + 1
        for i in range(kh):
            for j in range(kw):
                grad_x[:, i : i + rows : stride, j : j + cols : stride].add_(grad[:, :, :, i, j])
        return grad_x.permute(0, 3, 1, 2), None, None, None, None


def conv2d_patches(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 2, *, elu: bool = False
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride)`` (no padding) as one matrix product over image patches.

    The patches are gathered in ``(kh, kw, C)`` order from a channels-last view of
    ``x``, so that the product ``[N * Ho * Wo, kh * kw * C] @ [kh * kw * C, C_out]``
    yields the output directly in channels-last memory. Fast when the input has
    few channels (the first layer) or the output few pixels (the last layer).
    With short patches (``kh * kw * C < 64``, the first layer's 16) the bias is one more
    column of the product (a column of ones in the patches): adding it to the large, narrow
    output and summing the output's gradient for it would each cost as much as the product.

    Args:
        x (Tensor): ``[N, C, H, W]`` in any memory format.
        weight (Tensor): ``[C_out, C, kh, kw]``.
        bias (Tensor, optional): ``[C_out]``.
        stride (int): the stride. Default: ``2``.

    Keyword Args:
        elu (bool): apply ELU in place on the fresh product, before it is viewed as an image: ``F.elu`` of the
            result without a second activation tensor (its gradient is taken from the output). Default: ``False``.

    Returns: ``[N, C_out, Ho, Wo]``, channels-last.

    Examples:
        >>> x, w = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 4, 4)
        >>> torch.allclose(conv2d_patches(x, w), F.conv2d(x, w, stride=2), atol=1e-5)
        True
    """
    n, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    size = kh * kw * channels
    ho, wo = (height - kh) // stride + 1, (width - kw) // stride + 1
    fold_bias = bias is not None and size < 64
    cols = _Patches.apply(x, kh, kw, stride, fold_bias)
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, size)
    if fold_bias:
        # a contiguous [size + 1, C_out] operand: autograd then takes its gradient as cols^T @ grad, which MKL runs
        # at twice the speed of the (grad^T @ cols)^T it uses for a transposed view on these long, narrow matrices
        out = cols @ torch.cat([kernel, bias.unsqueeze(1)], 1).t().contiguous()
    else:
        out = cols @ kernel.t() if bias is None else torch.addmm(bias, cols, kernel.t())
    if elu:
        out = F.elu_(out)
    return out.view(n, ho, wo, out_channels).permute(0, 3, 1, 2)


def conv_transpose2d_1x1(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, elu: bool = False
) -> torch.Tensor:
    """``F.conv_transpose2d`` of a ``1 x 1`` input (any stride, no padding) as one matrix product.

    Each input vector is multiplied by the whole kernel: ``out[n, o, i, j] =
    sum_c x[n, c] * weight[c, o, i, j] + bias[o]``.

    Args:
        x (Tensor): ``[N, C]`` or ``[N, C, 1, 1]``.
        weight (Tensor): ``[C, C_out, kh, kw]``.
        bias (Tensor, optional): ``[C_out]``.

    Keyword Args:
        elu (bool): apply ELU in place on the fresh product (see :func:`conv2d_patches`). Default: ``False``.

    Returns: ``[N, C_out, kh, kw]``.

    Examples:
        >>> x, w = torch.randn(2, 6, 1, 1), torch.randn(6, 3, 5, 5)
        >>> torch.allclose(conv_transpose2d_1x1(x, w), F.conv_transpose2d(x, w, stride=2), atol=1e-5)
        True
    """
    channels, out_channels, kh, kw = weight.shape
    x = x.reshape(-1, channels)
    kernel = weight.reshape(channels, out_channels * kh * kw)
    if bias is None:
        out = x @ kernel
    else:
        out = torch.addmm(bias.repeat_interleave(kh * kw), x, kernel)
    if elu:
        out = F.elu_(out)
    return out.view(-1, out_channels, kh, kw)


def conv_transpose2d_subpixel(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2)`` (no padding) as a stride-1 convolution.

    A stride-2 transposed convolution writes four interleaved output phases
    ``out[2p + a, 2q + b]`` (``a, b`` in ``{0, 1}``), each a plain convolution of
    the input with the kernel taps ``weight[..., a::2, b::2]`` (flipped). The four
    phase kernels are stacked as ``4 * C_out`` output channels of one stride-1
    convolution (padding ``k / 2 - 1``) and interleaved with ``pixel_shuffle``.
    An odd kernel is padded with a zero row/column and the extra output row/column
    cropped. Fast for few output channels (the decoder's last layer).

    Args:
        x (Tensor): ``[N, C, H, W]`` in any memory format.
        weight (Tensor): ``[C, C_out, kh, kw]``.
        bias (Tensor, optional): ``[C_out]``.

    Returns: ``[N, C_out, 2 (H - 1) + kh, 2 (W - 1) + kw]``.

    Examples:
        >>> x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 6, 6)
        >>> torch.allclose(conv_transpose2d_subpixel(x, w), F.conv_transpose2d(x, w, stride=2), atol=1e-5)
        True
    """
    channels, out_channels, kh, kw = weight.shape
    height, width = x.shape[-2:]
    if kh % 2 or kw % 2:
        weight = F.pad(weight, (0, kw % 2, 0, kh % 2))
    mh, mw = (kh + 1) // 2, (kw + 1) // 2
    # phase kernel [(o, a, b), c, u, v] = weight[c, o, a + 2 (mh - 1 - u), b + 2 (mw - 1 - v)]
    kernel = (
        weight.reshape(channels, out_channels, mh, 2, mw, 2)
        .flip(2, 4)
        .permute(1, 3, 5, 0, 2, 4)
        .reshape(out_channels * 4, channels, mh, mw)
    )
    bias = bias.repeat_interleave(4) if bias is not None else None
    out = F.conv2d(x, kernel, bias, padding=(mh - 1, mw - 1))
    return F.pixel_shuffle(out, 2)[..., : 2 * (height - 1) + kh, : 2 * (width - 1) + kw]


class _TransposedConvSummedBias(torch.autograd.Function):
    """``F.conv_transpose2d`` whose backward takes the bias gradient as a sum of the output gradient.

    oneDNN's backward of a transposed convolution computes the bias gradient inside the weight-gradient kernel, and
    slowly: for the decoder's middle layers at the Atari preset, one core, 400 images, 34 ms (192 -> 96) and 62 ms
    (96 -> 48) more than the weight gradient alone, where ``grad.sum((0, 2, 3))`` takes 1.3 and 6.2 ms. The input and
    weight gradients are oneDNN's, asked for without the bias.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, output_padding)
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, output_padding = ctx.geometry
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        if needs_x or needs_weight:
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, (1, 1), True, output_padding, 1,
                [needs_x, needs_weight, False],
            )
        if needs_bias:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None


def conv_transpose2d_summed_bias(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 2,
    padding: int = 0,
    output_padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)``, with the bias gradient taken as a
    sum of the output gradient instead of in oneDNN's slow bias kernel (CPU, see the decoder).

    Same values and gradients (only the order of the floating-point sums differs). A batch of images
    ``[N, C, H, W]``, no dilation, one group (the decoder's layers). Under autocast the inputs are cast as
    ``F.conv_transpose2d``'s would be (float64 ones are left as they are). Backpropagated through once (no second
    derivative).

    Examples:
        >>> x, w, b = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(3)
        >>> torch.allclose(conv_transpose2d_summed_bias(x, w, b), F.conv_transpose2d(x, w, b, stride=2), atol=1e-5)
        True
    """
    if x.dim() != 4:
        raise ValueError(f"conv_transpose2d_summed_bias takes a batch of images [N, C, H, W], got {tuple(x.shape)}.")
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # what autocast casts: lower-precision and float32 tensors, not float64 ones
        dtype = torch.get_autocast_dtype(device)
        x, weight, bias = (
            t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, weight, bias)
        )
    with torch.autocast(device, enabled=False):  # the inputs carry autocast's dtypes already
        return _TransposedConvSummedBias.apply(x, weight, bias, pair(stride), pair(padding), pair(output_padding))


def same_batch(*tensors: torch.Tensor) -> torch.Size:
    """The leading (batch) dimensions that ``[*batch, features]`` tensors share; a one-line error if they differ.

    Examples:
        >>> same_batch(torch.zeros(2, 3, 4), torch.zeros(2, 3, 1))
        torch.Size([2, 3])
    """
    batch = tensors[0].shape[:-1]
    if any(t.shape[:-1] != batch for t in tensors[1:]):
        raise ValueError(f"The inputs must share their leading dimensions, got {[tuple(t.shape) for t in tensors]}.")
    return batch


def linear_on_parts(parts: Sequence[torch.Tensor], layer: nn.Linear) -> torch.Tensor:
    """``layer(torch.cat(parts, -1))``, without building the concatenation where that is cheaper.

    The layer's weight is split by columns, one block per part, and every block's product
    is accumulated into one output (``addmm_``): the same function of the same parameters
    (only the order of the floating-point sums differs), without the ``[N, sum of sizes]``
    copy that ``torch.cat`` makes. The price is the weight gradient, assembled from its
    blocks in the backward (an ``[out, in]`` copy), so the blocks are used when the batch
    ``N`` is larger than ``out_features`` or no weight gradient is taken (imagination's
    heads, critics, RSSM), and the concatenation otherwise (the RSSM's filter over 16
    sequences, one step at a time). The model state ``[state, belief]`` enters every head,
    the decoder and the RSSM this way.

    Args:
        parts (sequence of Tensor): ``[*batch, size_i]`` each, with the same ``batch``.
        layer (nn.Linear): with ``in_features == sum of size_i``.

    Returns: ``[*batch, out_features]``; for a 2-D ``batch``-by-feature input, a fresh tensor (not a view), on
    which an activation may work in place.

    Examples:
        >>> layer = nn.Linear(5, 3)
        >>> a, b = torch.randn(2, 4, 2), torch.randn(2, 4, 3)
        >>> torch.allclose(linear_on_parts([a, b], layer), layer(torch.cat([a, b], -1)), atol=1e-6)
        True
    """
    batch = same_batch(*parts)
    sizes = [part.shape[-1] for part in parts]
    if sum(sizes) != layer.in_features:
        raise ValueError(f"The parts have {sum(sizes)} features in all ({sizes}), the layer takes {layer.in_features}.")
    flat = [part.reshape(-1, size) for part, size in zip(parts, sizes)]
    rows = flat[0].shape[0]
    weight_grad = torch.is_grad_enabled() and layer.weight.requires_grad
    if weight_grad and rows <= layer.out_features:
        out = F.linear(torch.cat(flat, -1), layer.weight, layer.bias)
    else:
        weights = layer.weight.split(sizes, 1)
        out = F.linear(flat[0], weights[0], layer.bias)
        for x, weight in zip(flat[1:], weights[1:]):
            # in place into the fresh output (the product's backward does not need it); the casts are no-ops
            # except under autocast, where the output is in the lower precision
            out = out.addmm_(x.to(out.dtype), weight.t().to(out.dtype))
    return out if len(batch) == 1 else out.view(*batch, layer.out_features)


class MLP(nn.Sequential):
    """Dense layers with ELU activations and a linear output layer.

    The ELUs work in place on the fresh outputs of the dense layers (whose backward does
    not need them): no extra activation tensor, and the gradient is taken from the ELU's
    output, ``grad * (y + 1)`` for ``y < 0``, as the reference (TensorFlow's ``EluGrad``)
    does, instead of ``exp(x)``.

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
            layers += [nn.Linear(in_features if i == 0 else num_cells, num_cells), nn.ELU(inplace=True)]
        layers.append(nn.Linear(num_cells if depth else in_features, out_features))
        super().__init__(*layers)
        glorot_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1]
        out = self.run_from(0, x.reshape(-1, x.shape[-1]))
        return out.view(*batch, out.shape[-1])

    def run_from(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """The layers from index ``start`` on, on ``[N, features]`` (the dense layers' outputs are then fresh
        tensors, not views, so the ELUs work in place)."""
        for i in range(start, len(self)):
            x = self[i](x)
        return x


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
        batch = same_batch(state, belief)
        # the first layer on the two parts (no [state, belief] copy), everything on [N, features]
        x = linear_on_parts([state.reshape(-1, state.shape[-1]), belief.reshape(-1, belief.shape[-1])], self.mlp[0])
        out = self.mlp.run_from(1, x)
        return out.view(*batch, out.shape[-1])


def conv_layout(
    image_size: int | tuple[int, int], full_coverage: bool | None = None
) -> tuple[bool, list[tuple[int, int]]]:
    """Chooses the convolution stack for an image size; returns it with the map size after each layer.

    * Reference stack (``full_coverage=None`` at exactly 64 x 64, or ``False``): 4 unpadded
      convolutions, 64 -> 31 -> 14 -> 6 -> 2. It never sees input rows and columns 62 and 63
      (the second layer drops the first layer's last output row).
    * Full-coverage stack (every other size, or ``True``): padding 1, so each layer maps a side
      ``n`` to ``n // 2`` and every input pixel reaches the embedding. Layers are added until the
      smaller side is at most 4, with at most 4 layers: 16 -> 8 -> 4 (2 layers), 32 -> 3 layers,
      48 -> 24 -> 12 -> 6 -> 3 and 84 -> 42 -> 21 -> 10 -> 5 (4 layers).

    Args:
        image_size (int or (int, int)): ``H`` (square) or ``(H, W)``, each at least 16.
        full_coverage (bool, optional): see above. Default: ``None``.

    Returns: ``(full_coverage, sizes)`` with ``sizes[0] = (H, W)`` and ``sizes[i]`` after layer ``i``.

    Examples:
        >>> conv_layout(64)
        (False, [(64, 64), (31, 31), (14, 14), (6, 6), (2, 2)])
        >>> conv_layout((17, 20))
        (True, [(17, 20), (8, 10), (4, 5)])
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(height, width) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"Images must be at least {MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE} pixels, got {height} x {width}: add a resize "
            "transform to the env (torchrl.envs.Resize, which needs torchvision, or torch.nn.functional.interpolate in "
            "a torchrl.envs.UnaryTransform) or build it larger (make_env's suites take a size argument)."
        )
    reference = (height, width) == (64, 64)
    if full_coverage is False and not reference:
        raise ValueError(f"The reference (unpadded) stack exists only at 64 x 64, got {height} x {width}.")
    if reference and not full_coverage:
        return False, [(64, 64), (31, 31), (14, 14), (6, 6), (2, 2)]
    sizes = [(height, width)]
    while len(sizes) <= _MAX_LAYERS and min(sizes[-1]) > 4:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return True, sizes


class ConvEncoderV2(nn.Module):
    """Image encoder: stride-2 convolutions with kernel 4 and ELU (see :func:`conv_layout`).

    Reference stack at 64x64 with depth 48: channels 48, 96, 192, 384, no padding,
    64 -> 31 -> 14 -> 6 -> 2, flattened to a 1536-dimensional embedding. Full-coverage
    stack (every other size): padding 1, channels ``depth * 2**i``, e.g. 84 -> 42 -> 21 -> 10 -> 5.

    Args:
        in_channels (int): image channels (1 for grayscale Atari, 3 for RGB).

    Keyword Args:
        depth (int): channels of the first layer, doubled at each layer. Default: ``48``.
        image_size (int or (int, int)): input ``H`` (square) or ``(H, W)``, at least 16. Default: ``64``.
        full_coverage (bool, optional): the stack, see :func:`conv_layout`. Default: ``None``.
        fast_path (bool): compute the convolutions with the kernels of :func:`conv2d_patches`
            and channels-last activations (same function, same parameters); ``False`` runs
            the plain ``nn.Sequential``. Can be changed at any time. Default: ``True``.

    Inputs: pixels ``[*batch, C, H, W]``: ``uint8`` (normalised to ``x / 255 - 0.5``) or floats (used as they are).

    Returns: embedding ``[*batch, embed_dim]``.

    Examples:
        >>> enc = ConvEncoderV2(1, depth=4)
        >>> enc(torch.zeros(2, 3, 1, 64, 64, dtype=torch.uint8)).shape
        torch.Size([2, 3, 128])
        >>> ConvEncoderV2(3, depth=4, image_size=(17, 20)).embed_dim  # 8 channels x 4 x 5
        160
    """

    def __init__(
        self,
        in_channels: int,
        *,
        depth: int = 48,
        image_size: int | tuple[int, int] = 64,
        full_coverage: bool | None = None,
        fast_path: bool = True,
    ):
        super().__init__()
        self.full_coverage, self.layer_sizes = conv_layout(image_size, full_coverage)
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(len(self.layer_sizes) - 1):
            layers += [nn.Conv2d(channels, depth * 2**i, 4, stride=2, padding=int(self.full_coverage)), nn.ELU()]
            channels = depth * 2**i
        self.convs = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.image_size = self.layer_sizes[0]
        self.embed_dim = channels * math.prod(self.layer_sizes[-1])
        self.fast_path = fast_path
        glorot_init_(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = pixels.shape[:-3]
        if pixels.shape[-3:] != (self.in_channels, *self.image_size):
            raise ValueError(
                f"Expected images of shape [*, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}], "
                f"got {tuple(pixels.shape)}."
            )
        x = preprocess_obs(pixels.reshape(-1, *pixels.shape[-3:]), self.convs[0].weight.dtype)
        if not self.fast_path:
            return self.convs(x).reshape(*batch, self.embed_dim)
        # Same layers, CPU-friendly kernels: the first (few input channels) and last (few
        # output pixels) convolutions as patch matrix products (on the padded input for the
        # full-coverage stack), the others on channels-last activations; every activation
        # stays channels-last.
        convs = [m for m in self.convs if isinstance(m, nn.Conv2d)]
        for i, conv in enumerate(convs):
            # (under torch.compile the patch product becomes a plain convolution: inductor's CPU code for the
            # backward of the overlapping unfold writes out of bounds in torch 2.13)
            if i in (0, len(convs) - 1) and not torch.compiler.is_compiling():
                padded = F.pad(x, (conv.padding[0],) * 4) if conv.padding[0] else x
                x = conv2d_patches(padded, conv.weight, conv.bias, stride=2, elu=True)
            else:
                # ELU in place on the fresh convolution output (the convolution's backward does not need it)
                x = F.elu_(conv(x.contiguous(memory_format=torch.channels_last)))
        return x.reshape(*batch, self.embed_dim)


class ConvDecoderV2(nn.Module):
    """Image decoder: a dense layer, then stride-2 transposed convolutions mirroring :class:`ConvEncoderV2`.

    Reference stack at 64x64 with depth 48: dense 1624 -> 1536, reshape to ``1536 x 1 x 1``,
    transposed convs with kernels 5, 5, 6, 6 and channels 192, 96, 48, C (1 -> 5 -> 13 -> 30 -> 64).
    Full-coverage stack: dense to the encoder's last map (``C_L x h x w``), then transposed convs
    with kernel 4, padding 1 and an output padding of 0 or 1 that lands exactly on each of the
    encoder's sizes (e.g. 5 -> 10 -> 21 -> 42 -> 84). ELU between layers, none on the last.

    Args:
        state_dim (int): stochastic state size.
        belief_dim (int): deterministic state size.
        out_channels (int): image channels.

    Keyword Args:
        depth (int): base channel count. Default: ``48``.
        image_size (int or (int, int)): output ``H`` (square) or ``(H, W)``, at least 16. Default: ``64``.
        full_coverage (bool, optional): the stack, see :func:`conv_layout`. Default: ``None``.
        fast_path (bool): compute the reference stack's first transposed convolution with
            :func:`conv_transpose2d_1x1`, the last with :func:`conv_transpose2d_subpixel` (cropped by
            the padding) and the others on channels-last activations, on the CPU with
            :func:`conv_transpose2d_summed_bias` (same function, same parameters); ``False`` runs the plain
            ``nn.Sequential``. Can be changed at any time. Default: ``True``.

    Returns: the predicted mean of the normalised image, ``[*batch, C, H, W]``.

    Examples:
        >>> dec = ConvDecoderV2(8, 4, 1, depth=4)
        >>> dec(torch.zeros(2, 8), torch.zeros(2, 4)).shape
        torch.Size([2, 1, 64, 64])
        >>> ConvDecoderV2(8, 4, 3, depth=4, image_size=(17, 20))(torch.zeros(2, 8), torch.zeros(2, 4)).shape
        torch.Size([2, 3, 17, 20])
    """

    def __init__(
        self,
        state_dim: int,
        belief_dim: int,
        out_channels: int,
        *,
        depth: int = 48,
        image_size: int | tuple[int, int] = 64,
        full_coverage: bool | None = None,
        fast_path: bool = True,
    ):
        super().__init__()
        self.full_coverage, sizes = conv_layout(image_size, full_coverage)
        num_layers = len(sizes) - 1
        if self.full_coverage:
            self.in_shape = (depth * 2 ** (num_layers - 1), *sizes[-1])
            kernels = (4,) * num_layers
        else:
            self.in_shape, kernels = (32 * depth, 1, 1), _REFERENCE_KERNELS
        self.linear = nn.Linear(state_dim + belief_dim, math.prod(self.in_shape))
        layers: list[nn.Module] = []
        channels = self.in_shape[0]
        for i, kernel in enumerate(kernels):
            last = i == num_layers - 1
            out = out_channels if last else depth * 2 ** (num_layers - 2 - i)
            (h_in, w_in), (h_out, w_out) = sizes[num_layers - i], sizes[num_layers - 1 - i]
            extra = (h_out - 2 * h_in, w_out - 2 * w_in) if self.full_coverage else 0  # padding 1: out = 2 in + extra
            pad = int(self.full_coverage)
            layers.append(nn.ConvTranspose2d(channels, out, kernel, stride=2, padding=pad, output_padding=extra))
            if not last:
                layers.append(nn.ELU())
            channels = out
        self.deconvs = nn.Sequential(*layers)
        self.out_shape = (out_channels, *sizes[0])
        self.fast_path = fast_path
        glorot_init_(self)

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        batch = state.shape[:-1]
        x = linear_on_parts([state, belief], self.linear).reshape(-1, *self.in_shape)
        if not self.fast_path:
            return self.deconvs(x).reshape(*batch, *self.out_shape)
        # Same layers, CPU-friendly kernels: a transposed convolution of a 1x1 input as a matrix
        # product, the last (few output channels) as a sub-pixel convolution cropped by the
        # padding (its output padding keeps one more row/column at the bottom/right), the others
        # on channels-last activations (on the CPU with the bias gradient as a sum).
        deconvs = [m for m in self.deconvs if isinstance(m, nn.ConvTranspose2d)]
        height, width = self.out_shape[1:]
        for i, deconv in enumerate(deconvs):
            if i == len(deconvs) - 1:
                pad = deconv.padding[0]
                x = conv_transpose2d_subpixel(x, deconv.weight, deconv.bias)[..., pad : pad + height, pad : pad + width]
            elif x.shape[-2:] == (1, 1):
                x = conv_transpose2d_1x1(x, deconv.weight, deconv.bias, elu=True)
            else:
                # ELU in place on the fresh convolution output (the convolution's backward does not need it)
                x = x.contiguous(memory_format=torch.channels_last)
                if (
                    x.device.type == "cpu"
                    and not torch.compiler.is_compiling()
                    and deconv.dilation == (1, 1)
                    and deconv.groups == 1
                ):
                    x = conv_transpose2d_summed_bias(
                        x, deconv.weight, deconv.bias, deconv.stride, deconv.padding, deconv.output_padding
                    )
                else:
                    x = deconv(x)
                x = F.elu_(x)
        return x.reshape(*batch, *self.out_shape)


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
            layers += [nn.Linear(in_features if i == 0 else num_cells, num_cells), nn.ELU(inplace=True)]
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
