"""Past one machine: DreamerV2 on TorchRL's own Ray backends (an optional extra: ``pip install -e ".[distributed]"``).

Nothing here is a distributed engine: every piece is TorchRL's, this module only fits DreamerV2 to them::

    N x RayCollector workers (each: the env, InitTracker, the policy's primer, PolicyVersion; random actions for
        their share of the prefill)  --client.extend-->  DreamerReplayBuffer as a Ray actor (RayReplayBuffer,
        pinned to the node that holds its memory maps)  --client.sample(B / G)-->  G learner ranks
        (Trainer(learner_backend="ray"): DDP over gloo on CPUs, nccl on GPUs; DreamerV2OptimizationStepper through
        trainer.compute_loss; the slow critic's HardUpdate)  --RayWeightSyncScheme-->  the workers' policies

What DreamerV2 needs that TorchRL leaves to the algorithm, and where it is done here:

* **Unique trajectory ids.** Each worker's collector numbers its trajectories from 0; the replay keys episodes by
  id, so :class:`WorkerTrajectoryIds` (each worker's ``postproc``) makes them ``id * workers + worker``.
* **A dead worker replaced while the others collect.** :class:`RestartingRayCollector` starts its successor, the
  trainer closes its open episodes in the replay and moves the learner's weight publication onto the new workers.
* **The acting policy's weights.** TorchRL's learner publishes its loss's ``actor_network``; DreamerV2's policy also
  runs the world model (encoder and RSSM), so :func:`make_dreamerv2_ray_trainer` points the loss's ``actor_network``
  at the acting policy (not registered as a submodule: the loss's parameters and checkpoints are unchanged).
* **The same update as one process.** DDP averages the ranks' gradients; the two batch statistics of the losses
  that are not plain means are taken over every rank's batch (:func:`~torchrl_dreamer.objectives.data_parallel`).
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.collectors.distributed import RayCollector
from torchrl.trainers import Trainer
from torchrl.trainers.trainers import OptimizationStepper

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.envs.resolve import EnvFactory, EnvLike, prepare_env
from torchrl_dreamer.record import EpisodeTracker
from torchrl_dreamer.trainers.hooks import EpisodeReturnHook, EvaluationHook

__all__ = ["WorkerTrajectoryIds", "require_ray", "init_ray", "make_replay_service", "make_dreamerv2_ray_trainer",
           "RankStepper", "DreamerV2RayTrainer", "DistributedFailure", "WorkerCollector", "RestartingRayCollector",
           "WorkerEpisodeReturns"]

RAY_PIN = "ray>=2.40,<2.61"  # the versions tested with TorchRL 0.14 (setup.cfg's [distributed] extra)
RAY_CHECKPOINT = "checkpoint_ray"  # TorchRL's Checkpoint of the whole job: trainer, collectors, replay, every rank
POLICY_VERSION = "policy_version"  # the learner's update count whose weights collected a step (TorchRL's PolicyVersion)
LAYOUT_FILE = "distributed.json"  # the collectors and learners the run was started with


def require_ray():
    """Imports Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            'Ray is not installed: the distributed path is an optional extra, pip install -e ".[distributed]".'
        ) from None
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Joins the cluster at ``address`` (``"auto"`` or ``"HOST:PORT"``), or starts a local one (``num_cpus``
    logical CPUs: each collector and learner rank reserves one). Does nothing when Ray is already initialised.

    TorchRL's pieces start Ray themselves when it is not running, and shut it down when the last of them is done;
    starting it here keeps one cluster for the whole run.
    """
    ray = require_ray()
    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


class WorkerTrajectoryIds:
    """A collector ``postproc`` that makes worker ``worker``'s trajectory ids unique among ``workers`` workers:
    ``(id + first) * workers + worker`` (TorchRL's collectors each number their trajectories from 0, and the replay
    keys episodes by id: two workers' episodes would be read as one). A restarted worker numbers from 0 again:
    ``first`` skips the ids its predecessor used. With ``keep`` (the replay's ``read_keys()``), the batch keeps only
    those keys: the worker sends the replay what it stores, not the policy's recurrent state and features.

    Examples:
        >>> from tensordict import TensorDict
        >>> batch = TensorDict({("collector", "traj_ids"): torch.tensor([0, 0, 1])}, [3])
        >>> WorkerTrajectoryIds(1, 2)(batch.clone())["collector", "traj_ids"].tolist()
        [1, 1, 3]
        >>> WorkerTrajectoryIds(1, 2, first=5)(batch.clone())["collector", "traj_ids"].tolist()
        [11, 11, 13]
    """

    def __init__(self, worker: int, workers: int, traj_key=("collector", "traj_ids"), *, first: int = 0,
                 keep=None) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker must be in [0, {workers}), got {worker}.")
        self.worker, self.workers, self.traj_key, self.first, self.keep = worker, workers, traj_key, first, keep
        self.finished: list[tuple[float, int]] = []  # (return, length) of the episodes ended, not yet popped
        self._tracker: EpisodeTracker | None = None  # the local trainer's tracker, sized by the first batch

    def __call__(self, batch: TensorDictBase) -> TensorDictBase:
        ids = batch.get(self.traj_key)
        batch = batch.set(self.traj_key, (ids.long() + self.first) * self.workers + self.worker)
        self._track(batch)
        return batch if self.keep is None else batch.select(*self.keep, strict=False)

    def _track(self, batch: TensorDictBase) -> None:
        """Adds the batch's ended episodes to :attr:`finished` as ``(return, length)`` (the driver logs them: the
        batch itself goes to the replay, not to the driver)."""
        if ("next", "reward") not in batch.keys(True) or ("next", "done") not in batch.keys(True):
            return
        if self._tracker is None:
            self._tracker = EpisodeTracker(batch.shape[0] if batch.ndim > 1 else 1)
        self.finished += self._tracker.update(batch)

    def pop_finished(self) -> list[tuple[float, int]]:
        """The episodes ended since the last call, ``(return, length)`` each."""
        finished, self.finished = self.finished, []
        return finished

    def owns(self, key: int) -> bool:
        """Whether trajectory id ``key`` is this worker's."""
        return key % self.workers == self.worker

    def after(self, keys) -> "WorkerTrajectoryIds":
        """The ids of this worker's successor: past every id of this worker in ``keys``."""
        used = [key // self.workers for key in keys if self.owns(key)]
        return WorkerTrajectoryIds(self.worker, self.workers, self.traj_key, first=max(used, default=-1) + 1,
                                   keep=self.keep)


def make_replay_service(config: DreamerV2Config, scratch_dir: str | Path, obs_keys, *, node_id: str | None = None,
                        fresh: bool = False):
    """The run's :class:`~torchrl_dreamer.data.DreamerReplayBuffer` as a Ray actor (TorchRL's ``RayReplayBuffer``),
    pinned to ``node_id`` (default: this node, whose disk holds ``scratch_dir``). Pass ``.client()`` /
    ``.clients(n)`` to other actors: the service itself is not picklable."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from torchrl_dreamer.data import DreamerReplayBuffer

    node_id = node_id or ray.get_runtime_context().get_node_id()
    return DreamerReplayBuffer(
        capacity=config.replay_capacity, seq_len=config.batch_length, batch_size=config.batch_size,
        obs_keys=obs_keys, scratch_dir=str(Path(scratch_dir).absolute()), prioritize_ends=config.prioritize_ends,
        strict_length=config.strict_length, episodes_by_length=config.episodes_by_length, seed=config.seed,
        fresh=fresh, extra_keys=(POLICY_VERSION,), service_backend="ray",
        service_backend_options={"remote_config": {
            "num_cpus": 0, "num_gpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
        }},
    )


class WorkerCollector(Collector):
    """TorchRL's ``Collector`` for a Ray worker that writes into the replay service. Three differences, each for
    what TorchRL's leaves out on this path: it reports the episodes it ends (:meth:`next`: the driver never sees the
    batches), it counts its share of the random prefill in its own steps (:meth:`_should_use_random_frames`), and it
    is named in one line (Ray prefixes each log line of an actor with its repr, the default is dozens of lines)."""

    def __repr__(self) -> str:
        return f"DreamerV2Collector(worker={self.worker_idx})"

    def next(self):
        """One batch into the replay; returns the ``(return, length)`` of the episodes that ended in it (a list,
        for the driver's ``train_return``) instead of ``None``."""
        out = super().next()
        if out is None and isinstance(self.postproc, WorkerTrajectoryIds):
            return self.postproc.pop_finished()
        return out

    def _should_use_random_frames(self) -> bool:
        """Random actions for this worker's share of the prefill, counted in its own steps (restored with its
        checkpointed state). TorchRL's collector counts the replay's writes instead when it writes into a replay:
        with the replay a Ray service that is a remote call per agent step (over half of a CartPole worker's
        time), and the writes of every worker, so N workers would act at random for only 1/N of the prefill."""
        return bool(self.init_random_frames) and self._frames < self.init_random_frames


class RestartingRayCollector(RayCollector):
    """TorchRL's ``RayCollector`` (asynchronous: each batch from whichever worker is done first) whose workers
    are replaced when they die, while the others go on collecting.

    Unlike TorchRL's, a worker is asked for its next batch before the learner updates on its last one (the
    learner's weight publication waits for that batch): collection overlaps the update, as with several workers.

    TorchRL's ``RayCollector`` has no restart: a dead worker's next batch raises, and the learner's weight
    publication to it fails. This class keeps how each worker was made (:meth:`add_collectors`); when a
    worker's batch fails because its actor died, or :meth:`dead_workers` finds it dead, :meth:`replace_worker`
    starts its successor with the same env, policy, replay client and resources, no prefill share, and the
    trajectory ids after its predecessor's; ``on_worker_lost(index)`` (set by the trainer: it closes the dead
    worker's open episodes in the replay and moves the learner's weight publication onto the new set of
    workers) runs first.
    """

    on_worker_lost = None  # callable(index) -> postproc of the successor
    restarts = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.finished_episodes: list[tuple[float, int]] = []  # the workers' ended episodes, not yet logged

    def add_collectors(self, create_env_fn, num_envs, policy, collector_kwargs, remote_configs):
        self._worker_args = (list(create_env_fn), num_envs, policy, [dict(kwargs) for kwargs in collector_kwargs],
                             list(remote_configs))
        super().add_collectors(create_env_fn, num_envs, policy, collector_kwargs, remote_configs)

    def worker_kwargs(self, index: int) -> dict:
        """The collector keyword arguments worker ``index`` (or its latest successor) was made with."""
        return dict(self._worker_args[3][index])

    def dead_workers(self) -> list[int]:
        """The workers whose actor is dead, from Ray's actor table (a busy worker is not asked)."""
        from ray._private import state

        dead = []
        for index, actor in enumerate(self.remote_collectors):
            info = state.actors(actor_id=actor._actor_id.hex())
            if info and info.get("State") == "DEAD":
                dead.append(index)
        return dead

    def replace_worker(self, index: int) -> None:
        """Starts worker ``index``'s successor (after ``on_worker_lost``, which gives its ``postproc``)."""
        create_env_fn, num_envs, policy, collector_kwargs, remote_configs = self._worker_args
        params = dict(collector_kwargs[index], worker_idx=index, init_random_frames=0)
        if self.on_worker_lost is not None:
            params["postproc"] = self.on_worker_lost(index)
        collector_kwargs[index] = dict(params)
        env = create_env_fn[index]
        if isinstance(env, _WorkerEnv):  # the successor's env seeded apart from every other worker's
            create_env_fn[index] = env = _WorkerEnv(env.factory, env.seed + 1_000_003 * len(create_env_fn), env.primer)
        cls = self.collector_class.as_remote(remote_configs[index]).remote
        worker_policy = policy[index] if isinstance(policy, (list, tuple)) else policy
        env_maker = [env] * num_envs if num_envs > 1 else env
        self._remote_collectors[index] = self._make_collector(cls, env_maker=env_maker, policy=worker_policy,
                                                              other_params=params)
        self.restarts += 1

    def _async_iterator(self):
        import ray

        pending = {}  # future -> (worker index, the actor asked)

        def submit(index: int) -> None:
            actor = self.remote_collectors[index]
            pending[actor.next.remote()] = (index, actor)

        for index in range(len(self.remote_collectors)):
            submit(index)
        while self.collected_frames < self.total_frames and not self._stop_event.is_set():
            [future], _ = ray.wait(list(pending))
            index, actor = pending.pop(future)
            try:
                out = ray.get(future)
            except ray.exceptions.RayActorError:
                if actor is self.remote_collectors[index]:  # not yet replaced (by the trainer's probe)
                    self.replace_worker(index)
                submit(index)
                continue
            if isinstance(out, list):  # a WorkerCollector's ended episodes: the batch itself is in the replay
                self.finished_episodes.extend(out)
                out = None
            self.collected_frames += self.frames_per_batch
            if self.update_after_each_batch or self.max_weight_update_interval > -1:  # TorchRL's order
                yield out
                self.update_policy_weights_(worker_ids=index)
                submit(index)
            else:  # the worker collects its next batch while the learner updates on this one
                submit(index)
                yield out
        ray.wait(list(pending), num_returns=len(pending))
        if self._collection_thread is None:
            self.shutdown()


class _WorkerEnv:
    """Builds worker ``worker``'s env in its Ray actor: the user's env, seeded apart from the other workers',
    with ``InitTracker`` and the policy's primer."""

    def __init__(self, factory: EnvFactory, seed: int, primer: Any) -> None:
        self.factory, self.seed, self.primer = factory, seed, primer

    def __call__(self):
        return prepare_env(self.factory(self.seed), self.primer)


class RankStepper(OptimizationStepper):
    """A learner rank's update: :class:`~torchrl_dreamer.trainers.DreamerV2OptimizationStepper`, then the slow
    critic's copy (``HardUpdate``). Logs ``policy_lag`` (mean and max over the sampled rows of the updates made
    since the weights that collected them; the replay stores each step's ``policy_version``).

    TorchRL's Ray learner steps a ``target_net_updater`` only when it is the learner's own loss's; DreamerV2's slow
    critic belongs to the value sub-loss, so the rank steps it here after each update (as the local trainer's
    ``TargetNetUpdaterHook`` does at ``post_optim``). Both are checkpointed with the rank.
    """

    updates_replay_priority = True  # the replay samples by episode, not by priority: nothing to update

    def __init__(self, stepper: Any, target_updater: Any) -> None:
        self.stepper, self.target_updater = stepper, target_updater

    def step(self, trainer: Any, sub_batch: TensorDictBase) -> TensorDictBase:
        metrics = self.stepper.step(trainer, sub_batch)
        self.target_updater.step()
        version = getattr(trainer, "model_version", None)
        if version is not None and POLICY_VERSION in sub_batch.keys():
            # updates between the weights that collected each sampled row and these (prefill rows: version 0)
            lag = version - sub_batch.get(POLICY_VERSION).double()
            metrics.set("policy_lag", lag.mean().float())
            metrics.set("policy_lag_max", lag.max().float())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"stepper": self.stepper.state_dict(), "target_updater": {"counter": self.target_updater.counter}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stepper.load_state_dict(state_dict["stepper"])
        self.target_updater.counter = state_dict["target_updater"]["counter"]


class WorkerEpisodeReturns(EpisodeReturnHook):
    """``train_return``, ``train_length`` and ``train_episodes`` on the Ray path, as the local trainer logs them:
    from the episodes the workers report ended (:class:`WorkerCollector` returns them with each batch), at each
    ``post_steps``."""

    def __call__(self) -> None:
        finished = self.trainer.collector.finished_episodes
        episodes, finished[:] = list(finished), []
        self.log_finished(episodes)

    def register(self, trainer, name: str = "episode_returns") -> None:
        self.trainer = trainer
        trainer.register_op("post_steps", self)
        trainer.register_module(name, self)


class DistributedFailure(RuntimeError):
    """A piece of the Ray job died (a learner rank, a collector worker, the replay service): one line saying which,
    and that the same command resumes from the last checkpoint."""


class LearnerWeightsEvaluation(EvaluationHook):
    """Greedy evaluation on the driver with the learner's current weights: the driver's copy of the model is
    never trained (the ranks hold it), so each evaluation first fetches rank 0's acting policy."""

    def fetch_weights(self) -> None:
        backend = self.trainer._execution_backend
        if backend is not None and backend.is_alive():
            backend.get_weights("policy").to_module(self.policy)

    def evaluate(self, *args, **kwargs):
        self.fetch_weights()
        return super().evaluate(*args, **kwargs)

    def register(self, trainer, name=None) -> None:
        super().register(trainer, name)
        trainer.register_op("shutdown", self.fetch_weights)  # the final weights, for the final evaluation


class DreamerV2RayTrainer(Trainer):
    """TorchRL's ``Trainer`` with ``learner_backend="ray"``, plus what the DreamerV2 runs need around it: the
    greedy evaluations (:attr:`evaluation`), the final one, and one line when a piece of the job dies."""

    evaluation: EvaluationHook | None = None
    final_eval_episodes: int = 0
    dead: list[str] = []
    _synced_restarts = 0

    def collector_lost(self, index: int) -> WorkerTrajectoryIds:
        """A collector worker died (``RestartingRayCollector.on_worker_lost``): its open episodes are closed in the
        replay (no later row continues them) and the event is logged (``collector_restarts``, and one line on
        stderr). Returns its successor's trajectory ids: after every id it used."""
        ids = self.collector.worker_kwargs(index)["postproc"]
        replay = self.replay_buffer.client()
        closed = replay.close_episodes(ids.owns)
        successor = ids.after(replay.episode_keys())
        restarts = self.collector.restarts + 1
        print(f"warning: collector worker {index} died at agent step {self.collected_frames // self.frame_skip:,}: "
              f"restarted ({restarts} so far); its {len(closed)} open episode(s) closed in the replay.",
              file=sys.stderr, flush=True)
        if self.logger is not None:
            self.logger.log_scalar("collector_restarts", restarts, step=self.collected_frames)
        return successor

    def _publish_execution_weights(self, *, force: bool = False) -> None:
        """TorchRL's publication of the learner's weights to the workers, after replacing any worker found dead
        (a publication to a dead worker fails the learner) and, when the set of workers changed, moving the
        learner's sender onto the new set (a new weight-sync generation, as TorchRL does on a learner restart)."""
        import ray

        collector = self.collector
        if isinstance(collector, RestartingRayCollector):
            for index in collector.dead_workers():  # ~0.5 ms per worker: Ray's actor table, the workers not asked
                collector.replace_worker(index)
            if collector.restarts != self._synced_restarts:
                scheme = collector._learner_weight_sync(new_generation=True)
                backend = self._execution_backend
                ray.get(backend._actors[0].configure_weight_sync.remote(scheme), timeout=backend.command_timeout)
                self._synced_restarts = collector.restarts
                force = True
        super()._publish_execution_weights(force=force)

    def find_dead(self) -> None:
        """At shutdown after an error, before the collectors are stopped: the pieces whose actor is gone (an error
        met on another piece, e.g. a weight publication to a dead worker, does not always name it). An actor that
        does not answer within a few seconds is busy (a collection, a receive), not dead."""
        import ray

        if sys.exc_info()[0] is None:  # a normal shutdown
            return
        actors = [("the replay service", getattr(self.replay_buffer, "_rb", None))]
        actors += [("a collector worker", actor) for actor in getattr(self.collector, "remote_collectors", [])]
        probes = {actor.__ray_ready__.remote(): name for name, actor in actors if actor is not None}
        answered, _ = ray.wait(list(probes), num_returns=len(probes), timeout=5)
        self.dead = []
        for probe in answered:
            try:
                ray.get(probe)
            except ray.exceptions.RayActorError:
                self.dead.append(probes[probe])

    def train(self) -> dict[str, Any]:
        import ray

        try:
            super().train()
        except (ray.exceptions.RayError, RuntimeError, TimeoutError) as err:
            if isinstance(err, RuntimeError) and not isinstance(err, ray.exceptions.RayError) and \
                    "learner" not in str(err).lower() and "actor" not in str(err).lower():
                raise
            raise DistributedFailure(_failure_line(err, self.logdir, self.dead)) from err
        result = {"steps": self.collected_frames // self.frame_skip, "frames": self.collected_frames,
                  "updates": self._optim_count}
        if self.evaluation is not None and self.final_eval_episodes:
            final = self.evaluation.final(self.final_eval_episodes)
            result["final_eval"] = {k: v for k, v in final.items() if k not in ("returns", "lengths")}
        return result


_PIECES = {"WorkerCollector": "a collector worker", "DreamerReplayBuffer": "the replay service",
           "_RayLearnerWorker": "a learner rank"}


def _failure_line(err: BaseException, logdir: Path, dead: list[str] = ()) -> str:
    """One line: which piece died (found dead at shutdown, or the dead actor's class that Ray names,
    ``class_name: ...``, in the error of whichever call met it first), the error's first line, how to resume."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    named = list(dead) + [_PIECES[name.rsplit(".", 1)[-1]] for name in re.findall(r"class_name: ([\w.]+)", message)
                          if name.rsplit(".", 1)[-1] in _PIECES]
    which = named[0] if named else (
        "the replay service" if "ReplayBuffer" in message else  # once it is gone, every piece fails on it
        "a learner rank" if "learner" in message.lower() else
        "a collector worker" if "Collector" in message else "a Ray actor")
    first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    return (f"{which} died ({type(err).__name__}: {first[:160]}); the job stopped. Its last checkpoint in {logdir} "
            "is kept: run the same command to resume from it.")


class _Steps:
    """The driver's count of agent steps, for the hooks that read ``schedule.steps``."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    @property
    def steps(self) -> int:
        return self.trainer.collected_frames // self.trainer.frame_skip


def make_dreamerv2_ray_trainer(
    config: DreamerV2Config,
    logdir: str | Path,
    *,
    collectors: int = 1,
    learners: int = 1,
    ray_address: str | None = None,
    env: EnvLike | None = None,
    learner_gpus: int = 0,
    shards: int = 1,
    progress: bool = True,
    command_timeout: float = 600.0,
    make_stepper: Any = None,
    keep_saved_config: bool = False,
    updates_per_command: int = 1,
):
    """A TorchRL :class:`~torchrl.trainers.Trainer` with ``learner_backend="ray"`` that trains DreamerV2 with
    ``collectors`` Ray collector workers, the replay as a Ray actor and ``learners`` data-parallel learner ranks.

    The update is :class:`~torchrl_dreamer.trainers.DreamerV2OptimizationStepper` on each rank, on ``batch_size /
    learners`` sequences each (``batch_size`` must be a multiple of ``learners``): with ``learners > 1`` eager
    (a compiled config is run eager, with a warning) and the same maths as one process on the whole batch. Every ``train_every`` agent steps a
    worker collects make one update; the prefill is split among the workers, and the first learner command after
    it runs the ``pretrain`` updates.

    Args:
        config (DreamerV2Config): hyperparameters.
        logdir (str | Path): the run directory (the replay's files, the checkpoint, the logs).

    Keyword Args:
        collectors (int): Ray collector workers (one CPU each). Default: ``1``.
        learners (int): learner ranks (one CPU, and ``learner_gpus`` GPUs, each). Default: ``1``.
        ray_address (str, optional): ``"auto"`` or ``"HOST:PORT"`` of a running cluster; ``None`` starts a local
            one.
        env: the environment (see :func:`~torchrl_dreamer.trainers.make_dreamerv2_trainer`). Default: ``config.env``.
        learner_gpus (int): GPUs per rank (nccl when > 0, gloo on CPUs). Default: ``0``.
        shards (int): CPU worker threads of each rank's eager update (see the stepper). Default: ``1``.
        progress (bool): a progress bar. Default: ``True``.
        command_timeout (float): seconds a learner command (updates, a weight publication) or the ranks' start
            may take before the job stops. Default: ``600``.
        make_stepper (callable, optional): ``make_stepper(stepper, target_updater)`` returns the ranks'
            ``OptimizationStepper`` from the DreamerV2 stepper and the slow critic's updater (e.g. a subclass of
            :class:`RankStepper` that records or schedules). Default: :class:`RankStepper`.
        updates_per_command (int): updates per learner command: each worker batch is ``updates_per_command *
            train_every`` agent steps, followed by that many updates (the same ratio of updates to steps) and one
            weight publication. Above 1 it spreads the per-command Ray calls over several updates, and the workers
            act with weights up to that many updates older. Default: ``1``.
        keep_saved_config (bool): a resumed job whose saved config differs from ``config`` in more than the
            schedules resumes with the saved values (otherwise it is refused with one line, as on the local path).
            Default: ``False``.
    """
    for name, value in (("collectors", collectors), ("learners", learners),
                        ("updates_per_command", updates_per_command)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if config.batch_size % learners:
        raise ValueError(f"--batch-size {config.batch_size} does not split over {learners} learners: use a multiple.")
    if learners > 1 and (config.compile or config.cudagraph):
        warnings.warn("A data-parallel learner runs the eager update (its DDP reduces the gradients of the losses "
                      "computed through trainer.compute_loss): compile and cudagraph are off for its ranks.",
                      stacklevel=2)
        config = config.replace(compile=False, cudagraph=False)
    require_ray()
    from torchrl.checkpoint import Checkpoint
    from torchrl.envs.llm.transforms import PolicyVersion
    from torchrl_dreamer.record import make_logger
    from torchrl_dreamer.trainers.trainer import CONFIG_FILE, _reconcile_config, write_config

    logdir = Path(logdir).expanduser().absolute()
    layout = logdir / LAYOUT_FILE
    if layout.exists():  # a resumed run: TorchRL's learner restores each rank's state, it does not re-shard
        saved = json.loads(layout.read_text())
        if saved["learners"] != learners:
            raise ValueError(
                f"{logdir} was trained with --learners {saved['learners']}: resume it with --learners "
                f"{saved['learners']} (each rank's state is restored as saved; it is not re-sharded)."
            )
    if (logdir / RAY_CHECKPOINT).exists():  # a resumed job keeps its settings (the schedules may change)
        if not (logdir / CONFIG_FILE).exists():
            raise ValueError(f"{logdir / CONFIG_FILE} is missing: the settings of this job cannot be checked; "
                             "restore it or use another --logdir.")
        config = _reconcile_config(config, logdir, True, keep_saved_config)
    logdir.mkdir(parents=True, exist_ok=True)
    init_ray(ray_address, num_cpus=None if ray_address else collectors + learners + 1)
    torch.manual_seed(config.seed)
    factory = EnvFactory(env if env is not None else config.env, **({} if env is not None else config.make_env_kwargs))
    if factory.is_instance:
        raise ValueError("Ray collector workers build their own envs: pass a factory or a name, not an env instance.")
    probe = factory(config.seed)
    models = config.make_models(probe.observation_spec, probe.action_spec, device="cpu")
    probe.close()
    loss = config.make_loss(models)
    # TorchRL's learner publishes its loss's actor_network to the workers: DreamerV2's acting policy (world model
    # encoder and RSSM, and the actor), left out of the loss's modules so its parameters and checkpoints stay as
    # they are (the policy shares their tensors)
    object.__setattr__(loss, "actor_network", models.policy)
    stepper = (make_stepper or RankStepper)(config.make_stepper(loss, shards=shards), config.make_target_updater(loss))
    replay = make_replay_service(config, logdir / "replay", models.world_model.obs_keys)
    keep = replay.client().read_keys()  # what the workers send the replay
    primer = models.policy.make_tensordict_primer()
    envs = [_WorkerEnv(factory, config.seed + 1 + 1_000_003 * i, primer) for i in range(collectors)]
    collector = RestartingRayCollector(
        envs,
        models.policy,
        frames_per_batch=config.train_every * updates_per_command,
        total_frames=2**62,  # the trainer stops at total_steps (RayCollector reads -1 as none left)
        init_random_frames=config.prefill,  # RayCollector gives each worker its share
        replay_buffer=replay,
        collector_class=WorkerCollector,
        collector_kwargs=[{"postproc": WorkerTrajectoryIds(i, collectors, keep=keep),
                           "track_policy_version": PolicyVersion(int)} for i in range(collectors)],
        remote_configs={"num_cpus": 1, "num_gpus": 0},
        sync=False,
    )
    trainer = DreamerV2RayTrainer(
        collector=collector,
        total_frames=config.total_steps * config.action_repeat,
        frame_skip=config.action_repeat,
        optim_steps_per_batch=updates_per_command,
        loss_module=loss,
        optimization_stepper=stepper,
        replay_buffer=replay,
        batch_size=config.batch_size,
        learner_backend="ray",
        learner_backend_options={
            "world_size": learners,
            "resources_per_rank": {"num_cpus": 1, "num_gpus": learner_gpus},
            "command_timeout": command_timeout,
            "setup_timeout": command_timeout,  # placing and starting the ranks (120 s by default) on a loaded node
        },
        logger=None,  # set below, once a resumed run's step is known
        progress_bar=progress,
        log_interval=config.log_every * config.action_repeat,
        checkpoint=Checkpoint(),
        save_trainer_file=str(logdir / RAY_CHECKPOINT),
        save_trainer_interval=config.checkpoint_every * config.action_repeat,
        seed=config.seed,
    )
    trainer.config, trainer.logdir, trainer.models, trainer.replay = config, logdir, models, replay
    collector.on_worker_lost = trainer.collector_lost
    trainer.register_op("shutdown", trainer.find_dead)
    WorkerEpisodeReturns().register(trainer)
    if config.eval_episodes:
        def make_eval_env(seed: int, num_envs: int = 1):
            return prepare_env(factory(seed), models.policy.make_tensordict_primer())

        trainer.evaluation = LearnerWeightsEvaluation(models.policy, make_eval_env, _Steps(trainer),
                                                      eval_every=config.eval_every, episodes=config.eval_episodes,
                                                      seed=config.seed + 10_000)
        trainer.evaluation.register(trainer)
        trainer.final_eval_episodes = config.final_eval_episodes
    trainer.resumed = (logdir / RAY_CHECKPOINT).exists()
    if trainer.resumed:
        trainer.load_from_file(str(logdir / RAY_CHECKPOINT))
    # the logs keep the rows up to the checkpoint's step (a job stopped later logged rows it will log again)
    trainer.logger = make_logger(logdir, resume_step=trainer.collected_frames if trainer.resumed else 0)
    if trainer._optim_count == 0 and config.pretrain > 1:
        # the reference's pretraining: the first learner command, once the prefill is in, runs `pretrain` updates
        trainer.optim_steps_per_batch = config.pretrain

        def after_pretraining() -> None:
            if trainer._optim_count:
                trainer.optim_steps_per_batch = updates_per_command

        trainer.register_op("post_steps", after_pretraining)
    layout.write_text(json.dumps({"collectors": collectors, "learners": learners}))
    write_config(config, logdir)
    return trainer
