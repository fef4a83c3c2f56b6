"""DreamerV2 replay: a TorchRL replay buffer of observation rows, episodes by trajectory id, end-favouring sequences."""
from torchrl_dreamer.data.episodes import EpisodeTable
from torchrl_dreamer.data.replay import (
    DiskFullError,
    DreamerReplayBuffer,
    PreallocatedMemmapStorage,
    ReplayIntegrityError,
    make_replay_buffer,
)
from torchrl_dreamer.data.rows import is_transition_batch, transitions_as_sequences, transitions_to_rows
from torchrl_dreamer.data.samplers import PrioritizeEndsSampler
from torchrl_dreamer.data.writers import FifoWriter

__all__ = [
    "DiskFullError",
    "DreamerReplayBuffer",
    "PreallocatedMemmapStorage",
    "EpisodeTable",
    "FifoWriter",
    "PrioritizeEndsSampler",
    "ReplayIntegrityError",
    "is_transition_batch",
    "make_replay_buffer",
    "transitions_as_sequences",
    "transitions_to_rows",
]
