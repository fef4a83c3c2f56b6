"""How much memory one update needs, estimated from the models and the batch before any work is done.

The trainer checks it against the memory the system has free when it is built, so that a batch too large for the
machine is refused in one line at start-up, not by an allocator error after the prefill (with nothing
checkpointed).

The estimate counts what an update keeps alive at its peak, in 4-byte floats:

* the parameters with their gradients and the two Adam moments (4 copies);
* per frame of the batch (``batch_size * batch_length``): the encoder's and decoder's activations, each layer's
  output kept for the backward with its gradient and a working copy (3 copies; the first layer's patch matrix as
  well), the image itself as floats, and the RSSM filter's states (GRU gates, hidden layer, logits);
* per imagined state (every frame is a start, ``imagination_horizon`` steps each): the actor's and the critic's
  layer outputs kept for their backward (3 copies), and with dynamics gradients the RSSM's and heads' too;
* the process itself (torch, the envs, the replay's working set): a fixed 0.4 GiB.

Measured against the peak resident memory of an update (``benchmarks/update_speed.py`` in a fresh process), it is
within about 25% at the Atari preset and the CPU presets (see ``tests/test_robustness.py``).
"""
from __future__ import annotations

import math
import os

from torch import nn

__all__ = ["available_memory", "estimate_update_memory"]

_FLOAT = 4
_BASE = 0.4 * 2**30


def _cnn_floats(channels: int, sizes: list[tuple[int, int]], depth: int) -> int:
    """Activation floats of one image through the encoder and the decoder (layer outputs, patches)."""
    layers = [depth * 2**i * h * w for i, (h, w) in enumerate(sizes[1:])]
    first_patches = sizes[1][0] * sizes[1][1] * 16 * channels
    image = channels * sizes[0][0] * sizes[0][1]
    return 2 * sum(layers) + first_patches + 2 * image


def estimate_update_memory(
    world_model: nn.Module,
    actor: nn.Module,
    critic: nn.Module,
    *,
    batch_size: int,
    batch_length: int,
    imagination_horizon: int,
    dynamics_gradients: bool,
) -> int:
    """Bytes one update keeps alive at its peak (see the module docstring).

    Args:
        world_model (WorldModelV2): the world model.
        actor, critic (nn.Module): the actor and the critic.

    Keyword Args:
        batch_size, batch_length (int): the sequences of a batch.
        imagination_horizon (int): imagined steps per start.
        dynamics_gradients (bool): the actor's gradient flows through the imagined transitions (``"dynamics"`` or
            ``"both"``), which keeps the world model's imagination graph.

    Returns: the estimate in bytes.
    """
    params = sum(p.numel() for module in (world_model, actor, critic) for p in module.parameters())
    frames = batch_size * batch_length
    rssm = world_model.rssm
    feat = rssm.state_dim + rssm.rnn_hidden_dim
    hidden = rssm.img_in.out_features
    per_frame = 3 * (3 * rssm.rnn_hidden_dim + hidden + 2 * rssm.state_dim + feat)
    encoder = world_model.encoder
    if encoder.cnn is not None:
        channels = sum(shape[0] for shape in encoder.cnn_shapes.values())
        depth = encoder.cnn.convs[0].out_channels
        per_frame += 3 * _cnn_floats(channels, encoder.cnn.layer_sizes, depth)
    if encoder.mlp is not None:
        per_frame += 3 * 2 * sum(m.out_features for m in encoder.mlp.modules() if isinstance(m, nn.Linear))
    head_units = sum(m.out_features for net in (actor, critic) for m in net.modules() if isinstance(m, nn.Linear))
    per_state = 3 * (head_units + feat)
    if dynamics_gradients:
        per_state += 3 * (3 * rssm.rnn_hidden_dim + hidden + 2 * rssm.state_dim) + 3 * sum(
            m.out_features for name in ("reward_head", "continue_head")
            for m in (getattr(world_model, name) or nn.Module()).modules() if isinstance(m, nn.Linear))
    floats = 4 * params + frames * per_frame + frames * imagination_horizon * per_state
    return int(_BASE + _FLOAT * floats)


def available_memory() -> int | None:
    """Bytes the system can give this process now (``MemAvailable`` of ``/proc/meminfo``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(size: float) -> str:
    """``size`` bytes in GiB, one decimal (``math.ceil`` to the tenth, never 0.0 for a positive size)."""
    return f"{math.ceil(size / 2**30 * 10) / 10:.1f} GiB"
