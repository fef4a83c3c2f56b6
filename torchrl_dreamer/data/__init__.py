"""DreamerV2 replay: per-environment FIFO streams of observation rows and the prioritize-ends sequence sampler."""
from torchrl_dreamer.data.replay import DreamerReplayBuffer, make_replay_buffer, transitions_to_rows
from torchrl_dreamer.data.samplers import PrioritizeEndsSampler
from torchrl_dreamer.data.writers import StreamWriter

__all__ = [
    "DreamerReplayBuffer",
    "PrioritizeEndsSampler",
    "StreamWriter",
    "make_replay_buffer",
    "transitions_to_rows",
]
