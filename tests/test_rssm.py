"""The layer-norm GRU, straight-through sampling and the RSSM rollouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchrl_dreamer.modules import LayerNormGRUCell, RSSMV2, straight_through_sample


def _hand_gru_step(cell: LayerNormGRUCell, x, h):
    w, b = cell.linear.weight, cell.linear.bias
    parts = torch.cat([x, h], -1) @ w.T + b
    mu = parts.mean(-1, keepdim=True)
    var = parts.var(-1, unbiased=False, keepdim=True)
    parts = (parts - mu) / torch.sqrt(var + 1e-3) * cell.norm.weight + cell.norm.bias
    n = h.shape[-1]
    reset, cand, update = parts[..., :n], parts[..., n : 2 * n], parts[..., 2 * n :]
    reset = torch.sigmoid(reset)
    cand = torch.tanh(reset * cand)
    update = torch.sigmoid(update - 1.0)
    return update * cand + (1 - update) * h


def test_layernorm_gru_matches_hand_written_step():
    cell = LayerNormGRUCell(5, 7)
    with torch.no_grad():  # non-trivial affine to exercise every term
        cell.norm.weight.uniform_(0.5, 1.5)
        cell.norm.bias.uniform_(-0.5, 0.5)
        cell.linear.bias.uniform_(-0.5, 0.5)
    x, h = torch.randn(4, 5), torch.randn(4, 7)
    torch.testing.assert_close(cell(x, h), _hand_gru_step(cell, x, h))
    assert cell.norm.eps == 1e-3
    assert cell.linear.weight.shape == (21, 12)  # one linear to 3 x units


def test_straight_through_sample_value_and_gradient():
    logits = torch.randn(2000, 4, 3, requires_grad=True)
    sample = straight_through_sample(logits)
    assert torch.equal(sample.detach().sum(-1), torch.ones(2000, 4))
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    # gradient flows through the softmax probabilities
    weights = torch.randn(3)
    (sample * weights).sum().backward()
    probs = logits.softmax(-1)
    expected = torch.autograd.grad((probs * weights).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)
    # empirical frequencies follow the softmax
    logits = torch.tensor([2.0, 0.0, -1.0]).expand(20000, 3)
    freq = straight_through_sample(logits, straight_through=False).mean(0)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.02, rtol=0)


def _rssm():
    return RSSMV2(action_dim=3, embed_dim=10, num_categoricals=4, num_classes=5, rnn_hidden_dim=8, hidden_dim=9)


def test_observe_shapes_and_resets():
    rssm = _rssm()
    embed, action = torch.randn(2, 6, 10), torch.randn(2, 6, 3)
    is_init = torch.zeros(2, 6, 1, dtype=torch.bool)
    out = rssm.observe(embed, action, is_init)
    assert out["state"].shape == (2, 6, 20) and out["belief"].shape == (2, 6, 8)
    assert out["prior_logits"].shape == out["posterior_logits"].shape == (2, 6, 4, 5)
    # the state at an is_init step is computed from zeros: same as a fresh sequence starting there
    is_init[:, 3] = True
    torch.manual_seed(1)
    full = rssm.observe(embed, action, is_init)
    torch.manual_seed(2)
    fresh = rssm.observe(embed[:, 3:], action[:, 3:] * 0 + 7, torch.zeros(2, 3, 1, dtype=torch.bool))
    torch.testing.assert_close(full["belief"][:, 3], fresh["belief"][:, 0])
    torch.testing.assert_close(full["posterior_logits"][:, 3], fresh["posterior_logits"][:, 0])
    # step 0 ignores the action given there (zero previous action)
    torch.testing.assert_close(
        rssm.observe(embed, action, is_init)["belief"][:, 0], rssm.observe(embed, action * 5, is_init)["belief"][:, 0]
    )


def test_observe_matches_one_step_functions():
    rssm = _rssm()
    embed, action = torch.randn(2, 4, 10), torch.randn(2, 4, 3)
    torch.manual_seed(3)
    out = rssm.observe(embed, action, torch.zeros(2, 4, 1, dtype=torch.bool))
    state, belief = rssm.initial((2,))
    for t in range(4):
        prev = action[:, t] if t > 0 else torch.zeros(2, 3)
        belief = rssm.deter_step(state, prev, belief)
        torch.testing.assert_close(out["belief"][:, t], belief)
        torch.testing.assert_close(out["prior_logits"][:, t], rssm.prior_logits(belief))
        torch.testing.assert_close(out["posterior_logits"][:, t], rssm.posterior_logits(belief, embed[:, t]))
        state = out["state"][:, t]  # the sampled latent is fed forward


def test_observe_gradients_match_the_one_step_functions_chained():
    # observe takes each dense layer's weight gradient once over all steps (_DeferredDense); chaining the one-step
    # functions takes it once per step: the same gradients, for the parameters and the embeddings, across resets
    rssm = RSSMV2(action_dim=3, embed_dim=10, num_categoricals=4, num_classes=5, rnn_hidden_dim=6, hidden_dim=7).double()
    embed = torch.randn(3, 6, 10, dtype=torch.float64, requires_grad=True)
    action = torch.randn(3, 6, 3, dtype=torch.float64)
    is_init = torch.zeros(3, 6, 1, dtype=torch.bool)
    is_init[1, 3] = True
    weights = {k: torch.randn(s, dtype=torch.float64) for k, s in
               [("state", (3, 6, 20)), ("belief", (3, 6, 6)), ("prior_logits", (3, 6, 4, 5)),
                ("posterior_logits", (3, 6, 4, 5))]}
    params = [embed, *rssm.parameters()]

    torch.manual_seed(7)
    out = rssm.observe(embed, action, is_init)
    grads = torch.autograd.grad(sum((out[k] * w).sum() for k, w in weights.items()), params)
    node, seen = out["belief"].grad_fn, set()
    stack = [node]
    while stack:  # the deferred path was taken
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [n for n, _ in node.next_functions]
    assert any(type(n).__name__ == "_CollectGradBackward" for n in seen)

    torch.manual_seed(7)
    keep = (~is_init).double()
    keep[:, 0] = 0.0
    state, belief = rssm.initial((3,))
    ref = {"state": [], "belief": [], "posterior_logits": []}
    for t in range(6):
        mask = keep[:, t]
        belief = rssm.deter_step(state * mask, action[:, t] * mask, belief * mask)
        logits = rssm.posterior_logits(belief, embed[:, t])
        state = rssm.sample(logits)
        for key, value in zip(ref, (state, belief, logits)):
            ref[key].append(value)
    ref = {k: torch.stack(v, 1) for k, v in ref.items()}
    ref["prior_logits"] = rssm.prior_logits(ref["belief"])
    for key in weights:
        torch.testing.assert_close(out[key], ref[key], atol=1e-12, rtol=1e-12)
    ref_grads = torch.autograd.grad(sum((ref[k] * w).sum() for k, w in weights.items()), params)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    with torch.no_grad():  # without gradients, the plain one-step path
        torch.manual_seed(7)
        torch.testing.assert_close(rssm.observe(embed, action, is_init)["belief"], out["belief"].detach())


def test_observe_refuses_a_second_derivative():
    rssm = _rssm()
    embed = torch.randn(2, 3, 10, requires_grad=True)
    out = rssm.observe(embed, torch.randn(2, 3, 3), torch.zeros(2, 3, 1, dtype=torch.bool))
    (grad,) = torch.autograd.grad(out["belief"].square().sum(), embed, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad.sum().backward()


def test_observe_second_backward_through_part_of_the_graph_counts_only_the_steps_it_reaches():
    rssm = RSSMV2(action_dim=3, embed_dim=10, num_categoricals=4, num_classes=5, rnn_hidden_dim=6, hidden_dim=7).double()
    embed, action = torch.randn(2, 4, 10, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    is_init = torch.zeros(2, 4, 1, dtype=torch.bool)
    params = list(rssm.parameters())
    torch.manual_seed(1)
    out = rssm.observe(embed, action, is_init)
    # the first loss reaches the last step's posterior layers (through the state), the second does not
    torch.autograd.grad(out["state"].square().sum(), params, retain_graph=True, allow_unused=True)
    grads = torch.autograd.grad(out["belief"].sum(), params, allow_unused=True)
    torch.manual_seed(1)
    keep = torch.ones(2, 4, 1, dtype=torch.float64)
    keep[:, 0] = 0.0
    state, belief = rssm.initial((2,))
    beliefs = []
    for t in range(4):
        belief = rssm.deter_step(state * keep[:, t], action[:, t] * keep[:, t], belief * keep[:, t])
        state = rssm.sample(rssm.posterior_logits(belief, embed[:, t]))
        beliefs.append(belief)
    ref = torch.autograd.grad(torch.stack(beliefs, 1).sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, ref):
        if g_ref is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


def test_one_step_functions_refuse_mismatched_batches():
    rssm = _rssm()
    with pytest.raises(ValueError, match="leading dimensions"):
        rssm.deter_step(torch.zeros(2, 3, 20), torch.zeros(6, 3), torch.zeros(3, 2, 8))
    with pytest.raises(ValueError, match="leading dimensions"):
        rssm.posterior_logits(torch.zeros(2, 3, 8), torch.zeros(3, 2, 10))


def test_deferred_dense_under_bf16_autocast_matches_the_layer():
    # the filter's products under autocast: the weight's transposed copy is cast once per loop, and each step's
    # product and the weight and bias gradients are those of the plain layer under autocast
    from torchrl_dreamer.modules.rssm import _DeferredDense

    torch.manual_seed(8)
    layer = torch.nn.Linear(12, 9)
    xs = [torch.randn(5, 12, requires_grad=True) for _ in range(3)]
    gs = [torch.randn(5, 9) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = _DeferredDense([(layer.weight, layer.bias)], steps=3)
        assert dense._proxies[id(layer.weight)][-1].dtype == torch.bfloat16
        outs = []
        for t, x in enumerate(xs):
            dense.step = t
            outs.append(dense.linear(x, layer.weight))
        refs = [F.linear(x, layer.weight, layer.bias) for x in xs]
    for out, ref in zip(outs, refs):
        assert out.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref, atol=0, rtol=0.01)
    params = [*xs, layer.weight, layer.bias]
    grads = torch.autograd.grad(outs, params, gs)
    ref_grads = torch.autograd.grad(refs, params, gs)
    for g, g_ref, p in zip(grads, ref_grads, params):
        assert g.dtype == p.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, atol=0.05, rtol=0.02)
