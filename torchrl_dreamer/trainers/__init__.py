"""Optimisers, the DreamerV2 optimisation stepper, the TorchRL trainer and its hooks."""
from torchrl_dreamer.trainers.optim import DreamerV2Optimizer
from torchrl_dreamer.trainers.stepper import DreamerV2OptimizationStepper, NonFiniteUpdateError, make_dreamerv2_optimizers
from torchrl_dreamer.trainers.allocator import keep_freed_memory
from torchrl_dreamer.trainers.threads import available_cores, default_shards, parse_threads
from torchrl_dreamer.trainers.hooks import (
    CheckpointHook,
    CheckpointWriteError,
    EpisodeReturnHook,
    EvaluationHook,
    Every,
    NonFiniteInputHook,
    OpenLoopVideoHook,
    SpeedReportHook,
    TrainMetricsHook,
    health_warnings,
    UpdateSchedule,
)
from torchrl_dreamer.trainers.trainer import (
    CHECKPOINT_FILE,
    CheckpointError,
    DreamerV2Trainer,
    RunLock,
    RunLockedError,
    make_dreamerv2_trainer,
    resolve_device,
)
