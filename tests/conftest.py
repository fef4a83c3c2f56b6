from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

# the tests import their user-env factories as ``tests.user_envs``, under ``pytest`` as under ``python -m pytest``
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def make_batch(batch: int = 2, steps: int = 6, *, action_dim: int = 3, image: tuple = (1, 16, 16),
               discrete: bool = True, obs_key: str = "pixels") -> TensorDict:
    """A random [B, T] training batch in the TorchRL transition layout."""
    if discrete:
        action = torch.nn.functional.one_hot(torch.randint(action_dim, (batch, steps)), action_dim).float()
    else:
        action = torch.rand(batch, steps, action_dim) * 2 - 1
    if len(image) == 3:
        obs = torch.randint(0, 256, (batch, steps, *image), dtype=torch.uint8)
    else:
        obs = torch.randn(batch, steps, *image)
    return TensorDict(
        {
            obs_key: obs,
            "action": action,
            "is_init": torch.zeros(batch, steps, 1, dtype=torch.bool),
            ("next", "reward"): torch.randn(batch, steps, 1),
            ("next", "terminated"): torch.zeros(batch, steps, 1, dtype=torch.bool),
        },
        [batch, steps],
    )


def row_local_sample(logits: torch.Tensor, *, straight_through: bool = True) -> torch.Tensor:
    """A one-hot "draw" that depends on each row's logits only (their argmax after a fixed offset per class): the
    same whether the row is in a shard or not, and not moved by a rounding difference of the logits."""
    offsets = (torch.arange(logits.shape[-1], dtype=torch.float64) * 0.618).frac().to(logits) * 2
    index = (logits.detach() + offsets).argmax(-1, keepdim=True)
    sample = torch.zeros_like(logits).scatter_(-1, index, 1.0)
    if straight_through and logits.requires_grad and torch.is_grad_enabled():
        probs = logits.softmax(-1)
        sample = sample + (probs - probs.detach())
    return sample
