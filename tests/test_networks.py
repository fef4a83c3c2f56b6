"""The encoder/decoder kernels and the latent sampler compute exactly what the plain PyTorch ops compute."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchrl_dreamer.modules import RSSMV2, ObsDecoderV2, ObsEncoderV2, count_parameters, straight_through_sample
from torchrl_dreamer.modules.networks import (
    MLP,
    ConvDecoderV2,
    ConvEncoderV2,
    FeatHead,
    conv2d_patches,
    conv_layout,
    conv_transpose2d_1x1,
    conv_transpose2d_subpixel,
    conv_transpose2d_summed_bias,
    linear_on_parts,
)

CL = torch.channels_last


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _assert_same_op(fast, ref, inputs, *, atol=1e-10, rtol=1e-10):
    """Same value and same gradient wrt every input (float64)."""
    out_fast, out_ref = fast(*inputs), ref(*inputs)
    assert out_fast.shape == out_ref.shape
    torch.testing.assert_close(out_fast, out_ref, atol=atol, rtol=rtol)
    grad_out = torch.randn_like(out_ref)
    for g_fast, g_ref in zip(_grads(out_fast, inputs, grad_out), _grads(out_ref, inputs, grad_out)):
        torch.testing.assert_close(g_fast, g_ref, atol=atol, rtol=rtol)


def _leaf(*shape, memory_format=torch.contiguous_format):
    return torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()


# ---- convolution kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize(
    "channels,out_channels,size,kernel,stride",
    [(1, 8, 64, 4, 2), (3, 8, 32, 4, 2), (12, 16, 6, 4, 2), (5, 7, 9, 3, 2), (4, 6, 11, 4, 3), (3, 5, 7, 3, 1)],
)
def test_conv2d_patches_matches_conv2d(channels, out_channels, size, kernel, stride, memory_format):
    x = _leaf(3, channels, size, size, memory_format=memory_format)
    w, b = _leaf(out_channels, channels, kernel, kernel), _leaf(out_channels)
    _assert_same_op(
        lambda x, w, b: conv2d_patches(x, w, b, stride=stride),
        lambda x, w, b: F.conv2d(x, w, b, stride=stride),
        (x, w, b),
    )
    _assert_same_op(
        lambda x, w: conv2d_patches(x, w, stride=stride), lambda x, w: F.conv2d(x, w, stride=stride), (x, w)
    )
    assert conv2d_patches(x, w, b, stride=stride).is_contiguous(memory_format=CL)
    _assert_same_op(
        lambda x, w, b: conv2d_patches(x, w, b, stride=stride, elu=True),
        lambda x, w, b: F.elu(F.conv2d(x, w, b, stride=stride)),
        (x, w, b),
    )


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize("channels", [1, 8])  # the bias as a column of ones (8 taps), and added (64)
def test_conv2d_patches_rectangular(channels, memory_format):
    """Non-square images and kernels: the patch gradient's strided additions cover every input pixel."""
    x = _leaf(2, channels, 13, 10, memory_format=memory_format)
    w, b = _leaf(5, channels, 4, 2), _leaf(5)
    _assert_same_op(
        lambda x, w, b: conv2d_patches(x, w, b, stride=3, elu=True),
        lambda x, w, b: F.elu(F.conv2d(x, w, b, stride=3)),
        (x, w, b),
    )
    # an input without a gradient (the encoder's pixels): only the parameters get one
    out = conv2d_patches(x.detach(), w, b, stride=2)
    grad_w, grad_b = torch.autograd.grad(out.sum(), (w, b))
    ref_w, ref_b = torch.autograd.grad(F.conv2d(x.detach(), w, b, stride=2).sum(), (w, b))
    torch.testing.assert_close(grad_w, ref_w)
    torch.testing.assert_close(grad_b, ref_b)


@pytest.mark.parametrize("kernel,stride", [(5, 2), (6, 2), (4, 1), (3, 3)])
def test_conv_transpose2d_1x1_matches_conv_transpose2d(kernel, stride):
    x = _leaf(4, 10, 1, 1)
    w, b = _leaf(10, 6, kernel, kernel), _leaf(6)
    _assert_same_op(
        lambda x, w, b: conv_transpose2d_1x1(x, w, b),
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=stride),
        (x, w, b),
    )
    _assert_same_op(conv_transpose2d_1x1, lambda x, w: F.conv_transpose2d(x, w, stride=stride), (x, w))
    _assert_same_op(
        lambda x, w, b: conv_transpose2d_1x1(x, w, b, elu=True),
        lambda x, w, b: F.elu(F.conv_transpose2d(x, w, b, stride=stride)),
        (x, w, b),
    )
    # a flat [N, C] input is read as [N, C, 1, 1]
    flat = x.detach().flatten(1)
    torch.testing.assert_close(conv_transpose2d_1x1(flat, w, b), F.conv_transpose2d(x, w, b, stride=stride))


# ---- dense layers --------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [(3,), (2, 5), (40,)])  # fewer rows than outputs (concatenated), more (blocks)
def test_linear_on_parts_is_the_layer_on_the_concatenation(rows):
    layer = torch.nn.Linear(7, 6).double()
    a, b, c = _leaf(*rows, 2), _leaf(*rows, 4), _leaf(*rows, 1)
    params = (layer.weight, layer.bias)
    out, ref = linear_on_parts([a, b, c], layer), layer(torch.cat([a, b, c], -1))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad_out = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, (a, b, c, *params), grad_out), _grads(ref, (a, b, c, *params), grad_out)):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    with torch.no_grad():  # no weight gradient: always the blocks
        torch.testing.assert_close(linear_on_parts([a, b, c], layer), ref.detach(), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="leading dimensions"):
        linear_on_parts([a, b[..., :1, :]], torch.nn.Linear(6, 2).double())
    with pytest.raises(ValueError, match="the layer takes 5"):
        linear_on_parts([a, b], torch.nn.Linear(5, 2).double())


def test_mlp_and_feat_head_in_place_elu_give_the_plain_values_and_gradients():
    torch.manual_seed(0)
    mlp = MLP(6, 3, num_cells=8, depth=2).double()
    plain = torch.nn.Sequential(*(torch.nn.ELU() if isinstance(m, torch.nn.ELU) else m for m in mlp))
    x = _leaf(4, 5, 6)
    _assert_same_op(lambda x, *p: mlp(x), lambda x, *p: plain(x), (x, *mlp.parameters()))
    head = FeatHead(4, 2, 1, num_cells=8, depth=2).double()
    plain = torch.nn.Sequential(*(torch.nn.ELU() if isinstance(m, torch.nn.ELU) else m for m in head.mlp))
    state, belief = _leaf(3, 5, 4), _leaf(3, 5, 2)
    _assert_same_op(
        lambda s, b, *p: head(s, b), lambda s, b, *p: plain(torch.cat([s, b], -1)), (state, belief, *head.parameters())
    )
    with pytest.raises(ValueError, match="leading dimensions"):
        head(torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(3, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize(
    "channels,out_channels,size,kernel",
    [(48, 1, 30, (6, 6)), (8, 3, 13, (6, 6)), (8, 4, 5, (5, 5)), (6, 2, 4, (5, 6)), (6, 2, 7, (4, 3)), (5, 3, 1, (6, 6))],
)
def test_conv_transpose2d_subpixel_matches_conv_transpose2d(channels, out_channels, size, kernel, memory_format):
    x = _leaf(2, channels, size, size + 1, memory_format=memory_format)
    w, b = _leaf(channels, out_channels, *kernel), _leaf(out_channels)
    _assert_same_op(
        conv_transpose2d_subpixel, lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2), (x, w, b)
    )
    _assert_same_op(conv_transpose2d_subpixel, lambda x, w: F.conv_transpose2d(x, w, stride=2), (x, w))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize(
    "channels,out_channels,size,kernel,padding,output_padding",
    [(12, 8, 5, 5, 0, 0), (8, 4, 13, 6, 0, 0), (6, 5, 5, 4, 1, 1), (6, 5, (4, 7), 4, 1, (0, 1))],
)
def test_conv_transpose2d_summed_bias_matches_conv_transpose2d(
    channels, out_channels, size, kernel, padding, output_padding, memory_format
):
    height, width = (size, size) if isinstance(size, int) else size
    x = _leaf(3, channels, height, width, memory_format=memory_format)
    w, b = _leaf(channels, out_channels, kernel, kernel), _leaf(out_channels)
    geometry = dict(stride=2, padding=padding, output_padding=output_padding)
    _assert_same_op(
        lambda x, w, b: conv_transpose2d_summed_bias(x, w, b, **geometry),
        lambda x, w, b: F.conv_transpose2d(x, w, b, **geometry),
        (x, w, b),
    )
    _assert_same_op(
        lambda x, w: conv_transpose2d_summed_bias(x, w, **geometry),
        lambda x, w: F.conv_transpose2d(x, w, **geometry),
        (x, w),
    )


def test_conv_transpose2d_summed_bias_under_autocast_and_once_differentiable():
    torch.manual_seed(5)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    w, b = torch.randn(8, 4, 5, 5, requires_grad=True), torch.randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_transpose2d_summed_bias(x, w, b)
        ref = F.conv_transpose2d(x, w, b, stride=2)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)
    grad_out = torch.randn_like(ref)
    for g, g_ref, leaf in zip(_grads(out, (x, w, b), grad_out), _grads(ref, (x, w, b), grad_out), (x, w, b)):
        assert g.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, atol=0.5, rtol=0.05)
    # float64 stays float64 under autocast, as with F.conv_transpose2d (and the decoder's next layer accepts it)
    x64, w64, b64 = x.detach().double(), w.detach().double(), b.detach().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_transpose2d_summed_bias(x64, w64, b64).dtype == torch.float64
        dec = ConvDecoderV2(10, 6, 1, depth=4).double()
        state, belief = torch.zeros(2, 10, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64)
        assert dec(state, belief).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        conv_transpose2d_summed_bias(x[0], w, b)
    (gx,) = torch.autograd.grad(conv_transpose2d_summed_bias(x, w, b).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()


@pytest.mark.parametrize("transposed", [False, True])
def test_channels_last_convolution_matches_default(transposed):
    """The channels-last activations of the fast path give the default-layout result."""
    torch.manual_seed(1)
    if transposed:
        layer = torch.nn.ConvTranspose2d(12, 8, 6, stride=2).double()
        x = _leaf(3, 12, 7, 7)
    else:
        layer = torch.nn.Conv2d(12, 8, 4, stride=2).double()
        x = _leaf(3, 12, 15, 15)
    params = (x, layer.weight, layer.bias)
    _assert_same_op(lambda x, *_: layer(x.contiguous(memory_format=CL)), lambda x, *_: layer(x), params)


def test_kernels_in_float32_at_the_atari_sizes():
    """The re-formulated layers agree with the PyTorch ones in float32 at the preset's shapes."""
    torch.manual_seed(2)
    x = torch.rand(4, 1, 64, 64) - 0.5
    w = torch.randn(48, 1, 4, 4) * 0.3
    torch.testing.assert_close(conv2d_patches(x, w), F.conv2d(x, w, stride=2), atol=1e-5, rtol=1e-4)
    x = torch.randn(4, 192, 6, 6).contiguous(memory_format=CL)
    w = torch.randn(384, 192, 4, 4) * 0.03
    torch.testing.assert_close(conv2d_patches(x, w), F.conv2d(x, w, stride=2), atol=1e-4, rtol=1e-4)
    x, w = torch.randn(4, 1536), torch.randn(1536, 192, 5, 5) * 0.02
    torch.testing.assert_close(
        conv_transpose2d_1x1(x, w), F.conv_transpose2d(x[..., None, None], w, stride=2), atol=1e-4, rtol=1e-4
    )
    x, w = torch.randn(4, 48, 30, 30).contiguous(memory_format=CL), torch.randn(48, 1, 6, 6) * 0.1
    torch.testing.assert_close(conv_transpose2d_subpixel(x, w), F.conv_transpose2d(x, w, stride=2), atol=1e-4, rtol=1e-4)


# ---- encoder and decoder ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels,size,full_coverage",
    [(1, 64, None), (1, 64, True), (3, 32, None), (1, 16, None), (3, (17, 20), None), (2, 84, None), (1, (48, 64), None)],
)
def test_conv_encoder_decoder_fast_path_matches_plain_modules(channels, size, full_coverage):
    stack = dict(depth=4, image_size=size, full_coverage=full_coverage)
    enc = ConvEncoderV2(channels, **stack).double()
    dec = ConvDecoderV2(10, 6, channels, **stack).double()
    assert enc.full_coverage == dec.full_coverage == (size != 64 or bool(full_coverage))
    height, width = (size, size) if isinstance(size, int) else size
    pixels = torch.randint(0, 256, (2, 3, channels, height, width), dtype=torch.uint8)
    state, belief = _leaf(2, 3, 10), _leaf(2, 3, 6)
    params = [*enc.parameters(), *dec.parameters(), state, belief]
    results = []
    for fast in (True, False):
        enc.fast_path = dec.fast_path = fast
        embed, image = enc(pixels), dec(state, belief)
        loss = (embed.sin() * torch.linspace(-1, 1, embed.shape[-1], dtype=embed.dtype)).sum() + (image**2).sum()
        results.append((embed, image, torch.autograd.grad(loss, params)))
    (e1, i1, g1), (e2, i2, g2) = results
    assert e1.shape == (2, 3, enc.embed_dim) and i1.shape == (2, 3, channels, height, width)
    torch.testing.assert_close(e1, e2, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(i1, i2, atol=1e-10, rtol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_fast_path_keeps_modules_parameters_and_initialisation():
    torch.manual_seed(3)
    fast_enc, fast_dec = ConvEncoderV2(1), ConvDecoderV2(1024, 600, 1)
    torch.manual_seed(3)
    plain_enc, plain_dec = ConvEncoderV2(1, fast_path=False), ConvDecoderV2(1024, 600, 1, fast_path=False)
    for fast, plain in ((fast_enc, plain_enc), (fast_dec, plain_dec)):
        assert fast.fast_path and not plain.fast_path
        fast_sd, plain_sd = fast.state_dict(), plain.state_dict()
        assert list(fast_sd) == list(plain_sd)
        for key in fast_sd:
            assert torch.equal(fast_sd[key], plain_sd[key]), key
    assert math.isclose(count_parameters(fast_enc), 1.55e6, rel_tol=0.01)
    assert math.isclose(count_parameters(fast_dec), 10.50e6, rel_tol=0.01)
    assert all(isinstance(m, torch.nn.ConvTranspose2d) for m in fast_dec.deconvs[::2])
    assert all(isinstance(m, torch.nn.Conv2d) for m in fast_enc.convs[::2])


def test_fast_path_in_float32_and_under_bf16_autocast():
    torch.manual_seed(4)
    enc, dec = ConvEncoderV2(1, depth=8), ConvDecoderV2(32, 16, 1, depth=8)
    pixels = torch.randint(0, 256, (5, 1, 64, 64), dtype=torch.uint8)
    state, belief = torch.randn(5, 32), torch.randn(5, 16)
    outs = {}
    for fast in (True, False):
        enc.fast_path = dec.fast_path = fast
        outs[fast] = (enc(pixels), dec(state, belief))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[fast, "bf16"] = (enc(pixels), dec(state, belief))
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(outs[True, "bf16"], outs[False, "bf16"]):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.05)


# ---- image sizes and pixel coverage ------------------------------------------------------------


def _input_gradient(enc, height, width):
    """|d(random projection of the embedding) / d(input)| summed over channels: [H, W]."""
    x = torch.rand(2, enc.in_channels, height, width, dtype=torch.float64, requires_grad=True)
    embed = enc(x)
    (grad,) = torch.autograd.grad((embed * torch.randn_like(embed)).sum(), x)
    return grad.abs().sum((0, 1))


@pytest.mark.parametrize(
    "size,full_coverage,layers",
    [
        (16, None, 2),
        ((17, 20), None, 2),
        (32, None, 3),
        (48, None, 4),
        (64, True, 4),
        (84, None, 4),
        ((84, 16), None, 2),
    ],
)
def test_full_coverage_stack_sees_every_pixel_and_decodes_the_input_shape(size, full_coverage, layers):
    torch.manual_seed(6)
    enc = ConvEncoderV2(2, depth=3, image_size=size, full_coverage=full_coverage).double()
    dec = ConvDecoderV2(5, 4, 2, depth=3, image_size=size, full_coverage=full_coverage)
    height, width = enc.image_size
    assert enc.full_coverage and len(enc.layer_sizes) == layers + 1
    assert min(enc.layer_sizes[-1]) <= 4 or layers == 4
    assert torch.all(_input_gradient(enc, height, width) > 0)
    assert dec(torch.zeros(3, 5), torch.zeros(3, 4)).shape == (3, 2, height, width)


def test_reference_stack_at_64_never_sees_the_last_two_rows_and_columns():
    """The paper's unpadded encoder (64 -> 31 -> 14 -> 6 -> 2) drops the first layer's output row 30."""
    torch.manual_seed(7)
    enc = ConvEncoderV2(1, depth=3).double()
    assert not enc.full_coverage and enc.layer_sizes[-1] == (2, 2)
    grad = _input_gradient(enc, 64, 64)
    seen = grad > 0
    assert not seen[62:].any() and not seen[:, 62:].any()
    assert seen[:62, :62].all()


def test_conv_layout_rules_and_errors():
    assert conv_layout(64) == (False, [(64, 64), (31, 31), (14, 14), (6, 6), (2, 2)])
    assert conv_layout(64, True)[1] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert conv_layout(84)[1][-1] == (5, 5) and conv_layout((17, 20))[1][-1] == (4, 5)
    with pytest.raises(ValueError, match=r"at least 16 x 16.*8 x 16.*Resize.*size argument"):
        conv_layout((8, 16))
    with pytest.raises(ValueError, match="only at 64 x 64"):
        ConvEncoderV2(1, image_size=32, full_coverage=False)
    assert not ConvDecoderV2(4, 4, 1, depth=2, full_coverage=False).full_coverage


# ---- several observation entries -------------------------------------------------------------


def test_obs_encoder_stacks_images_along_channels_and_concatenates_vectors():
    torch.manual_seed(8)
    images, vectors = {"a": (1, 16, 20), ("b", "c"): (2, 16, 20)}, {"v": 3, "w": 2}
    enc = ObsEncoderV2(images, vectors, cnn_depth=2, mlp_units=6, mlp_layers=1)
    a = torch.randint(0, 256, (4, 1, 16, 20), dtype=torch.uint8)
    b = torch.randint(0, 256, (4, 2, 16, 20), dtype=torch.uint8)
    v, w = torch.randn(4, 3), torch.randn(4, 2)
    embed = enc(a, b, v, w)
    assert embed.shape == (4, enc.cnn.embed_dim + 6) == (4, enc.embed_dim)
    torch.testing.assert_close(embed[:, : enc.cnn.embed_dim], enc.cnn(torch.cat([a, b], -3)))
    torch.testing.assert_close(embed[:, enc.cnn.embed_dim :], enc.mlp(torch.cat([v, w], -1)))
    with pytest.raises(ValueError, match="share H x W"):
        ObsEncoderV2({"a": (1, 16, 16), "b": (1, 32, 32)}, {})


def test_obs_decoder_splits_channels_and_features_per_entry():
    dec = ObsDecoderV2(6, 4, {"a": (1, 16, 16), "b": (2, 16, 16)}, {"v": 3, "w": 2}, cnn_depth=2, mlp_units=5)
    state, belief = torch.randn(7, 6), torch.randn(7, 4)
    a, b, v, w = dec(state, belief)
    image, vector = dec.cnn(state, belief), dec.mlp(state, belief)
    assert torch.equal(torch.cat([a, b], -3), image) and torch.equal(torch.cat([v, w], -1), vector)
    assert (a.shape, b.shape, v.shape, w.shape) == ((7, 1, 16, 16), (7, 2, 16, 16), (7, 3), (7, 2))
    assert ObsDecoderV2(6, 4, {}, {"v": 3}, mlp_units=5, mlp_layers=1).cnn is None


# ---- latent sampling -------------------------------------------------------------------------


def test_straight_through_sample_is_one_hot_with_softmax_gradient():
    logits = torch.randn(300, 8, 5, requires_grad=True)
    sample = straight_through_sample(logits)
    assert sample.dtype == logits.dtype and sample.shape == logits.shape
    assert torch.equal(sample.detach().sum(-1), torch.ones(300, 8))
    assert set(sample.detach().unique().tolist()) == {0.0, 1.0}
    # forward value: exactly the one-hot draw; gradient: exactly that of the softmax probabilities
    weights = torch.randn(300, 8, 5)
    (grad,) = torch.autograd.grad((sample * weights).sum(), logits)
    (expected,) = torch.autograd.grad((logits.softmax(-1) * weights).sum(), logits)
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)
    plain = straight_through_sample(logits, straight_through=False)
    assert not plain.requires_grad and torch.equal(plain.sum(-1), torch.ones(300, 8))


def test_straight_through_sample_follows_the_categorical_distribution():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625], [0.0, 0.7, 0.0, 0.3, 0.0], [0.2] * 5])
    logits = probs.log()  # zero probabilities are -inf logits and must never be drawn
    draws = 40_000
    counts = straight_through_sample(logits.expand(draws, 3, 5), straight_through=False).sum(0)
    assert counts[probs == 0].sum() == 0
    expected = probs * draws
    seen = expected > 0
    chi2 = (((counts - expected) ** 2)[seen] / expected[seen]).sum()
    # 13 possible cells, 3 constraints: 10 degrees of freedom, p(chi2 > 40) < 1e-4
    assert chi2 < 40, (chi2, counts)
    # a single-class categorical always draws it; extreme logits behave
    sure = torch.tensor([-1e4, 0.0, -1e4]).expand(1000, 3)
    assert torch.equal(straight_through_sample(sure, straight_through=False)[:, 1], torch.ones(1000))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_straight_through_sample_keeps_the_logits_dtype(dtype):
    logits = torch.randn(64, 4, 6, dtype=dtype, requires_grad=True)
    sample = straight_through_sample(logits)
    assert sample.dtype == dtype
    assert torch.equal(sample.detach().float().sum(-1), torch.ones(64, 4))
    sample.float().sum().backward()
    assert logits.grad is not None
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    freq = straight_through_sample(probs.log().to(dtype).expand(20000, 3), straight_through=False).double().mean(0)
    torch.testing.assert_close(freq, probs.log().to(dtype).double().softmax(-1), atol=0.02, rtol=0)


def test_rssm_sample_uses_the_straight_through_sampler():
    rssm = RSSMV2(action_dim=2, embed_dim=4, num_categoricals=3, num_classes=4, rnn_hidden_dim=5, hidden_dim=5)
    logits = torch.randn(7, 3, 4)
    torch.manual_seed(5)
    flat = rssm.sample(logits)
    torch.manual_seed(5)
    torch.testing.assert_close(flat, straight_through_sample(logits).flatten(-2))
