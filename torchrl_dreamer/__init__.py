"""torchrl_dreamer: DreamerV2 (Hafner et al., ICLR 2021) as TorchRL modules, losses and training.

Importing it before torch makes idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``, unless
the variable is already set): OpenMP reads its wait policy once, when torch loads it. In training the env
workers and the collector share the cores with the learner, and spinning threads then fight them for the cores
(one update at the Atari preset, 2 threads, one core busy: 11.1 s spinning, 7.8 s passive; idle: 4.4 s both).
When torch was imported first, set ``OMP_WAIT_POLICY=PASSIVE`` in the environment or ``torch.set_num_threads(1)``;
the trainer says so when it starts with spinning threads.

It also makes every thread of the process allocate from glibc's main heap (``M_ARENA_MAX = 1``, where the C
library is glibc): a thread keeps the arena it first allocated from, and the update's worker threads
(:class:`~torchrl_dreamer.modules.ShardPool`) would otherwise be given arenas that return their memory to the
system and fault it in again every update (see :func:`~torchrl_dreamer.trainers.keep_freed_memory`).
"""
import os
import sys

from torchrl_dreamer._glibc import M_ARENA_MAX, mallopt

OMP_WAIT_POLICY_SET = "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
if OMP_WAIT_POLICY_SET:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
mallopt((M_ARENA_MAX, 1))

from torchrl_dreamer import modules, objectives  # noqa: E402

__version__ = "0.1.0"
__all__ = ["modules", "objectives", "__version__"]
