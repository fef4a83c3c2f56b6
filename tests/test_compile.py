"""The compiled update (torch.compile of the stepper's forward/backward passes) against the eager one, on CPU."""
from __future__ import annotations

import pytest
import torch
from torchrl.data import Composite, OneHot, Unbounded

from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
from torchrl_dreamer.objectives import make_dreamerv2_loss, make_target_updater
from torchrl_dreamer.trainers import DreamerV2OptimizationStepper, make_dreamerv2_optimizers

from conftest import make_batch

SPEC = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))


def _stepper(**kwargs):
    torch.manual_seed(3)
    models = make_dreamerv2_models(SPEC, OneHot(3), **DEBUG_SIZES)
    loss = make_dreamerv2_loss(models, imagination_horizon=4)
    stepper = DreamerV2OptimizationStepper(loss, make_dreamerv2_optimizers(loss), **kwargs)
    return stepper, make_target_updater(loss.value_loss, interval=2)


def test_compiled_update_gives_the_eager_losses_gradients_and_weights():
    eager, eager_updater = _stepper()
    compiled, compiled_updater = _stepper(compile=True, warmup_steps=2)
    batches = [make_batch(2, 6) for _ in range(3)]
    rng = torch.get_rng_state()
    # inductor draws its own random numbers unless told to call torch's: the same draws make the same samples
    with torch._inductor.config.patch(fallback_random=True):
        # the warm-up compiles and changes nothing: weights, slow critic, gradients, optimisers, RNG
        weights = [p.detach().clone() for p in compiled.loss.parameters()]
        buffers = [b.detach().clone() for b in compiled.loss.buffers()]
        torch.manual_seed(7)
        before = torch.get_rng_state()
        compiled.warmup(batches[0])
        assert compiled._passes is not None and torch.equal(torch.get_rng_state(), before)
        assert all(torch.equal(a, b) for a, b in zip(weights, compiled.loss.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(buffers, compiled.loss.buffers()))
        assert all(p.grad is None for p in compiled.loss.parameters())
        assert all(not opt.state for opt in compiled.optimizers.values())
        for i, batch in enumerate(batches):
            torch.manual_seed(10 + i)
            expected = eager.step(None, batch.clone())
            eager_updater.step()
            torch.manual_seed(10 + i)
            got = compiled.step(None, batch.clone())
            compiled_updater.step()
            for key in ("model_loss", "model_kl", "image_loss", "reward_loss", "actor_loss", "actor_ent", "critic_loss", "critic",
                        "model_grad_norm", "actor_grad_norm", "critic_grad_norm"):
                torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=f"update {i}: {key}")
            for (name, a), b in zip(eager.loss.named_parameters(), compiled.loss.parameters()):
                if a.grad is not None or b.grad is not None:
                    torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=f"update {i}: grad {name}")
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"update {i}: {name}")
    for a, b in zip(eager.loss.buffers(), compiled.loss.buffers()):  # the slow critic and its copies
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert eager.optimizers["model"].state_dict()["state"].keys() == compiled.optimizers["model"].state_dict()[
        "state"].keys()
    torch.set_rng_state(rng)


def test_bad_compile_settings_are_refused():
    with pytest.raises(RuntimeError, match="cudagraph=True needs the loss on a CUDA device"):
        _stepper(cudagraph=True)[0].warmup(make_batch(2, 6))
    with pytest.raises(ValueError, match="warmup_steps must be at least 2"):
        _stepper(compile=True, warmup_steps=1)
    with pytest.raises(ValueError, match="warmup_steps must be at least 3"):
        _stepper(compile=True, cudagraph=True, warmup_steps=2)
