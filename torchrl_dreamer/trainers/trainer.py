"""DreamerV2 training on TorchRL's :class:`~torchrl.trainers.Trainer`: one loop, behaviour as hooks.

Data flow (every piece a TorchRL one, each injectable)::

    user env (+ InitTracker + the policy's primer) --Collector--> [num_envs, train_every / num_envs] transitions
        --> ReplayBufferTrainer.extend --> DreamerReplayBuffer (memmap, one row per observation)
        --> UpdateSchedule (prefill, pretrain, train_every) --> ReplayBufferTrainer.sample --> [B, L] sequences
        --> DreamerV2OptimizationStepper (model, actor, critic steps; eager through trainer.compute_loss, or compiled)
        --> TargetNetUpdaterHook (HardUpdate), EpisodeReturnHook, TrainMetricsHook, EvaluationHook, OpenLoopVideoHook,
            CheckpointHook

:func:`make_dreamerv2_trainer` builds all of it from a :class:`~torchrl_dreamer.config.DreamerV2Config` in one run
directory: ``config.json``, ``checkpoint.tdz`` (an atomic :class:`~torchrl.checkpoint.Checkpoint` archive),
``replay/`` (memory-mapped rows), ``scalars/*.csv``, ``tb/`` (TensorBoard, when installed) and ``videos/``.
Building it again on the same directory resumes the run.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from torchrl.checkpoint import Checkpoint, GlobalRNGState
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, SliceSampler, TensorDictReplayBuffer
from torchrl.envs import EnvBase, ParallelEnv, SerialEnv
from torchrl.objectives.utils import TargetNetUpdater
from torchrl.trainers import ReplayBufferTrainer, TargetNetUpdaterHook, Trainer, TrainerHookBase

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.data import DiskFullError, DreamerReplayBuffer, ReplayIntegrityError, make_replay_buffer
from torchrl_dreamer.envs.resolve import EnvFactory, EnvLike, prepare_env
from torchrl_dreamer.modules.builders import is_discrete_action_spec
from torchrl_dreamer.record import make_logger
from torchrl_dreamer.trainers.allocator import keep_freed_memory
from torchrl_dreamer.trainers.memory import available_memory, estimate_update_memory, gib
from torchrl_dreamer.trainers.threads import available_cores, default_shards
from torchrl_dreamer.trainers.hooks import (
    CheckpointHook,
    EpisodeReturnHook,
    EvaluationHook,
    EvaluationStopped,
    NonFiniteInputHook,
    SpeedReportHook,
    OpenLoopVideoHook,
    TrainMetricsHook,
    UpdateSchedule,
)

__all__ = [
    "DreamerV2Trainer",
    "make_dreamerv2_trainer",
    "resolve_device",
    "CheckpointError",
    "RunLockedError",
    "CHECKPOINT_FILE",
]

CHECKPOINT_FILE = "checkpoint.tdz"
FINAL_EVAL_FILE = "final_eval.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# fields that may differ when a run is resumed
_RESUMABLE_CHANGES = {
    "total_steps", "eval_every", "log_every", "video_every", "checkpoint_every", "eval_episodes", "eval_envs",
    "final_eval_episodes", "compile", "cudagraph", "compile_policy",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; validates explicit requests."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto.")
    return device


class DreamerV2Trainer(Trainer):
    """A TorchRL :class:`~torchrl.trainers.Trainer` that trains DreamerV2; its behaviour is a set of hooks.

    The components are injected, as in TorchRL's algorithm trainers (``SACTrainer``, ``DQNTrainer``); the
    DreamerV2 hooks (:mod:`torchrl_dreamer.trainers.hooks`) are registered at their default stages. Register
    stock TorchRL hooks (``LogScalar``, ``UpdateWeights``, ``CountFramesLog``...) or your own with
    :meth:`register_op` / ``hook.register(trainer)`` before calling :meth:`train`.

    Ctrl-C and SIGTERM stop the loop at the end of the current iteration (a second one stops at once); the run's
    state is then checkpointed. :func:`make_dreamerv2_trainer` builds every component from a config.

    Building it makes this process's allocator keep the memory each update frees for the next update
    (:func:`~torchrl_dreamer.trainers.keep_freed_memory`: about 20% of a CPU update's time went to faulting it
    in again).

    Args:
        collector: a TorchRL collector over the prepared env (``init_random_frames`` = the prefill).
        loss_module (DreamerV2Loss): the composite loss (``model_loss``, ``actor_loss``, ``value_loss``).
        optimization_stepper (DreamerV2OptimizationStepper): one update of the three optimisers.
        replay_buffer: the replay: a :class:`~torchrl_dreamer.data.DreamerReplayBuffer` (observation rows,
            ``[B, T]`` sequences), or a stock TorchRL ``TensorDictReplayBuffer`` whose ``SliceSampler`` samples
            transitions (the losses read them as sequences, see
            :func:`~torchrl_dreamer.data.transitions_as_sequences`).
        target_net_updater (TargetNetUpdater): the slow critic's copies (TorchRL's ``HardUpdate``, see
            :func:`~torchrl_dreamer.objectives.make_target_updater`), stepped by a stock
            :class:`~torchrl.trainers.TargetNetUpdaterHook` after each update.
        total_steps (int): agent steps to train for (summed over envs).
        action_repeat (int): frames per agent step (the logged x-axis is frames).

    Keyword Args:
        prefill, pretrain, train_every: see :class:`UpdateSchedule`.
        logger: a logger with ``log_scalar(name, value, step)`` and ``log_video``. Default: ``None``.
        checkpoint (Checkpoint, optional): the components to save; the trainer registers its own ones into it.
        checkpoint_path (str | Path, optional): the archive to write; ``None`` disables checkpoints.
        checkpoint_every, log_every, eval_every, video_every (int): agent steps between two of each.
        policy (optional): the acting policy, for evaluation.
        make_eval_env (callable, optional): ``make_eval_env(seed, num_envs)`` returns the evaluation env (one env
            for ``num_envs=1``, else a batched env of ``num_envs``); ``None`` disables evaluation.
        eval_episodes (int): episodes per evaluation. Default: ``1``.
        eval_envs (int): envs stepped together in an evaluation, the policy acting for all at once. Default: ``1``.
        final_eval_episodes (int): greedy episodes of a final evaluation when training ends (logged as
            ``final_eval_return`` and written to ``final_eval.json`` beside the checkpoint); ``0`` for none.
            Default: ``0``.
        eval_owns_env (bool): close each evaluation env after use (``False`` when it is the training env).
        videos_dir (str | Path, optional): where the GIFs go. Default: ``None`` (logger only).
        num_envs (int): parallel envs in a collected batch. Default: ``1``.
        device: where the policy runs for evaluation. Default: ``"cpu"``.
        progress_bar (bool): a tqdm bar. Default: ``True``.
        seed (int, optional): the evaluation envs' base seed offset. Default: ``0``.
        replay_hook (TrainerHookBase, optional): the hook that writes each collected batch into the replay and
            samples it for each update (:attr:`replay_hook`, registered at ``batch_process`` and
            ``process_optim_batch`` and checkpointed as ``"replay_buffer"``). Default: TorchRL's
            :class:`~torchrl.trainers.ReplayBufferTrainer` over ``replay_buffer`` (flattening the collected
            ``[envs, steps]`` batches for a stock buffer). Pass your own to replace it; a second hook that writes
            into a buffer the trainer already writes is refused (every batch would be stored twice).
    """

    def __init__(
        self,
        *,
        collector: Any,
        loss_module: Any,
        optimization_stepper: Any,
        replay_buffer: Any,
        target_net_updater: TargetNetUpdater,
        total_steps: int,
        action_repeat: int = 1,
        prefill: int = 50_000,
        pretrain: int = 1,
        train_every: int = 16,
        logger: Any = None,
        checkpoint: Checkpoint | None = None,
        checkpoint_path: str | Path | None = None,
        checkpoint_every: int = 100_000,
        log_every: int = 10_000,
        eval_every: int = 250_000,
        video_every: int = 250_000,
        policy: Any = None,
        make_eval_env: Any = None,
        eval_episodes: int = 1,
        eval_envs: int = 1,
        final_eval_episodes: int = 0,
        eval_owns_env: bool = True,
        videos_dir: str | Path | None = None,
        num_envs: int = 1,
        device: torch.device | str = "cpu",
        progress_bar: bool = True,
        seed: int = 0,
        replay_hook: TrainerHookBase | None = None,
    ) -> None:
        self._written_buffers: list = []  # replay buffers a registered hook writes (no second writer)
        super().__init__(
            collector=collector,
            total_frames=total_steps * action_repeat,
            frame_skip=action_repeat,
            optim_steps_per_batch=None,  # the UpdateSchedule ends each optimisation loop
            loss_module=loss_module,
            optimization_stepper=optimization_stepper,
            replay_buffer=replay_buffer,
            logger=logger,
            progress_bar=progress_bar,
            log_interval=log_every * action_repeat,
            auto_log_optim_steps=False,  # TrainMetricsHook averages over the logging interval
        )
        self.total_steps = total_steps
        self.schedule = UpdateSchedule(replay_buffer, prefill=prefill, pretrain=pretrain, train_every=train_every)
        self.schedule.register(self)
        world_model = loss_module.model_loss.world_model
        NonFiniteInputHook(
            [*world_model.obs_keys, loss_module.model_loss.tensor_keys.reward], image_keys=world_model.cnn_keys
        ).register(self)
        # Stock TorchRL replay hook: extend with each collected batch, sample once per due update.
        if replay_hook is None:
            stock = not isinstance(replay_buffer, DreamerReplayBuffer)  # stock buffers take flat transitions
            replay_hook = ReplayBufferTrainer(replay_buffer, flatten_tensordicts=stock)
        self.replay_hook = replay_hook
        self.register_op("batch_process", replay_hook.extend)
        self.register_op("process_optim_batch", replay_hook.sample)
        self.register_module("replay_buffer", replay_hook)
        # TargetNetUpdaterHook.register would put it at post_steps (once per collected batch): the reference
        # counts updates, so it goes at post_optim; its counter is checkpointed
        self.target_net_updater = target_net_updater
        self.register_op("post_optim", TargetNetUpdaterHook(target_net_updater))
        self.register_module("target_net_updater", target_net_updater)
        self.speed_report = SpeedReportHook(self.schedule, total_steps, device=device)
        self.speed_report.register(self)
        # the learner reuses the memory each update frees instead of faulting it in again (allocator.py)
        keep_freed_memory()
        self.episode_returns = EpisodeReturnHook(num_envs)
        self.episode_returns.register(self)
        actor_loss = getattr(loss_module, "actor_loss", None)
        discrete = actor_loss is not None and is_discrete_action_spec(
            actor_loss.model_based_env.full_action_spec[actor_loss.action_key]
        )
        TrainMetricsHook(self.schedule, log_every=log_every, check_entropy=discrete).register(self)
        self.evaluation = None
        if make_eval_env is not None:
            if policy is None:
                raise ValueError("make_eval_env needs the acting policy: pass policy=.")
            self.evaluation = EvaluationHook(
                policy, make_eval_env, self.schedule,
                eval_every=eval_every, episodes=eval_episodes, seed=seed + 10_000, device=device,
                owns_env=eval_owns_env, num_envs=eval_envs, progress=progress_bar,
            )
            self.evaluation.register(self)
        self.video = OpenLoopVideoHook(
            loss_module.model_loss.world_model, replay_buffer, self.schedule, video_every=video_every,
            videos_dir=videos_dir,
        )
        self.video.register(self)
        self.final_eval_episodes = final_eval_episodes
        self.register_op("setup", self._progress_bar_setup)
        self.register_op("post_steps_log", lambda batch=None: self._progress_bar_phase(self.schedule.last_batch_steps))
        self.checkpointer = None
        self._resumed_from: Path | None = None
        if checkpoint_path is not None:
            checkpoint = Checkpoint() if checkpoint is None else checkpoint
            self.checkpointer = CheckpointHook(
                checkpoint, checkpoint_path, self.schedule, checkpoint_every=checkpoint_every,
                metadata=lambda: {
                    "steps": self.schedule.steps,
                    "updates": self.schedule.updates,
                    **({"config": self.config.to_dict()} if getattr(self, "config", None) is not None else {}),
                },
            )
            self.checkpointer.register(self)  # last at post_steps: saves after evaluation and video
            self._register_checkpoint_components(checkpoint)
        self.interrupted = False

    def register_op(self, dest: str, op: Any, **kwargs) -> None:
        """TorchRL's ``register_op``, refusing a second writer into a replay buffer that a registered hook already
        writes (as ``ReplayBufferTrainer.register`` would add: every collected batch would be stored twice), before
        anything is registered."""
        buffer = getattr(getattr(op, "__self__", None), "replay_buffer", None)
        if dest == "batch_process" and buffer is not None and getattr(op, "__name__", "") == "extend":
            if any(buffer is written for written in self._written_buffers):
                raise ValueError(
                    f"A second hook would write every collected batch into {type(buffer).__name__} again: the trainer's "
                    "own replay hook (trainer.replay_hook, a ReplayBufferTrainer) already writes it. Register a hook "
                    "that only samples, or build the trainer with your hook as replay_hook=."
                )
            self._written_buffers.append(buffer)
        super().register_op(dest, op, **kwargs)

    def register_module(self, module_name: str, module: Any) -> None:
        """Registers a stateful hook; with a checkpoint, its state is saved and, on a resumed run, restored now."""
        super().register_module(module_name, module)
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is None:
            return
        name = f"trainer_module.{module_name}"
        checkpointer.checkpoint.register(name, module)
        if self._resumed_from is not None and name in Checkpoint.manifest(self._resumed_from)["components"]:
            checkpointer.checkpoint.load(self._resumed_from, components=[name])

    def _register_checkpoint_components(self, checkpoint: Checkpoint) -> None:
        components = {"loss_module": self.loss_module, "rng": GlobalRNGState()}
        components.update({f"trainer_module.{name}": module for name, module in self._modules.items()})
        for name, component in components.items():
            if name not in checkpoint:
                checkpoint.register(name, component)

    def _progress_bar_setup(self) -> None:
        """The bar of this session: during the prefill it counts to the prefill's end ("prefill"), then to the run's
        end ("train"); a resumed run's steps are its starting point, so the rate and the time left count only the
        steps run since the resume."""
        if self.progress_bar:
            self._pbar.close()
            self._pbar = None
            self._progress_bar_phase()

    def _progress_bar_phase(self, pending_steps: int = 0) -> None:
        """Opens the bar of the current phase when it changes (``pending_steps``: steps of the batch being
        processed, which the trainer's loop adds to the bar after this hook)."""
        if not self.progress_bar:
            return
        phase = "prefill" if self.schedule.steps < self.schedule.prefill else "train"
        if self._pbar is not None and getattr(self._pbar, "phase", None) == phase:
            return
        if self._pbar is not None:
            self._pbar.close()
        from tqdm.auto import tqdm

        end = (min(self.schedule.prefill, self.total_steps) if phase == "prefill" else self.total_steps) * self.frame_skip
        done = self.collected_frames - pending_steps * self.frame_skip
        self._pbar = tqdm(total=end, initial=min(done, end), desc=phase, unit="frame")
        self._pbar.phase = phase

    def _pbar_description(self) -> None:
        """TorchRL's description of the bar (its metrics), after the phase: ``prefill`` or ``train``."""
        if self.progress_bar:
            metrics = ", ".join(f"{key}: {value}" for key, value in sorted(self._pbar_str.items()))
            self._pbar.set_description(getattr(self._pbar, "phase", "train") + (f", {metrics}" if metrics else ""))

    @property
    def steps(self) -> int:
        """Agent steps collected (summed over envs)."""
        return self.schedule.steps

    @property
    def _run_dir(self) -> Path | None:
        return self.checkpointer.path.parent if self.checkpointer is not None else None

    def _space_needed(self) -> int:
        """Bytes a checkpoint and some logging need: the last checkpoint's size (or the parameters and optimiser
        states it would hold), and 64 MiB for logs and videos."""
        path = self.checkpointer.path if self.checkpointer is not None else None
        if path is not None and path.exists():
            size = path.stat().st_size
        else:
            size = 4 * 4 * sum(p.numel() for p in self.loss_module.parameters())
        return size + 64 * 2**20

    @property
    def finished(self) -> bool:
        """Whether the run has nothing left to do: ``total_steps`` reached and the final evaluation made (when one
        is asked for). :meth:`train` then changes nothing, no file included."""
        final_pending = bool(self.final_eval_episodes) and self.evaluation is not None and \
            self.evaluation.final_result is None
        return self.schedule.steps >= self.total_steps and not final_pending

    @property
    def updates(self) -> int:
        """Updates done."""
        return self.schedule.updates

    def load_checkpoint(self, map_location: Any = "cpu") -> None:
        """Restores every registered component from the checkpoint archive (models, optimisers, replay, hooks)."""
        if self.checkpointer is None:
            raise CheckpointError("This trainer has no checkpoint_path.")
        try:
            self.checkpointer.load(map_location=map_location)
        except Exception as err:
            damaged = _cause(err, ReplayIntegrityError)
            if damaged is not None:  # the models are fine: say how to keep them
                raise CheckpointError(f"Cannot resume from {self.checkpointer.path}: {damaged}") from err
            raise CheckpointError(
                f"Cannot resume from {self.checkpointer.path}: {type(err).__name__}: {err}. The run directory is "
                "left as it is; use another --logdir to start a new run."
            ) from err
        self.collected_frames = self.schedule.steps * self.frame_skip
        self._resumed_from = self.checkpointer.path

    def save_checkpoint(self) -> Path | None:
        """Writes the checkpoint archive now (atomically); None without a checkpoint path."""
        return self.checkpointer.save() if self.checkpointer is not None else None

    def _final_evaluation(self) -> None:
        """``final_eval_episodes`` greedy episodes once the run has reached ``total_steps`` (once per run)."""
        if not self.final_eval_episodes or self.evaluation is None:
            return
        done = self.evaluation.final_result is not None
        try:
            result = self.evaluation.final(self.final_eval_episodes, stop=lambda: self.interrupted)
        except EvaluationStopped:
            return  # a resumed run does it again
        if not done and self.checkpointer is not None:
            path = self.checkpointer.path.parent / FINAL_EVAL_FILE
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(path)

    def train(self) -> dict[str, Any]:
        """Trains until ``total_steps``; checkpoints on the way and when stopped (Ctrl-C and SIGTERM included).

        Returns: the counters ``steps``, ``frames``, ``updates``, ``episodes``, ``interrupted`` and, after an
        evaluation, ``last_eval`` (and ``final_eval`` after the final evaluation).
        """
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def stop(signum, frame):
            if self.interrupted:  # a second signal: stop now
                raise KeyboardInterrupt
            self.interrupted = True
            self.request_stop("interrupted")

        self.interrupted, self._stop_training, self._stop_reason = False, False, None
        lock = getattr(self, "run_lock", None)
        if lock is not None and lock.released and self.checkpointer is not None:
            self.run_lock = RunLock(self.checkpointer.path.parent)
        torchrl_log = logging.getLogger("torchrl")
        log_level = torchrl_log.level
        if self.progress_bar:  # TorchRL's INFO lines would break the bar
            torchrl_log.setLevel(max(log_level, logging.WARNING))
        for sig in handlers:
            signal.signal(sig, stop)
        finished = self.finished
        if not finished and getattr(self, "run_lock", None) is not None:
            self.run_lock.mark()
        if finished:
            warnings.warn(
                f"Nothing to do: the run is at {self.schedule.steps} agent steps, total_steps is {self.total_steps}; "
                "raise --total-steps to train further.",
                stacklevel=2,
            )
        elif self.schedule.prefill >= self.total_steps and self.updates == 0:
            warnings.warn(
                f"prefill ({self.schedule.prefill} agent steps of random actions) >= total_steps ({self.total_steps}): "
                "no update will run; lower --prefill or raise --total-steps.",
                stacklevel=2,
            )
        disk_full = None
        try:
            if self.schedule.steps < self.total_steps:
                super().train()
            else:
                self.collector.shutdown()
            if not self.interrupted and self.schedule.steps >= self.total_steps:
                self._final_evaluation()
        except Exception as err:
            if _disk_full(err, self._run_dir):
                # a write found the disk full (a log, a video, the replay): stop with one line; the previous
                # checkpoint and the replay it describes are kept, and the same command resumes from them
                disk_full = err
                self.collector.shutdown()
            elif not self.interrupted:
                raise
            # A signal sent to the whole process group can take env workers down mid-collection: the state is
            # still consistent (steps and updates are counted per finished batch), so checkpoint it below.
            else:
                self.collector.shutdown()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            torchrl_log.setLevel(log_level)
            shards = getattr(self.optimization_stepper, "shard_pool", None)
            if shards is not None:  # the update's worker threads (a later train() starts them again)
                shards.close()
        try:
            if disk_full is not None:
                if isinstance(disk_full, DiskFullError):
                    raise disk_full
                raise DiskFullError(self._run_dir, self._space_needed(), "the next checkpoint with the logs") \
                    from disk_full
            if not finished:  # a run with nothing to do leaves every file as it is
                self.save_checkpoint()
        finally:
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release()
        if self.updates == 0 and self.steps >= self.total_steps and self.schedule.prefill < self.total_steps:
            warnings.warn(
                f"The run ended after {self.steps} agent steps without a single update: "
                + ("the prefill covered the whole run." if self.schedule.prefill >= self.total_steps else
                   f"the replay never held a sequence to sample ({self.replay_buffer!r}); with episodes shorter than "
                   "--batch-length use --strict-length false or a shorter --batch-length."),
                stacklevel=2,
            )
        result = {"steps": self.steps, "frames": self.steps * self.frame_skip, "updates": self.updates,
                  "episodes": self.episode_returns.episodes, "interrupted": self.interrupted}
        if self.evaluation is not None and self.evaluation.last is not None:
            result["last_eval"] = {k: v for k, v in self.evaluation.last.items() if k not in ("returns", "lengths")}
        if self.evaluation is not None and self.evaluation.final_result is not None:
            final = self.evaluation.final_result
            result["final_eval"] = {k: v for k, v in final.items() if k not in ("returns", "lengths")}
        return result


class _WorkerEnv:
    """Builds the env in a worker process that leaves Ctrl-C to the main process (which stops and checkpoints)."""

    def __init__(self, factory: EnvFactory) -> None:
        self.factory = factory

    def __call__(self) -> EnvBase:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self.factory()


def write_config(config: DreamerV2Config, logdir: Path) -> None:
    """Writes the run's ``config.json`` atomically (a kill never leaves half a file)."""
    tmp = logdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2))
    tmp.replace(logdir / CONFIG_FILE)


def _reconcile_config(config: DreamerV2Config, logdir: Path, resuming: bool, keep_saved: bool) -> DreamerV2Config:
    """A resumed run keeps its saved config: only the schedules (``_RESUMABLE_CHANGES``) may change, and a setting
    given as ``"auto"`` takes the saved value.

    Other differences (another env, another preset, another network size...) are refused unless ``keep_saved``,
    which resumes with the saved values; the env never changes.
    """
    if not resuming:
        return config
    path = logdir / CONFIG_FILE
    saved = None
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            kept = Checkpoint.manifest(logdir / CHECKPOINT_FILE)["metadata"].get("config") is not None
            raise ValueError(
                f"{path} is not a valid config ({type(err).__name__}: {err}): "
                + ("the checkpoint carries its own copy of the config; delete config.json to resume with it."
                   if kept else "the checkpoint has no copy of the config; restore config.json or use another "
                   "--logdir.")
            ) from None
    if saved is None:  # the checkpoint carries its config too
        saved = Checkpoint.manifest(logdir / CHECKPOINT_FILE)["metadata"].get("config")
        if saved is None:
            raise ValueError(
                f"{path} is missing and the checkpoint predates the config it now carries: the settings of this run "
                "cannot be checked; restore config.json or use another --logdir."
            )
    given = config.to_dict()
    # "auto" leaves the choice to the run: a run saved with a value resumes with it (runs saved before a setting
    # had "auto" resume as they were trained)
    changed = sorted(k for k in given if k in saved and given[k] != saved[k] and k not in _RESUMABLE_CHANGES
                     and given[k] != "auto")
    if "env" in changed:
        raise ValueError(
            f"{logdir} holds a run on {saved['env']!r}, not {given['env']!r}: a run's env cannot change; "
            "use another --logdir."
        )
    if changed and not keep_saved:
        diff = ", ".join(f"{k}: {saved[k]!r} (saved) vs {given[k]!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ValueError(
            f"{logdir} was trained with other settings ({diff}{more}): resume with the same preset and flags, pass "
            "--keep-saved-config to resume with the saved values, or use another --logdir."
        )
    if changed:
        schedules = sorted(k for k in _RESUMABLE_CHANGES if k in saved and saved[k] != given.get(k))
        print(f"Resuming {logdir} with its saved values of {changed} (not this command's)"
              + (f"; the schedules {schedules} are this command's." if schedules else "."))
    keep = {k: v for k, v in saved.items() if k not in _RESUMABLE_CHANGES and k in given}
    return config.replace(**keep)


def _disk_full(err: BaseException, run_dir: Path | None) -> bool:
    """Whether ``err`` comes of a full disk: ENOSPC or EDQUOT in its chain, or another write error (torch's archive
    writer reports a short write as a bare RuntimeError) while the run's disk has less than 1 MiB free."""
    seen, chained = set(), err
    while chained is not None and id(chained) not in seen:
        if isinstance(chained, OSError) and chained.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(chained))
        chained = chained.__cause__ or chained.__context__
    if run_dir is None or not isinstance(err, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(run_dir).free < 2**20
    except OSError:
        return False


def _cause(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``err``'s cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class RunLock:
    """One run per log directory: an exclusive ``flock`` on ``<logdir>/.lock``, held while the trainer lives.

    The kernel drops the lock when the process dies, so the lock of a killed run never blocks its resume.

    Raises:
        RunLockedError: another live process holds the directory.
    """

    def __init__(self, logdir: Path) -> None:
        import fcntl

        self.path = logdir / LOCK_FILE
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunLockedError(
                f"{logdir} is in use by a running training ({holder}); wait for it to end or use another --logdir."
            ) from None

    def mark(self) -> None:
        """Writes this process's id in the lock file (read by a second process that finds the directory in use).
        Called when training starts: a run with nothing to do changes no file."""
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()

    @property
    def released(self) -> bool:
        return self._file.closed

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()


class RunLockedError(RuntimeError):
    """Another process is training in the same log directory."""


def _saved_counters(path: Path) -> dict[str, Any]:
    try:
        manifest = Checkpoint.manifest(path)
        return {"steps": int(manifest["metadata"]["steps"]), "updates": int(manifest["metadata"]["updates"])}
    except Exception as err:  # truncated or foreign files surface as many error types
        raise CheckpointError(
            f"Cannot resume from {path}: the checkpoint is corrupt or not a DreamerV2 checkpoint "
            f"({type(err).__name__}: {err}). Use another --logdir to start a new run."
        ) from err


def make_dreamerv2_trainer(
    config: DreamerV2Config,
    logdir: str | Path,
    *,
    env: EnvLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    parallel_envs: bool = True,
    keep_saved_config: bool = False,
    fresh_replay: bool = False,
    threads: int | None = None,
    replay_buffer: Any = None,
) -> DreamerV2Trainer:
    """Builds a :class:`DreamerV2Trainer` and all its components from a config, in a run directory.

    A directory holding a checkpoint is resumed: models, optimisers, target critic, replay, counters, hooks and
    RNG states are restored. The config must be the saved one, schedules excepted (``total_steps``, ``*_every``):
    other changes are refused unless ``keep_saved_config``. The rows logged after the checkpoint are dropped from
    the logs. Nothing in the directory is written before the checkpoint has been read, and one process at a time
    trains in a directory (:class:`RunLock`).

    Args:
        config (DreamerV2Config): hyperparameters.
        logdir (str | Path): the run directory (created with its parents).

    Keyword Args:
        env: the environment: a TorchRL :class:`~torchrl.envs.EnvBase` (one env), a callable returning one (any
            number of envs, in worker processes with ``parallel_envs``), a :func:`~torchrl_dreamer.envs.make_env`
            name or ``"package.module:function"``. Default: ``config.env``. ``InitTracker`` and the policy's
            primer are added when missing.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``. Default: ``"auto"``.
        progress (bool): a progress bar. Default: ``True``.
        parallel_envs (bool): several envs in worker processes (``ParallelEnv``) rather than in this process
            (``SerialEnv``). Default: ``True``.
        keep_saved_config (bool): resume with the saved config where this one differs. Default: ``False``.
        fresh_replay (bool): resume the models, optimisers and counters but discard the saved replay's rows and
            refill it (when its files are damaged: the resume then says so). Default: ``False``.
        threads (int or None): the learner's CPU threads. On the CPU an eager update runs as that many
            data-parallel shards of the batch, one worker thread each with one torch thread
            (:class:`~torchrl_dreamer.modules.ShardPool`: the same losses and gradients; it holds its speed when the
            env workers or other processes take cores; the world model's pass has at most one shard per sequence
            of the batch); the rest of the update, a compiled update and the CUDA side use torch's count, which
            this sets (for the process; put back if the build fails). A seeded run repeats bit for bit for a
            given count. Default: ``None`` (torch's count as it is, one per core).
        replay_buffer (optional): a replay buffer of your own instead of the run's
            :class:`~torchrl_dreamer.data.DreamerReplayBuffer` under ``<logdir>/replay``: e.g. a stock TorchRL
            ``TensorDictReplayBuffer`` with a ``SliceSampler(slice_len=..., traj_key=("collector", "traj_ids"))``
            returning ``batch_size`` slices (the losses read its transitions as sequences). It is checkpointed
            with the run through its ``state_dict``. Default: ``None``.

    Returns: a :class:`DreamerV2Trainer`; call ``trainer.train()``.

    Examples:
        >>> import tempfile
        >>> cfg = DreamerV2Config.preset("debug", total_steps=200, eval_every=10**9, video_every=10**9)
        >>> trainer = make_dreamerv2_trainer(cfg, tempfile.mkdtemp() + "/run", device="cpu", progress=False)
        >>> trainer.train()["steps"]
        200
    """
    if not (threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1)):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}.")
    logdir = Path(logdir).expanduser().absolute()
    if logdir.exists() and not logdir.is_dir():
        raise FileExistsError(f"The log directory {logdir} is an existing file; choose another --logdir.")
    if env is not None:
        config = config.replace(env=EnvFactory(env).description if not isinstance(env, str) else env, env_kwargs={})
    checkpoint_path = logdir / CHECKPOINT_FILE
    resuming = checkpoint_path.exists()
    saved = _saved_counters(checkpoint_path) if resuming else {"steps": 0, "updates": 0}
    config = _reconcile_config(config, logdir, resuming, keep_saved_config)
    factory = EnvFactory(env if env is not None else config.env, **config.make_env_kwargs)
    if factory.is_instance and config.num_envs > 1:
        raise ValueError("An env instance runs one env: pass a factory (a function returning the env) for num_envs > 1.")
    device = resolve_device(device)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
        if threads > available_cores():
            warnings.warn(
                f"threads={threads} is more than the {available_cores()} cores this process may use: the parts of the "
                "update that run on torch's threads wait at every parallel region for a descheduled thread (an Atari "
                "update on 2 cores with one busy took 64-159 s with 4 torch threads, 6.7 s with 2).",
                stacklevel=2,
            )
    if device.type == "cpu" and torch.get_num_threads() > 1 and "OMP_WAIT_POLICY" not in os.environ:
        warnings.warn(
            f"The learner's {torch.get_num_threads()} OpenMP threads spin while they wait (OMP_WAIT_POLICY is not "
            "set): beside the env workers an update can take 2-3x longer; set OMP_WAIT_POLICY=PASSIVE before starting "
            "Python, call torchrl_dreamer.process.configure_process() before importing torch, or call "
            "torch.set_num_threads(1).",
            stacklevel=2,
        )
    if config.cudagraph and device.type != "cuda":
        raise ValueError(f"cudagraph needs a CUDA device, the updates run on {device}: drop --cudagraph or use --device cuda.")
    created = not logdir.exists()
    lock = None
    try:
        try:
            logdir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(logdir)
        except RunLockedError:
            raise
        except OSError as err:
            raise OSError(
                f"Cannot write in the log directory {logdir}: {err.strerror or err}; choose another --logdir."
            ) from None
        trainer = _build_trainer(
            config, logdir, factory, device, saved, resuming, progress, parallel_envs, fresh_replay and resuming,
            default_shards(device, config.compile), replay_buffer,
        )
    except BaseException:
        torch.set_num_threads(threads_before)
        if lock is not None:
            lock.release()
        if created and logdir.is_dir():  # leave no trace of a run that never started
            (logdir / LOCK_FILE).unlink(missing_ok=True)
            for leftover in sorted(logdir.rglob("*"), reverse=True):
                if leftover.is_dir() and not any(leftover.iterdir()):
                    leftover.rmdir()
            if not any(logdir.iterdir()):
                logdir.rmdir()
        raise
    trainer.run_lock = lock
    return trainer


def _check_update_memory(config: DreamerV2Config, models: Any, loss: Any, device: torch.device) -> None:
    """Refuses, before any work, a batch whose update needs more memory than the system has free (CPU updates)."""
    if device.type != "cpu":
        return
    need = estimate_update_memory(
        models.world_model, models.actor, models.critic, batch_size=config.batch_size,
        batch_length=config.batch_length, imagination_horizon=config.imagination_horizon,
        dynamics_gradients=loss.actor_loss.actor_grad != "reinforce",
    )
    free = available_memory()
    if free is not None and need > free:
        raise ValueError(
            f"An update on batches of {config.batch_size} x {config.batch_length} needs about {gib(need)} of memory "
            f"(estimated from the config) and {gib(free)} are free: lower --batch-size or --batch-length, or free "
            "memory."
        )


def _build_trainer(
    config, logdir, factory, device, saved, resuming, progress, parallel_envs, fresh_replay, shards, replay=None
) -> DreamerV2Trainer:
    torch.manual_seed(config.seed)
    checkpoint_path = logdir / CHECKPOINT_FILE
    probe = factory(config.seed)
    if probe.batch_size != torch.Size([]):
        raise ValueError(
            f"The env {factory.description} has batch size {tuple(probe.batch_size)}: pass a single env (batch size ()) "
            "and set --num-envs for several."
        )
    models = config.make_models(probe.observation_spec, probe.action_spec, device=device)
    if not factory.is_instance:
        probe.close()
    loss = config.make_loss(models)
    _check_update_memory(config, models, loss, device)
    stepper = config.make_stepper(loss, shards=shards)
    if replay is None and config.replay == "stock":
        # TorchRL's own: transitions in memory, slices inside one trajectory (the losses read them as sequences)
        replay = TensorDictReplayBuffer(
            storage=LazyTensorStorage(config.replay_capacity),
            sampler=SliceSampler(slice_len=config.batch_length, traj_key=("collector", "traj_ids")),
            batch_size=config.batch_size * config.batch_length,
        )
    elif replay is None:
        replay = make_replay_buffer(
            capacity=config.replay_capacity, seq_len=config.batch_length, batch_size=config.batch_size,
            obs_keys=models.world_model.obs_keys, scratch_dir=logdir / "replay", prioritize_ends=config.prioritize_ends,
            strict_length=config.strict_length, episodes_by_length=config.episodes_by_length, device=device,
            seed=config.seed, fresh=fresh_replay,
        )
    primer = models.policy.make_tensordict_primer

    def make_train_env(seed: int) -> EnvBase:
        if config.num_envs == 1:
            base = factory(seed)
        else:
            if parallel_envs:
                # the collector is synchronous: the workers wait while the learner updates, so the learner keeps
                # its threads (ParallelEnv's default leaves it cores - workers: on 2 cores with 2 envs, 1 thread and
                # an update twice as long)
                base = ParallelEnv(config.num_envs, _WorkerEnv(factory), num_threads=torch.get_num_threads())
            else:
                base = SerialEnv(config.num_envs, factory)
            base.set_seed(seed)
        return prepare_env(base, primer())

    def make_eval_env(seed: int, num_envs: int = 1) -> EnvBase:
        if num_envs == 1 or factory.is_instance:
            return prepare_env(factory(seed), primer())
        base = SerialEnv(num_envs, factory)  # in this process: the policy acts for all of them at once
        base.set_seed(seed)
        return prepare_env(base, primer())

    # new seeds after a resume, so that the environments do not replay the same episodes
    collector = Collector(
        make_train_env(config.seed + 1 + saved["steps"]),
        models.policy,
        frames_per_batch=config.train_every,
        total_frames=-1,
        init_random_frames=max(0, config.prefill - saved["steps"]),
        compile_policy=config.compile_policy or None,
        policy_device=device,
        env_device="cpu",
        storing_device="cpu",
    )
    trainer = DreamerV2Trainer(
        collector=collector, loss_module=loss, optimization_stepper=stepper, replay_buffer=replay,
        target_net_updater=config.make_target_updater(loss),
        total_steps=config.total_steps, action_repeat=config.action_repeat, prefill=config.prefill,
        pretrain=config.pretrain, train_every=config.train_every, logger=None,
        checkpoint_path=checkpoint_path, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
        eval_every=config.eval_every, video_every=config.video_every,
        policy=torch.compile(models.policy) if config.compile_policy else models.policy,
        make_eval_env=make_eval_env,
        eval_episodes=config.eval_episodes, eval_envs=config.eval_envs,
        final_eval_episodes=config.final_eval_episodes, eval_owns_env=not factory.is_instance,
        videos_dir=logdir / "videos", num_envs=config.num_envs, device=device, progress_bar=progress,
        seed=config.seed,
    )
    if factory.is_instance:  # evaluation ran on the training env: restart its episode
        trainer.evaluation.after = lambda: (collector.reset(), trainer.episode_returns.restart())
    trainer.config, trainer.logdir, trainer.models, trainer.resumed = config, logdir, models, resuming
    trainer.device = device
    if resuming:
        trainer.load_checkpoint(map_location=device)
    if trainer.finished:  # nothing to do: every file stays as it is (no config, logger or checkpoint written)
        trainer.logger = None
        return trainer
    # only now, with the checkpoint read, is anything written in the run directory. The logs keep the rows up to the
    # checkpoint's step; without a checkpoint (a run killed before its first one) none: it starts again from 0
    trainer.logger = make_logger(logdir, resume_step=saved["steps"] * config.action_repeat if resuming else 0)
    write_config(config, logdir)
    return trainer
