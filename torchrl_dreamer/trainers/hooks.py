"""DreamerV2's behaviour as TorchRL :class:`~torchrl.trainers.Trainer` hooks.

Every hook is a :class:`~torchrl.trainers.TrainerHookBase`: ``register(trainer)`` puts it at its default stage and
registers its state for checkpoints. Schedules count agent steps summed over all envs (the paper's units); the
logged x-axis is frames (``frame_skip`` x agent steps), as the Trainer's ``collected_frames``.

============================  ======================  ==========================================================
hook                          stages                  what it does
============================  ======================  ==========================================================
:class:`UpdateSchedule`       batch_process,          counts agent steps; during the random prefill and between
                              process_optim_batch,    updates it stops the optimisation loop; after the prefill
                              post_optim              it lets through ``pretrain`` updates, then one update per
                                                      ``train_every`` agent steps
``TargetNetUpdaterHook``      post_optim              TorchRL's: slow critic ``HardUpdate`` after update 0, N...
:class:`NonFiniteInputHook`   batch_process           warns (naming the key) and counts NaN/inf from the env
:class:`SpeedReportHook`      post_optim              once: measured pace and time left (advice on a CPU)
:class:`EpisodeReturnHook`    pre_steps_log           ``train_return`` / ``train_length`` of finished episodes
:class:`TrainMetricsHook`     post_optim_complete_    the updates' metrics averaged over ``log_every`` steps,
                              log, post_steps         and ``fps``
:class:`EvaluationHook`       post_steps              greedy (actor mode) episodes every ``eval_every`` steps
:class:`OpenLoopVideoHook`    post_steps              the "openl" video through ``logger.log_video`` and a GIF
:class:`CheckpointHook`       post_steps              an atomic :class:`~torchrl.checkpoint.Checkpoint` archive
============================  ======================  ==========================================================
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.checkpoint import Checkpoint
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp
from torchrl.trainers import Trainer, TrainerHookBase

from torchrl_dreamer.data.rows import is_transition_batch, transitions_as_sequences
from torchrl_dreamer.record import EpisodeTracker, open_loop_video, write_gif

__all__ = [
    "UpdateSchedule",
    "NonFiniteInputHook",
    "SpeedReportHook",
    "CheckpointWriteError",
    "EpisodeReturnHook",
    "TrainMetricsHook",
    "health_warnings",
    "EvaluationHook",
    "EvaluationStopped",
    "OpenLoopVideoHook",
    "CheckpointHook",
    "Every",
]


class Every:
    """Fires once each time a counter passes a multiple of ``every`` (state: the next threshold).

    Examples:
        >>> every = Every(100)
        >>> [every.due(s) for s in (50, 100, 150, 320, 330)]
        [False, True, False, True, False]
    """

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self.next = self.every

    def due(self, count: int) -> bool:
        if count < self.next:
            return False
        self.next = (count // self.every + 1) * self.every
        return True

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.next = int(state_dict["next"])


def _num_steps(batch: TensorDictBase) -> int:
    mask = batch.get(("collector", "mask"), None)
    return int(mask.sum()) if mask is not None else batch.numel()


class UpdateSchedule(TrainerHookBase):
    """Random prefill, ``pretrain`` updates, then one update per ``train_every`` agent steps.

    The number of updates due after ``steps`` agent steps is ``0`` during the prefill and
    ``pretrain + (steps - prefill) // train_every`` after it (reference: ``train_every`` counts agent steps over all
    envs; the prefill's random actions come from the collector's ``init_random_frames``). Registered first at
    ``process_optim_batch``, it raises ``StopIteration`` (the Trainer's signal to end its optimisation loop) when
    no update is due or when the replay cannot sample yet; the sampling itself is a stock
    :class:`~torchrl.trainers.ReplayBufferTrainer` registered after it.

    Args:
        replay_buffer: the replay (``can_sample()``).

    Keyword Args:
        prefill (int): agent steps of random actions before the first update.
        pretrain (int): updates right after the prefill.
        train_every (int): agent steps per update after that.

    Examples:
        >>> class Replay:
        ...     def can_sample(self): return True
        >>> schedule = UpdateSchedule(Replay(), prefill=100, pretrain=5, train_every=10)
        >>> schedule.steps = 150
        >>> schedule.updates_due()
        10
    """

    def __init__(self, replay_buffer: Any, *, prefill: int, pretrain: int, train_every: int) -> None:
        self.replay_buffer = replay_buffer
        self.prefill, self.pretrain, self.train_every = int(prefill), int(pretrain), int(train_every)
        self.steps = 0
        self.updates = 0
        self.updates_in_batch = 0
        self.last_batch_steps = 0
        self._starved_warned = False

    def updates_due(self) -> int:
        if self.steps < self.prefill:
            return 0
        return self.pretrain + (self.steps - self.prefill) // self.train_every - self.updates

    def count(self, batch: TensorDictBase) -> None:
        self.last_batch_steps = _num_steps(batch)
        self.steps += self.last_batch_steps
        self.updates_in_batch = 0

    def gate(self, batch: TensorDictBase) -> None:
        if self.updates_due() <= 0:
            raise StopIteration
        if not self.replay_buffer.can_sample():
            if not self._starved_warned:
                warnings.warn(
                    f"{self.steps} agent steps collected and updates are due, but the replay cannot sample a "
                    f"training sequence yet ({self.replay_buffer!r}); no update runs until it can. With episodes "
                    "shorter than the sequence length, set strict_length=False (--strict-length false).",
                    stacklevel=2,
                )
                self._starved_warned = True
            raise StopIteration

    def done_update(self) -> None:
        self.updates += 1
        self.updates_in_batch += 1

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.steps, self.updates = int(state_dict["steps"]), int(state_dict["updates"])

    def register(self, trainer: Trainer, name: str = "update_schedule") -> None:
        trainer.register_op("batch_process", self.count)
        trainer.register_op("process_optim_batch", self.gate)
        trainer.register_op("post_optim", self.done_update)
        trainer.register_module(name, self)


class _LoggingHook(TrainerHookBase):
    """A hook that writes to the trainer's logger at the trainer's frame count."""

    trainer: Trainer | None = None

    def _log(self, values: dict[str, float]) -> None:
        """Logs each finite value (a NaN or an infinity never reaches a log row)."""
        logger = getattr(self.trainer, "logger", None)
        if logger is None:
            return
        for name, value in values.items():
            if math.isfinite(float(value)):
                logger.log_scalar(name, float(value), step=int(self.trainer.collected_frames))


class _PeriodicHook(_LoggingHook):
    """Runs :meth:`run` at ``post_steps`` each time the agent-step counter passes a multiple of ``every``.

    Its state (the next threshold) is checkpointed with the run.
    """

    default_name = "periodic"

    def __init__(self, schedule: UpdateSchedule, every: int) -> None:
        self.schedule = schedule
        self.every = Every(every)

    def run(self) -> None:
        raise NotImplementedError

    def __call__(self) -> None:
        if self.every.due(self.schedule.steps):
            self.run()

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.every.load_state_dict(state_dict["every"])

    def register(self, trainer: Trainer, name: str | None = None) -> None:
        self.trainer = trainer
        trainer.register_op("post_steps", self)
        trainer.register_module(name or self.default_name, self)


class NonFiniteInputHook(_LoggingHook):
    """Reports NaN or infinite observations and rewards as the env produces them, naming the key.

    Registered at ``batch_process`` before the replay stores the batch. The first time a key carries non-finite
    values it warns with the key and the count; every batch with some logs ``nonfinite_env_steps`` (the running
    total). Updates that then meet them are skipped by the stepper (see ``nonfinite_updates``). Floating images
    (``image_keys``) are encoded as values in ``[0, 1]``: the first batch outside it warns, naming the key.

    Args:
        keys (sequence of NestedKey): the keys to watch (observations and ``("next", "reward")``).

    Keyword Args:
        image_keys (sequence of NestedKey): the image entries among them. Default: none.
    """

    def __init__(self, keys, *, image_keys=()) -> None:
        self.keys = list(keys)
        self.image_keys = list(image_keys)
        self.total = 0
        self.warned: set = set()

    def __call__(self, batch: TensorDictBase) -> TensorDictBase:
        bad_steps = None
        for key in self.keys:
            value = batch.get(key, None)
            if value is None or not value.dtype.is_floating_point:
                continue
            bad = ~torch.isfinite(value).reshape(*batch.batch_size, -1).all(-1)
            if not bool(bad.any()):
                continue
            bad_steps = bad if bad_steps is None else bad_steps | bad
            if key not in self.warned:
                self.warned.add(key)
                warnings.warn(
                    f"The env returned NaN or inf in {key!r} at {int(bad.sum())} of {batch.numel()} steps of this "
                    "batch; updates that sample them are skipped (see the nonfinite_updates metric). Fix the env "
                    "or clean it with a transform.",
                    stacklevel=2,
                )
        if bad_steps is not None:
            self.total += int(bad_steps.sum())
            self._log({"nonfinite_env_steps": self.total})
        for key in self.image_keys:
            value = batch.get(key, None)
            if value is None or not value.dtype.is_floating_point or ("range", key) in self.warned:
                continue
            finite = value[torch.isfinite(value)]
            if finite.numel() and (float(finite.min()) < 0.0 or float(finite.max()) > 1.0):
                self.warned.add(("range", key))
                warnings.warn(
                    f"The floating image {key!r} has values in [{float(finite.min()):g}, {float(finite.max()):g}], "
                    "outside [0, 1]: it is encoded as an image in [0, 1] (as ToTensorImage gives); rescale it with a "
                    "transform or pass its uint8 frames.",
                    stacklevel=2,
                )
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict["total"])

    def register(self, trainer: Trainer, name: str = "nonfinite_inputs") -> None:
        self.trainer = trainer
        trainer.register_op("batch_process", self)
        trainer.register_module(name, self)


class SpeedReportHook(_LoggingHook):
    """Once, after the first ``updates`` updates of a session, prints the measured pace and an honest estimate of
    the time left (when more than 10 minutes are left).

    Updates and collection are timed apart: an update from the sample of its batch to the end of its optimiser
    steps, collection from the end of one iteration's hooks to the next batch (env steps and the acting policy);
    evaluations, videos and checkpoints, which run between the two, are left out, and so are the prefill and the
    first update and batch after it or after a resume (they compile, a compiled preset's minutes). The time
    left is the remaining updates at the first pace plus the remaining agent steps at the second. On a CPU with a
    long run it adds what to do about it (the GPU build of torch, the CPU-sized presets).

    Args:
        schedule (UpdateSchedule): the counters.
        total_steps (int): the run's agent steps.

    Keyword Args:
        updates (int): updates measured. Default: ``5``.
        device: where the models train.
    """

    def __init__(self, schedule: UpdateSchedule, total_steps: int, *, updates: int = 5, device: Any = "cpu") -> None:
        self.schedule, self.total_steps, self.updates, self.device = schedule, total_steps, updates, torch.device(device)
        self.report: str | None = None
        self.update_seconds, self.collect_seconds = 0.0, 0.0
        self.timed_updates, self.timed_steps = 0, 0
        self._update_start: float | None = None
        self._collect_start: float | None = None
        self._warm_update = self._warm_collect = False

    def collected(self, batch: TensorDictBase) -> TensorDictBase:
        """``batch_process``: a batch arrived; its collection is timed once the prefill is over."""
        now = time.perf_counter()
        if self._collect_start is not None and self.schedule.steps >= self.schedule.prefill:
            if self._warm_collect:
                self.collect_seconds += now - self._collect_start
                self.timed_steps += _num_steps(batch)
            self._warm_collect = True  # the first batch after the prefill, or after a resume, compiles the policy
        self._collect_start = None
        return batch

    def update_started(self, batch: TensorDictBase) -> TensorDictBase:
        """``process_optim_batch`` (after the schedule's gate): an update starts."""
        self._update_start = time.perf_counter()
        return batch

    def update_done(self) -> None:
        """``post_optim``: an update ended (the pretraining updates at the prefill's end are not timed)."""
        if self._update_start is not None and self.schedule.updates > self.schedule.pretrain:
            if self._warm_update:
                self.update_seconds += time.perf_counter() - self._update_start
                self.timed_updates += 1
            self._warm_update = True  # the first update timed, or the first after a resume, compiles
        self._update_start = None

    def iteration_done(self, batch: TensorDictBase | None = None) -> None:
        """``post_steps_log``: the iteration's hooks (evaluations included) are over; collection starts."""
        self._collect_start = time.perf_counter()
        if self.report is None and self.timed_updates >= self.updates and self.timed_steps:
            self._report()

    def _report(self) -> None:
        per_update = self.update_seconds / self.timed_updates
        per_step = self.collect_seconds / self.timed_steps
        steps_left = max(0, self.total_steps - self.schedule.steps)
        updates_left = steps_left // self.schedule.train_every
        left = updates_left * per_update + steps_left * per_step
        message = (
            f"Measured on {self.device.type}: {per_update:.2f} s per update, {per_step * 1e3:.1f} ms per agent step "
            f"collected (evaluations excluded); the remaining {steps_left:,} agent steps and {updates_left:,} updates "
            f"take about {_duration(left)}, plus evaluations."
        )
        if self.device.type == "cpu" and left > 12 * 3600:
            message += (
                " The paper's settings need a GPU: install the CUDA build of torch (see the README), or on a CPU "
                "use --preset small or atari100k (CPU-sized networks) or fewer --total-steps."
            )
            stepper = getattr(self.trainer, "optimization_stepper", None)
            amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
            if amx and getattr(stepper, "precision", None) == "fp32":
                message += " This CPU has AMX: --precision bf16 (the paper's mixed precision) about halves the update."
        self.report = message
        if left > 600:  # worth saying only for a run that is not about to end
            _print(self.trainer, message)

    def register(self, trainer: Trainer, name: str = "speed_report") -> None:
        self.trainer = trainer
        trainer.register_op("batch_process", self.collected)
        trainer.register_op("process_optim_batch", self.update_started)
        trainer.register_op("post_optim", self.update_done)
        trainer.register_op("post_steps_log", self.iteration_done)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _print(trainer: Any, message: str) -> None:
    """Prints above the trainer's progress bar when there is one."""
    pbar = getattr(trainer, "_pbar", None) if trainer is not None and trainer.progress_bar else None
    if pbar is not None:
        pbar.write(message)
    else:
        print(message, flush=True)


class EpisodeReturnHook(_LoggingHook):
    """Logs ``train_return`` and ``train_length``: the mean over the episodes finished in each collected batch (one
    row per batch, so no step repeats), and ``train_episodes``, the running count.

    Args:
        num_envs (int): parallel envs (the leading dim of collected batches).
    """

    def __init__(self, num_envs: int = 1) -> None:
        self.tracker = EpisodeTracker(num_envs)
        self.episodes = 0
        self.last_return = float("nan")

    def __call__(self, batch: TensorDictBase) -> None:
        self.log_finished(self.tracker.update(batch))

    def log_finished(self, finished: list[tuple[float, int]]) -> None:
        """Logs the ``(return, length)`` of the episodes that ended in one collected batch."""
        if finished:  # one row per collected batch: the mean of the episodes that ended in it
            self.episodes += len(finished)
            self.last_return = finished[-1][0]
            self._log({
                "train_return": sum(r for r, _ in finished) / len(finished),
                "train_length": sum(n for _, n in finished) / len(finished),
                "train_episodes": self.episodes,
            })
        if self.trainer is not None and self.trainer.progress_bar:
            self.trainer._pbar_str["last_return"] = round(self.last_return, 2)

    def state_dict(self) -> dict[str, Any]:
        return {**self.tracker.state_dict(), "episodes": self.episodes, "last_return": self.last_return}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the episodes in progress at the checkpoint do not continue: a resumed collector starts new ones
        self.episodes, self.last_return = int(state_dict["episodes"]), float(state_dict["last_return"])
        self.restart()

    def restart(self) -> None:
        """Forgets the partial returns of the episodes in progress (after a collector reset or a resume)."""
        self.tracker.returns[:] = 0.0
        self.tracker.lengths[:] = 0

    def register(self, trainer: Trainer, name: str = "episode_returns") -> None:
        self.trainer = trainer
        trainer.register_op("pre_steps_log", self)
        trainer.register_module(name, self)


#: metrics that are running totals, not per-update values
COUNTERS = ("nonfinite_updates",)
# learning-health limits, checked on the averaged training metrics at each log
CRITIC_BOUND_LIMIT = 1.0  # the critic's largest value over the largest discounted return the rewards allow
ENTROPY_FRACTION_LIMIT = 0.05  # the actor's entropy over its maximum


def health_warnings(metrics: dict[str, float], *, entropy: bool = True) -> list[str]:
    """One line per learning-health limit the averaged metrics cross (see ``DreamerV2ActorLoss``'s metrics).

    ``entropy=False`` skips the entropy check (continuous actors: their entropy has no floor to compare with, a
    narrow Gaussian's is negative).
    """
    lines = []
    bound = metrics.get("critic_bound")
    if bound is not None and not bound <= CRITIC_BOUND_LIMIT:  # also NaN
        lines.append(
            f"the critic is diverging: its values reach {bound:.2f}x the largest discounted return the rewards allow "
            f"(critic_bound > {CRITIC_BOUND_LIMIT:g}; mean slow value {metrics.get('critic_slow', float('nan')):.4g}); "
            "lower critic_lr, raise target_update_interval or lower gamma"
        )
    fraction = metrics.get("actor_ent_fraction")
    if entropy and fraction is not None and not fraction >= ENTROPY_FRACTION_LIMIT:
        lines.append(
            f"the actor's entropy has collapsed to {fraction:.3f} of its maximum (actor_ent_fraction < "
            f"{ENTROPY_FRACTION_LIMIT:g}): it barely explores; check critic_bound and advantage_scale, or raise "
            "entropy_scale"
        )
    return lines


class TrainMetricsHook(_PeriodicHook):
    """Averages the updates' metrics over ``log_every`` agent steps, then logs them with ``fps`` (frames / s).

    Updates whose metrics are not finite (skipped by the optimisers, see ``nonfinite_updates``) are left out of the
    averages, so that neither a NaN row nor a false health warning comes of them; running counters
    (:data:`COUNTERS`) are logged as their last value, an integer.

    Learning health is checked at each log: a critic whose values exceed the largest discounted return the rewards
    allow (``critic_bound > 1``) or a discrete actor whose entropy has collapsed (``actor_ent_fraction < 0.05``)
    is reported in one line while the run goes on (:func:`health_warnings`).

    Args:
        schedule (UpdateSchedule): the step and update counters.

    Keyword Args:
        log_every (int): agent steps between two logs.
        check_entropy (bool): warn about a collapsed entropy (for discrete actors). Default: ``True``.
    """

    default_name = "train_metrics"

    def __init__(self, schedule: UpdateSchedule, *, log_every: int, check_entropy: bool = True) -> None:
        super().__init__(schedule, log_every)
        self.check_entropy = check_entropy
        self._sums: dict[str, tuple[float, int]] = {}  # key -> (weighted sum, updates) over the finite values
        self._last: dict[str, float] = {}
        self._clock = (time.perf_counter(), 0)

    def accumulate(self, optim_steps: int, average_losses: TensorDictBase | None) -> None:
        count = self.schedule.updates_in_batch
        if average_losses is None or not count:
            return
        for key, value in average_losses.items():
            value = float(value)
            if key in COUNTERS:  # running totals: the last one is logged
                self._last[key] = value
            elif math.isfinite(value):  # a skipped (non-finite) update leaves the averages alone
                total, weight = self._sums.get(key, (0.0, 0))
                self._sums[key] = (total + value * count, weight + count)

    def run(self) -> None:
        steps = self.schedule.steps
        values = {key: total / weight for key, (total, weight) in self._sums.items() if weight}
        values.update({key: int(value) for key, value in self._last.items()})
        for line in health_warnings(values, entropy=self.check_entropy):
            _print(self.trainer, f"warning at step {steps:_}: {line}")
        start, start_steps = self._clock
        now = time.perf_counter()
        if start_steps:
            values["fps"] = (steps - start_steps) * self.trainer.frame_skip / max(now - start, 1e-9)
        self._log(values)
        self._sums, self._last, self._clock = {}, {}, (now, steps)

    def register(self, trainer: Trainer, name: str | None = None) -> None:
        trainer.register_op("post_optim_complete_log", self.accumulate)
        super().register(trainer, name)


class EvaluationHook(_PeriodicHook):
    """Greedy-policy (actor mode) episodes every ``eval_every`` agent steps; logs ``eval_return``/``eval_length``.

    The evaluation env may be batched (e.g. a ``SerialEnv`` of several envs): the policy then acts for all of them
    at once (one call per step instead of one per env and step) and finished envs restart at once. To keep the
    mean unbiased (short episodes end first), each env contributes a fixed number of episodes, its first ones:
    ``episodes // n`` (one more for the first ``episodes % n`` envs).

    :meth:`final` runs the final evaluation of a run (``episodes`` greedy episodes when training ends), logs
    ``final_eval_return`` / ``final_eval_length`` and keeps its result (checkpointed: a resumed run that finished
    does not evaluate again; one stopped during the final evaluation does it again).

    Args:
        policy: the acting policy.
        make_env (callable): ``make_env(seed, num_envs)`` returns the evaluation env, prepared with ``is_init`` and
            the policy's primer: one env (batch size ``()``) for ``num_envs=1``, else a batched env (e.g. a
            ``SerialEnv``) of batch size ``(num_envs,)``.
        schedule (UpdateSchedule): the step counter.

    Keyword Args:
        eval_every (int): agent steps between evaluations.
        episodes (int): episodes per evaluation.
        seed (int): base seed of the evaluation envs. Default: ``10_000``.
        max_steps (int): step limit of an evaluation episode. Default: ``108_000``.
        device: where the policy runs. Default: ``"cpu"``.
        owns_env (bool): close each evaluation env after use. Default: ``True``.
        after (callable, optional): called after each evaluation (e.g. to reset a collector sharing the env).
        num_envs (int): envs stepped together (at most one per episode). Default: ``1``.
        progress (bool): a progress bar over the episodes of :meth:`final`. Default: ``False``.
    """

    def __init__(
        self,
        policy: Any,
        make_env: Callable[[int], EnvBase],
        schedule: UpdateSchedule,
        *,
        eval_every: int,
        episodes: int,
        seed: int = 10_000,
        max_steps: int = 108_000,
        device: torch.device | str = "cpu",
        owns_env: bool = True,
        after: Callable[[], None] | None = None,
        num_envs: int = 1,
        progress: bool = False,
    ) -> None:
        super().__init__(schedule, eval_every)
        self.num_envs = num_envs
        self.policy, self.make_env = policy, make_env
        self.episodes, self.seed, self.max_steps = episodes, seed, max_steps
        self.device = torch.device(device)
        self.owns_env, self.after = owns_env, after
        self.progress = progress
        self.last: dict[str, Any] | None = None
        self.final_result: dict[str, Any] | None = None

    @torch.no_grad()
    def evaluate(
        self, episodes: int | None = None, *, seed: int | None = None, progress: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Runs greedy episodes now; returns ``eval_return``, ``eval_length`` (means), ``returns`` and ``lengths``
        (lists, env by env). ``stop()``, checked at every step, abandons the evaluation
        (:class:`EvaluationStopped`)."""
        episodes = self.episodes if episodes is None else episodes
        env = self.make_env(self.seed + self.schedule.steps if seed is None else seed, min(self.num_envs, episodes))
        try:
            returns, lengths = self._run(env, episodes, progress, stop)
        finally:
            if self.owns_env:
                env.close()
        if self.after is not None:
            self.after()
        self.last = {"eval_return": float(np.mean(returns)), "eval_length": float(np.mean(lengths)),
                     "returns": returns, "lengths": lengths}
        return self.last

    def _run(self, env: EnvBase, episodes: int, progress: bool, stop: Callable[[], bool] | None
             ) -> tuple[list[float], list[int]]:
        num_envs = max(1, env.batch_size.numel())
        quota = [episodes // num_envs + int(i < episodes % num_envs) for i in range(num_envs)]
        done_returns: list[list[float]] = [[] for _ in range(num_envs)]
        done_lengths: list[list[int]] = [[] for _ in range(num_envs)]
        total, length = np.zeros(num_envs), np.zeros(num_envs, dtype=np.int64)
        bar = _progress_bar(episodes, "final evaluation") if progress else None
        try:
            with set_exploration_type(ExplorationType.DETERMINISTIC):
                root = env.reset()
                while any(len(done) < want for done, want in zip(done_returns, quota)):
                    if stop is not None and stop():
                        raise EvaluationStopped
                    td = env.step(self.policy(root.to(self.device)).to(env.device))
                    total += td.get(("next", "reward")).reshape(num_envs, -1).sum(-1).double().numpy()
                    length += 1
                    limit = torch.from_numpy(length >= self.max_steps)
                    if limit.any():  # the step limit ends (and restarts) an episode as a truncation would
                        for key in ("truncated", "done"):
                            flag = td.get(("next", key))
                            td.set(("next", key), flag | limit.reshape(flag.shape[:-1] + (1,)).expand_as(flag))
                    done = td.get(("next", "done")).reshape(num_envs, -1).any(-1)
                    for i in done.nonzero().squeeze(-1).tolist():
                        if len(done_returns[i]) < quota[i]:
                            done_returns[i].append(float(total[i]))
                            done_lengths[i].append(int(length[i]))
                            if bar is not None:
                                bar.update(1)
                        total[i], length[i] = 0.0, 0
                    root = env.maybe_reset(step_mdp(td))
        finally:
            if bar is not None:
                bar.close()
        return [r for env_returns in done_returns for r in env_returns], [n for ls in done_lengths for n in ls]

    def final(self, episodes: int, *, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The final evaluation: ``episodes`` greedy episodes, once per run (see the class docstring); raises
        :class:`EvaluationStopped` when ``stop()`` turns true, leaving it to be done again."""
        if self.final_result is None:
            result = self.evaluate(episodes, seed=self.seed + 7_777_777, progress=self.progress, stop=stop)
            self.final_result = {"steps": self.schedule.steps, "episodes": episodes, **result}
            self._log({"final_eval_return": result["eval_return"], "final_eval_length": result["eval_length"]})
        return self.final_result

    def run(self) -> None:
        result = self.evaluate()
        self._log({"eval_return": result["eval_return"], "eval_length": result["eval_length"]})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.final_result is not None:
            state["final"] = json.dumps(self.final_result)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        final = state_dict.get("final")
        self.final_result = json.loads(final) if final is not None else None

    default_name = "evaluation"


class EvaluationStopped(Exception):
    """An evaluation was abandoned before its episodes ended (the run was asked to stop)."""


def _progress_bar(total: int, desc: str):
    """A tqdm bar when tqdm is installed, else ``None``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="episode", leave=False)


class OpenLoopVideoHook(_PeriodicHook):
    """DreamerV2's open-loop prediction video every ``video_every`` agent steps.

    Logged with the trainer logger's ``log_video("openl", ...)`` (``[1, T, C, 3H, nW]`` uint8) and written as
    ``<videos_dir>/openl_<frames>.gif``. Does nothing for a world model without image observations.
    """

    def __init__(self, world_model: Any, replay_buffer: Any, schedule: UpdateSchedule, *, video_every: int,
                 videos_dir: str | Path | None = None, num_videos: int = 6) -> None:
        super().__init__(schedule, video_every)
        self.world_model, self.replay_buffer = world_model, replay_buffer
        self.videos_dir = Path(videos_dir) if videos_dir is not None else None
        self.num_videos = num_videos

    @torch.no_grad()
    def record(self) -> torch.Tensor | None:
        """Returns the video ``[T, C, 3H, nW]`` (and logs/writes it), or None without images or data."""
        if not getattr(self.world_model, "cnn_keys", None) or not self.replay_buffer.can_sample():
            return None
        batch = self.replay_buffer.sample()
        if is_transition_batch(batch, self.world_model.obs_keys):  # a stock buffer's slices of transitions
            batch = transitions_as_sequences(batch, self.world_model.obs_keys)
        batch = batch[: self.num_videos]
        video = open_loop_video(self.world_model, batch, context=min(5, batch.shape[1] // 2))
        frames = int(self.trainer.collected_frames) if self.trainer is not None else self.schedule.steps
        logger = getattr(self.trainer, "logger", None)
        if logger is not None:
            logger.log_video("openl", video.unsqueeze(0), step=frames)
        if self.videos_dir is not None:
            write_gif(video, self.videos_dir / f"openl_{frames}.gif")
        return video

    def run(self) -> None:
        self.record()

    default_name = "open_loop_video"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous one, if any, is intact)."""


class CheckpointHook(_PeriodicHook):
    """Saves a :class:`~torchrl.checkpoint.Checkpoint` archive atomically every ``checkpoint_every`` agent steps.

    The archive is written to ``<path>.tmp`` (TorchRL stages it and publishes it there), flushed to disk, then
    renamed over ``path`` with one ``os.replace``: a process killed at any moment leaves either the previous
    checkpoint or the new one, never a partial file. The manifest's metadata carries ``metadata()`` (e.g. the
    step counters), readable with ``Checkpoint.manifest(path)`` without loading anything.

    Args:
        checkpoint (Checkpoint): the components to save.
        path (str | Path): the archive's path.
        schedule (UpdateSchedule): the step counter.

    Keyword Args:
        checkpoint_every (int): agent steps between two saves.
        metadata (callable, optional): returns the JSON metadata of each save.
    """

    def __init__(self, checkpoint: Checkpoint, path: str | Path, schedule: UpdateSchedule, *,
                 checkpoint_every: int, metadata: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__(schedule, checkpoint_every)
        self.checkpoint, self.path = checkpoint, Path(path)
        self.metadata = metadata

    def save(self) -> Path:
        """Writes the archive; on a write error (a full disk, a read-only directory) the previous checkpoint is
        kept, the partial files are removed and :class:`CheckpointWriteError` says why."""
        for stale in self.path.parent.glob(f".{self.path.name}.tmp.*"):  # left by a process killed mid-save
            Checkpoint._remove_path(stale)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.checkpoint.save(tmp, format="archive", metadata=self.metadata() if self.metadata else None)
            with open(tmp, "rb") as file:
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
            for partial in [tmp, *self.path.parent.glob(f".{self.path.name}.tmp.*")]:
                if partial.exists():
                    Checkpoint._remove_path(partial)
            kept = "the previous checkpoint is kept" if self.path.exists() else "no checkpoint was written"
            reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[-1]
            raise CheckpointWriteError(
                f"Cannot write the checkpoint {self.path}: {reason}; {kept}. Free space (or fix the "
                "permissions) and run the same command to resume."
            ) from err
        return self.path

    def load(self, map_location: Any = "cpu") -> None:
        self.checkpoint.load(self.path, map_location=map_location)

    def run(self) -> None:
        self.save()

    default_name = "checkpointer"
