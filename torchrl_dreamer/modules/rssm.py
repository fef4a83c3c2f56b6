"""The discrete RSSM of DreamerV2: layer-normalised GRU, categorical latents.

Time alignment of one step (the paper's section 2, spec 4.1)::

    z_{t-1}, a_{t-1}, h_{t-1} --prior step--> h_t --> prior logits p(z_t | h_t)
                              h_t, embed(o_t) --posterior step--> q(z_t | h_t, o_t) --> z_t

``state`` is the flattened one-hot sample ``z`` (``num_categoricals * num_classes``),
``belief`` the GRU state ``h``; ``feat = [state, belief]``.  At an episode's
first observation (``is_init``) the previous state, belief and action are zero.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from torchrl_dreamer.modules.networks import glorot_init_, linear_on_parts, same_batch
from torchrl_dreamer.modules.shards import shard_generator

__all__ = ["LayerNormGRUCell", "straight_through_sample", "RSSMV2"]


Dense = Callable[[Sequence[torch.Tensor], nn.Linear], torch.Tensor]


class _Record:
    """The inputs and output gradients of one dense layer at every step of a loop."""

    def __init__(self, steps: int):
        self.inputs: list[torch.Tensor | None] = [None] * steps
        self.grads: list[torch.Tensor | None] = [None] * steps


class _CollectGrad(torch.autograd.Function):
    """Identity on a weight and bias used at every step of a loop; its backward takes their gradients over all steps.

    Every step's product reads the identity's outputs, so autograd runs this backward only after every step's backward
    has recorded its output gradient: the weight's gradient is then one ``[out, T * B] x [T * B, in]`` product and the
    bias's one sum, instead of ``T`` products of ``B`` rows and ``T - 1`` accumulations. The recorded gradients are
    dropped once used, so that a later backward through part of the graph (``retain_graph``) counts only the steps it
    reaches.
    """

    @staticmethod
    def forward(ctx, record: _Record, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.record, ctx.dtype = record, weight.dtype
        ctx.set_materialize_grads(False)  # the steps pass no gradient to it: nothing to allocate
        return weight.view_as(weight), None if bias is None else bias.view_as(bias)

    @staticmethod
    @once_differentiable  # a second derivative through the recorded gradients would be wrong: refuse it
    def backward(ctx, _unused_weight, _unused_bias):
        record = ctx.record
        rows = [(x, g) for x, g in zip(record.inputs, record.grads) if g is not None]
        record.grads = [None] * len(record.grads)
        if not rows:
            return None, None, None
        grads = torch.cat([g for _, g in rows]).to(ctx.dtype)
        weight_grad = grads.t() @ torch.cat([x for x, _ in rows]).to(ctx.dtype) if ctx.needs_input_grad[1] else None
        bias_grad = grads.sum(0) if ctx.needs_input_grad[2] else None
        return None, weight_grad, bias_grad


class _StepLinear(torch.autograd.Function):
    """``F.linear`` at one step of a loop whose weight and bias gradients :class:`_CollectGrad` takes at the end."""

    @staticmethod
    def forward(ctx, x, weight, bias, record: _Record, step: int, weight_t: torch.Tensor):
        ctx.save_for_backward(weight)
        ctx.record, ctx.step, ctx.x_dtype = record, step, x.dtype
        record.inputs[step] = x.detach()
        # x @ weight_t, the weight's transposed copy: on few rows, MKL's product with a transposed operand (what
        # F.linear passes) runs at half the speed (GRU: 0.98 against 0.44 ms for 8 x 1200 x 1800 on one core)
        if x.dim() != 2:
            return F.linear(x, weight, bias)
        return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        ctx.record.grads[ctx.step] = grad
        grad_x = (grad @ weight.to(grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


class _DeferredDense:
    """Dense layers applied once per step of a loop, with their weight gradients taken once over all the steps.

    Autograd takes a layer's weight gradient at every step it is used: in the RSSM's filter, 50 steps of 16 rows,
    a ``[out, 16] x [16, in]`` product that writes the whole gradient (for the GRU's ``1800 x 1200`` weight, bound
    by memory at ~35 GFLOP/s) plus an accumulation into the running sum, per step and layer. This keeps each
    step's input and output gradient and takes each weight's gradient as one product over the ``T * B`` rows once
    every step's backward has run (:class:`_CollectGrad`). Same function, same gradients (only the order of the
    floating-point sums differs); the gradient of each step's input is unchanged. The steps' products read a
    transposed copy of each weight, made once per loop: on few rows, the product with the transposed view that
    ``F.linear`` passes to MKL takes twice as long. It has the signature of
    :func:`~torchrl_dreamer.modules.networks.linear_on_parts` (the parts are concatenated: few rows).

    Args:
        params (sequence of (weight, bias)): the layers' parameters (``bias`` may be ``None``).
        steps (int): steps of the loop; set :attr:`step` before each.
    """

    def __init__(self, params: Sequence[tuple[torch.Tensor, torch.Tensor | None]], steps: int):
        self.step = 0
        self._proxies = {}
        for weight, bias in params:
            record = _Record(steps)
            # the weight is held, so that its id is not reused; its transposed copy, made once for all the steps,
            # is what the steps' products read (see _StepLinear)
            weight_t = weight.detach().t().contiguous()
            device = weight.device.type
            if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
                weight_t = weight_t.to(torch.get_autocast_dtype(device))  # cast once, not at every step
            self._proxies[id(weight)] = (weight, record, *_CollectGrad.apply(record, weight, bias), weight_t)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` with the bias registered for ``weight``."""
        _, record, w, b, weight_t = self._proxies[id(weight)]
        return _StepLinear.apply(x, w, b, record, self.step, weight_t)

    def __call__(self, parts: Sequence[torch.Tensor], layer: nn.Linear) -> torch.Tensor:
        return self.linear(torch.cat(list(parts), -1) if len(parts) > 1 else parts[0], layer.weight)


class LayerNormGRUCell(nn.Module):
    """The layer-normalised GRU cell of DreamerV2 (not ``torch.nn.GRUCell``).

    .. math::
        [r, c, u] &= \\mathrm{LN}(W [x, h] + b) \\\\
        h' &= \\sigma(u - 1) \\tanh(\\sigma(r) c) + (1 - \\sigma(u - 1)) h

    One linear layer to ``3 * hidden_size`` units and one LayerNorm over all of
    them (eps 1e-3, learned affine); the reset gate scales the whole candidate
    pre-activation and the update gate has a bias of -1.

    Args:
        input_size (int): size of ``x``.
        hidden_size (int): size of ``h``.

    Keyword Args:
        eps (float): LayerNorm epsilon. Default: ``1e-3``.
        update_bias (float): added to the update gate. Default: ``-1.0``.

    Examples:
        >>> cell = LayerNormGRUCell(3, 4)
        >>> cell(torch.zeros(2, 3), torch.zeros(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, input_size: int, hidden_size: int, *, eps: float = 1e-3, update_bias: float = -1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.update_bias = update_bias
        self.linear = nn.Linear(input_size + hidden_size, 3 * hidden_size)
        self.norm = nn.LayerNorm(3 * hidden_size, eps=eps)
        glorot_init_(self)

    def forward(self, x: torch.Tensor, h: torch.Tensor, *, dense: Dense = linear_on_parts) -> torch.Tensor:
        parts = self.norm(dense([x, h], self.linear))
        reset, cand, update = parts.chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update + self.update_bias)
        return update * cand + (1 - update) * h


def straight_through_sample(logits: torch.Tensor, *, straight_through: bool = True) -> torch.Tensor:
    """One-hot sample of a categorical over the last dimension, with straight-through gradients.

    ``sample = one_hot(draw) + probs - stop_grad(probs)``: the forward value is
    one-hot, the gradient flows through the softmax probabilities. The draw
    inverts the cumulative distribution: with ``u ~ U[0, 1)`` (one number per
    categorical) the class is the first ``i`` with ``u < sum_{j <= i} p_j``,
    which happens with probability ``p_i``. It traces under ``torch.compile``.

    Args:
        logits (Tensor): unnormalised log-probabilities ``[..., num_classes]``.

    Keyword Args:
        straight_through (bool): add the straight-through gradient path (only where a gradient can flow:
            ``logits`` requiring grad in grad mode; the value is the same one-hot either way). Default: ``True``.

    Returns: a one-hot tensor with the dtype of ``logits``.

    Examples:
        >>> sample = straight_through_sample(torch.zeros(5, 32, 32))
        >>> bool((sample.sum(-1) == 1).all())
        True
    """
    precise = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    straight_through = straight_through and logits.requires_grad and torch.is_grad_enabled()
    probs = logits.softmax(-1) if straight_through else None
    if probs is not None and probs.dtype == precise:
        cdf = probs.detach().cumsum(-1)
    else:  # half-precision logits: draw from float32 probabilities
        cdf = logits.detach().to(precise).softmax(-1).cumsum(-1)
    # u is scaled by the computed total so that rounding of the cumulative sum cannot leave it uncovered
    # in a shard of a sharded pass, the shard's own generator (torchrl_dreamer.modules.shards); else torch's
    generator = shard_generator()
    total = cdf[..., -1:]
    # (rand_like draws the same numbers as torch.rand of that shape, and traces under dynamic shapes)
    if generator is None:
        u = torch.rand_like(total)
    else:
        u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device, generator=generator)
    u = u * total
    index = (cdf <= u).sum(-1, keepdim=True).clamp_max_(logits.shape[-1] - 1)
    sample = torch.zeros_like(logits).scatter_(-1, index, 1.0)
    if straight_through:
        sample = sample + (probs - probs.detach())  # exactly one-hot forward value
    return sample


class RSSMV2(nn.Module):
    """Recurrent state-space model with categorical latents (DreamerV2).

    Holds the prior (``img_*``) and posterior (``obs_*``) networks and provides
    one-step functions and :meth:`observe`, the filter over a ``[B, T]``
    sequence of embeddings. Imagination under a policy is a TorchRL rollout of
    :class:`~torchrl_dreamer.envs.DreamerV2ImaginationEnv`, whose step is
    :class:`~torchrl_dreamer.modules.RSSMPriorStepV2`.

    Keyword Args:
        action_dim (int): size of the (one-hot or continuous) action.
        embed_dim (int): size of the observation embedding.
        num_categoricals (int): number of categorical latents. Default: ``32``.
        num_classes (int): classes per categorical. Default: ``32``.
        rnn_hidden_dim (int): GRU size (deterministic state). Default: ``600``.
        hidden_dim (int): hidden units of the prior/posterior MLPs. Default: ``600``.

    Examples:
        >>> rssm = RSSMV2(action_dim=3, embed_dim=16, num_categoricals=4, num_classes=4,
        ...               rnn_hidden_dim=8, hidden_dim=8)
        >>> out = rssm.observe(torch.zeros(2, 5, 16), torch.zeros(2, 5, 3), torch.zeros(2, 5, 1, dtype=torch.bool))
        >>> out["state"].shape, out["prior_logits"].shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 4, 4]))
    """

    def __init__(
        self,
        *,
        action_dim: int,
        embed_dim: int,
        num_categoricals: int = 32,
        num_classes: int = 32,
        rnn_hidden_dim: int = 600,
        hidden_dim: int = 600,
    ):
        super().__init__()
        self.action_dim = action_dim
        self.embed_dim = embed_dim
        self.num_categoricals = num_categoricals
        self.num_classes = num_classes
        self.state_dim = num_categoricals * num_classes
        self.rnn_hidden_dim = rnn_hidden_dim
        # prior: x = ELU(W [z, a]); h = GRU(x, h); logits = W2 ELU(W1 h)
        self.img_in = nn.Linear(self.state_dim + action_dim, hidden_dim)
        self.cell = LayerNormGRUCell(hidden_dim, rnn_hidden_dim)
        self.img_out = nn.Linear(rnn_hidden_dim, hidden_dim)
        self.img_logits = nn.Linear(hidden_dim, self.state_dim)
        # posterior: logits = W2 ELU(W1 [h, embed])
        self.obs_out = nn.Linear(rnn_hidden_dim + embed_dim, hidden_dim)
        self.obs_logits = nn.Linear(hidden_dim, self.state_dim)
        glorot_init_(self)

    # ---- one-step functions -------------------------------------------------------------
    def deter_step(
        self, state: torch.Tensor, action: torch.Tensor, belief: torch.Tensor, *, dense: Dense = linear_on_parts
    ) -> torch.Tensor:
        """``h_t = GRU(ELU(W [z_{t-1}, a_{t-1}]), h_{t-1})`` (``dense(parts, layer)`` computes the dense layers)."""
        batch = same_batch(state, action, belief)
        # on [N, features]: the dense layer's output is fresh (not a view), so the ELU works in place
        flat = [state.reshape(-1, state.shape[-1]), action.to(state.dtype).reshape(-1, action.shape[-1])]
        x = F.elu_(dense(flat, self.img_in))
        return self.cell(x, belief.reshape(-1, belief.shape[-1]), dense=dense).view(*batch, belief.shape[-1])

    def prior_logits(self, belief: torch.Tensor) -> torch.Tensor:
        """Prior logits ``[..., num_categoricals, num_classes]`` from ``h_t``."""
        # on [N, features]: the dense layer's output is fresh (not a view), so the ELU works in place
        hidden = F.elu_(self.img_out(belief.reshape(-1, belief.shape[-1])))
        return self.img_logits(hidden).view(*belief.shape[:-1], self.num_categoricals, self.num_classes)

    def posterior_logits(self, belief: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """Posterior logits ``[..., num_categoricals, num_classes]`` from ``h_t`` and ``embed(o_t)``."""
        same_batch(belief, embed)
        flat = [belief.reshape(-1, belief.shape[-1]), embed.reshape(-1, embed.shape[-1])]
        logits = self.obs_logits(F.elu_(linear_on_parts(flat, self.obs_out)))
        return logits.view(*belief.shape[:-1], self.num_categoricals, self.num_classes)

    def sample(self, logits: torch.Tensor, *, straight_through: bool = True) -> torch.Tensor:
        """Flattened straight-through one-hot sample of ``[..., K, C]`` logits."""
        return straight_through_sample(logits, straight_through=straight_through).flatten(-2)

    def initial(self, batch_shape: tuple[int, ...], *, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero ``(state, belief)`` for ``batch_shape``."""
        ref = self.img_in.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        return (
            torch.zeros(*batch_shape, self.state_dim, device=device, dtype=dtype),
            torch.zeros(*batch_shape, self.rnn_hidden_dim, device=device, dtype=dtype),
        )

    # ---- rollouts ------------------------------------------------------------------------
    def observe(
        self, embed: torch.Tensor, prev_action: torch.Tensor, is_init: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Filters a ``[B, T]`` sequence: posterior states and prior logits at every step.

        Step ``t`` sees the embedding of ``o_t`` and the action ``a_{t-1}`` that led
        to it. The state is zero at ``t = 0`` (every sequence starts from a zero
        state, no burn-in) and wherever ``is_init`` is True, where the previous
        action is zeroed too.

        Args:
            embed (Tensor): ``[B, T, embed_dim]``.
            prev_action (Tensor): ``[B, T, action_dim]``, the action before each observation.
            is_init (Tensor): ``[B, T, 1]`` bool, episode starts.

        Returns: a dict of ``state [B, T, S]``, ``belief [B, T, D]``,
        ``prior_logits`` and ``posterior_logits`` ``[B, T, K, C]``.
        """
        batch, steps = embed.shape[:2]
        keep = (~is_init.bool()).to(embed.dtype)
        keep[:, 0] = 0.0
        prev_action = prev_action.to(embed.dtype) * keep
        # the embedding half of the posterior's first layer, for all steps at once
        w_belief, w_embed = self.obs_out.weight.split([self.rnn_hidden_dim, self.embed_dim], dim=1)
        embed_proj = F.linear(embed, w_embed, self.obs_out.bias)
        state, belief = self.initial((batch,), device=embed.device, dtype=embed.dtype)
        states, beliefs, post_logits = [], [], []
        layers = (self.img_in, self.cell.linear, self.obs_logits)
        if torch.is_grad_enabled() and self.img_in.weight.requires_grad and not torch.compiler.is_compiling():
            # each weight's gradient once over all steps, not once per step (see _DeferredDense)
            dense = _DeferredDense([(m.weight, m.bias) for m in layers] + [(w_belief, None)], steps)
            belief_in, obs_logits = dense.linear, lambda x: dense([x], self.obs_logits)
        else:
            dense, belief_in, obs_logits = linear_on_parts, F.linear, self.obs_logits
        for t in range(steps):
            mask = keep[:, t]
            if isinstance(dense, _DeferredDense):
                dense.step = t
            belief = self.deter_step(state * mask, prev_action[:, t], belief * mask, dense=dense)
            hidden = F.elu_(belief_in(belief, w_belief) + embed_proj[:, t])
            logits = obs_logits(hidden).unflatten(-1, (self.num_categoricals, self.num_classes))
            state = self.sample(logits)
            states.append(state)
            beliefs.append(belief)
            post_logits.append(logits)
        beliefs_t = torch.stack(beliefs, 1)
        return {
            "state": torch.stack(states, 1),
            "belief": beliefs_t,
            "prior_logits": self.prior_logits(beliefs_t),  # all steps in one batched pass
            "posterior_logits": torch.stack(post_logits, 1),
        }
