"""Sharded updates (torchrl_dreamer.modules.shards): the whole batch's losses and gradients, in worker threads."""
from __future__ import annotations

import threading

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Composite, OneHot, Unbounded

import torchrl_dreamer.modules.actor as actor_module
import torchrl_dreamer.modules.rssm as rssm_module
from torchrl_dreamer.modules import DEBUG_SIZES, ShardPool, make_dreamerv2_models, run_sharded, shard_generator
from torchrl_dreamer.objectives import make_dreamerv2_loss, make_target_updater
from torchrl_dreamer.trainers import DreamerV2OptimizationStepper, make_dreamerv2_optimizers

from conftest import make_batch, row_local_sample as _row_local_sample

SPEC = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))


def _stepper(shards: int, action_spec=None, seed: int = 3, actor_grad: str = "reinforce"):
    torch.manual_seed(seed)
    models = make_dreamerv2_models(SPEC, action_spec if action_spec is not None else OneHot(3), **DEBUG_SIZES)
    loss = make_dreamerv2_loss(models, imagination_horizon=4, actor_grad=actor_grad)
    stepper = DreamerV2OptimizationStepper(loss, make_dreamerv2_optimizers(loss), shards=shards)
    return stepper, make_target_updater(loss.value_loss, interval=2)


def _passes(loss, batch):
    """Both passes of an update on one model (no optimiser step between them): metrics and gradients."""
    model_out, posteriors = loss.model_loss(batch.clone())
    actor_out, trajectory = loss.actor_loss(posteriors.detach())
    value_out = loss.value_loss(trajectory)
    total = sum(v for k, v in model_out.items() if k.startswith("loss_")) + actor_out["loss_actor"]
    total = total + value_out["loss_value"]
    params = [p for p in loss.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    metrics = {**model_out.detach().to_dict(), **actor_out.detach().to_dict(), **value_out.detach().to_dict()}
    return metrics, dict(zip([n for n, p in loss.named_parameters() if p.requires_grad], grads))


@pytest.mark.parametrize("shards, actor_grad", [(2, "reinforce"), (3, "reinforce"), (2, "dynamics"), (3, "both")])
def test_sharded_passes_give_the_whole_batch_losses_and_gradients(monkeypatch, shards, actor_grad):
    # the samples are the only thing a shard changes (its own generator): with draws that depend on the logits
    # alone, the sharded passes are the whole batch's, up to the order of floating-point sums; with dynamics
    # gradients the actor's gradient comes back from the slow critic's values through the imagined states
    monkeypatch.setattr(rssm_module, "straight_through_sample", _row_local_sample)
    monkeypatch.setattr(actor_module, "straight_through_sample", _row_local_sample)
    stepper, _ = _stepper(1, actor_grad=actor_grad)
    batch = make_batch(5, 6)  # 5 sequences: uneven shards (3 + 2; 2 + 2 + 1), 30 imagination starts
    batch["is_init"][1, 2] = True  # an episode start inside a sequence: the masked reward mean spans the shards
    batch["next", "terminated"][3, 4] = True
    expected, expected_grads = _passes(stepper.loss, batch)
    threads = []  # where the critic (and the slow critic, the same module) runs
    stepper.loss.value_loss.value_network.register_forward_hook(
        lambda *_: threads.append(threading.current_thread().name)
    )
    with ShardPool(shards) as pool:
        got, got_grads = _passes(stepper.loss, batch)
    pool.close()
    # slow critic on the rollout's states and on the last ones, then the critic: each in every shard's thread
    assert len(threads) == 3 * shards and all(name.startswith("dreamer-shard") for name in threads)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in expected_grads.items():
        if grad is None:
            assert got_grads[name] is None, name
        else:
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    actor_grads = [got_grads[n] for n in got_grads if n.startswith("actor_loss.")]
    assert actor_grads and all(g is not None for g in actor_grads) and any(g.abs().sum() > 0 for g in actor_grads)
    model_grads = [got_grads[n] for n in got_grads if n.startswith("model_loss.")]
    assert model_grads and all(g is not None and g.abs().sum() > 0 for g in model_grads)
    # the critic's values run in shards too (the slow critic's as well: its values feed the actor's targets)
    critic_grads = [got_grads[n] for n in got_grads if n.startswith("value_loss.")]
    assert critic_grads and all(g is not None and g.abs().sum() > 0 for g in critic_grads)


@pytest.mark.parametrize("continuous", [False, True])
def test_sharded_updates_repeat_bit_for_bit_under_a_seed(continuous):
    action_spec = Bounded(-1.0, 1.0, (2,)) if continuous else OneHot(3)
    runs = []
    for _ in range(2):
        # continuous actions as the DMC preset trains them: dynamics gradients through the truncated normal's draws
        stepper, updater = _stepper(2, action_spec, actor_grad="dynamics" if continuous else "reinforce")
        torch.manual_seed(11)
        for _ in range(2):
            batch = make_batch(4, 6, action_dim=2 if continuous else 3, discrete=not continuous)
            metrics = stepper.step(None, batch)
            updater.step()
        runs.append(([p.detach().clone() for p in stepper.loss.parameters()], metrics, torch.get_rng_state()))
    (w1, m1, rng1), (w2, m2, rng2) = runs
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert all(torch.equal(m1[k], m2[k]) for k in m1.keys())
    assert torch.equal(rng1, rng2)  # the shards' seeds come from torch's generator, in order


def test_each_shard_draws_its_own_numbers_seeded_from_torchs_generator():
    td = TensorDict({"x": torch.zeros(4, 1)}, [4])

    def fn(t):
        assert shard_generator() is not None
        return t.set("u", torch.rand(t.shape[0], 3, generator=shard_generator()))

    with ShardPool(2) as pool:
        torch.manual_seed(1)
        first, second = run_sharded(fn, td)["u"], run_sharded(fn, td)["u"]
        torch.manual_seed(1)
        again = run_sharded(fn, td)["u"]
    pool.close()
    assert shard_generator() is None
    assert not torch.equal(first[:2], first[2:])  # the shards' streams differ
    assert not torch.equal(first, second)  # and each call draws new ones
    assert torch.equal(first, again)  # from torch's generator


def test_shard_workers_run_one_torch_thread_each_and_leave_the_callers_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    pool = ShardPool(3)
    try:
        seen = pool.map(lambda _: (threading.get_ident(), torch.get_num_threads()), range(3))
        assert torch.get_num_threads() == 2
        assert {count for _, count in seen} == {1}
        assert threading.get_ident() not in {ident for ident, _ in seen}
    finally:
        pool.close()
        torch.set_num_threads(before)


def test_run_sharded_differentiates_its_inputs_and_params_and_refuses_unlisted_ones():
    net = torch.nn.Linear(3, 2).double()
    other = torch.nn.Linear(2, 2).double()
    x = torch.randn(7, 3, dtype=torch.double, requires_grad=True)
    td = TensorDict({"x": x, "n": torch.arange(7)}, [7])

    def fn(t):
        return t.set("y", torch.tanh(net(t["x"]))).set("twice", t["n"] * 2)

    with ShardPool(3) as pool:
        out = run_sharded(fn, td, net.parameters())
        assert out.batch_size == (7,) and torch.equal(out["twice"], torch.arange(7) * 2)
        (out["y"] ** 2).sum().backward()
        got = [x.grad.clone(), *(p.grad.clone() for p in net.parameters())]
        x.grad = None
        net.zero_grad()
        (torch.tanh(net(x)) ** 2).sum().backward()
        for a, b in zip(got, [x.grad, *(p.grad for p in net.parameters())]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # a parameter read but not listed: its gradient would be lost, so it is an error
        with pytest.raises(RuntimeError, match="neither in params nor in its input"):
            run_sharded(lambda t: t.set("z", other(net(t["x"]))), td, net.parameters())
        # without grad, the same outputs and no graph
        with torch.no_grad():
            plain = run_sharded(fn, td, net.parameters())
        assert not plain["y"].requires_grad and torch.allclose(plain["y"], out["y"])
        # a tensor computed outside from a parameter: every shard would run its backward
        doubled = net.weight * 2
        with pytest.raises(RuntimeError, match="computed outside it"):
            run_sharded(lambda t: t.set("z", t["x"] @ doubled.t()), td, net.parameters())
        # an unlisted tensor requiring grad passed straight through
        with pytest.raises(RuntimeError, match="neither in params nor in its input"):
            run_sharded(lambda t: t.set("w", other.weight.expand(t.shape[0], 2, 2)), td, net.parameters())
        # a draw from torch's global generator inside the shards: said once
        with pytest.warns(UserWarning, match="drew from torch's global generator"):
            run_sharded(lambda t: t.set("r", torch.rand(t.shape[0])), td.exclude("x"))
        # parameters that the outputs do not depend on: nothing to differentiate
        unused = run_sharded(lambda t: t.set("z", t["n"] + 1), td.exclude("x"), net.parameters())
        assert torch.equal(unused["z"], torch.arange(7) + 1)
    pool.close()


def test_a_failing_shard_raises_after_every_shard_has_finished_and_nested_calls_run_as_one_pass():
    finished = []

    def fn(t):
        if t["x"][0] == 0:
            raise ValueError("bad shard")
        finished.append(threading.get_ident())
        return t.set("inner", run_sharded(lambda u: u.set("y", u["x"] * 2), t)["y"])  # inside a shard: one pass

    td = TensorDict({"x": torch.arange(6.0)}, [6])
    with ShardPool(3) as pool:
        with pytest.raises(ValueError, match="bad shard"):
            run_sharded(fn, td)
        assert len(finished) == 2  # the other shards ran to their end before the error came out
        out = run_sharded(fn, TensorDict({"x": torch.arange(1.0, 7.0)}, [6]))
    pool.close()
    assert torch.equal(out["inner"], torch.arange(1.0, 7.0) * 2)


def test_a_single_sequence_is_not_split_along_time():
    stepper, _ = _stepper(1)
    sequence = make_batch(1, 8)[0]  # [T]: its only dimension is time
    torch.manual_seed(4)
    expected, _ = stepper.loss.model_loss(sequence.clone())
    with ShardPool(2) as pool:
        torch.manual_seed(4)
        got, _ = stepper.loss.model_loss(sequence.clone())
    pool.close()
    assert all(torch.equal(got[k], expected[k]) for k in expected.keys())


def test_bad_shard_settings_are_refused():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="shards must be an int >= 1"):
            _stepper(bad)
        with pytest.raises(ValueError, match="shards must be an int >= 1"):
            ShardPool(bad)
    with pytest.raises(ValueError, match="cannot be combined with compile or cudagraph"):
        torch.manual_seed(0)
        models = make_dreamerv2_models(SPEC, OneHot(3), **DEBUG_SIZES)
        loss = make_dreamerv2_loss(models)
        DreamerV2OptimizationStepper(loss, make_dreamerv2_optimizers(loss), shards=2, compile=True)
