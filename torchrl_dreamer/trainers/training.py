"""The DreamerV2 training loop: collect, store, update, evaluate, record, checkpoint, resume.

Data flow (all TorchRL pieces)::

    make_env (+ InitTracker + the policy's primer) --Collector--> [num_envs, T] transitions
        --> DreamerReplayBuffer (memmap, one row per observation) --sample--> [B, L] sequences
        --> DreamerV2OptimizationStepper (model, actor, critic steps; target critic copy)

One run lives in one directory: ``config.json``, ``checkpoint.pt`` (written
atomically), ``replay/`` (memory-mapped rows), ``scalars/*.csv`` (TorchRL
``CSVLogger``), ``tb/`` (TensorBoard, when installed) and ``videos/`` (GIFs).
Running again on the same directory resumes from the checkpoint.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase, ParallelEnv, SerialEnv, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.data import make_replay_buffer
from torchrl_dreamer.envs import make_env
from torchrl_dreamer.modules import infer_obs_key
from torchrl_dreamer.record import EpisodeTracker, make_logger, open_loop_video, write_gif

__all__ = ["DreamerV2Training", "resolve_device", "CheckpointError", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
_CHECKPOINT_VERSION = 1
# fields that may differ when a run is resumed
_RESUMABLE_CHANGES = {"total_steps", "eval_every", "log_every", "video_every", "checkpoint_every", "eval_episodes"}


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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DreamerV2Training:
    """One DreamerV2 training run in a log directory (created, or resumed when it holds a checkpoint).

    Args:
        config (DreamerV2Config): hyperparameters (see :class:`~torchrl_dreamer.config.DreamerV2Config`).
        logdir (str | Path): the run directory; its parent must exist.

    Keyword Args:
        device (str): ``"auto"``, ``"cpu"`` or ``"cuda"``. Default: ``"auto"``.
        progress (bool): show a tqdm progress bar. Default: ``True``.
        parallel_envs (bool): several envs in worker processes (``ParallelEnv``) rather than
            in this process (``SerialEnv``). Default: ``True``.

    Examples:
        >>> import tempfile
        >>> cfg = DreamerV2Config.preset("debug", total_steps=200, eval_every=10**9, video_every=10**9)
        >>> run = DreamerV2Training(cfg, tempfile.mkdtemp() + "/run", device="cpu", progress=False)
        >>> run.train()["steps"]
        200
    """

    def __init__(
        self,
        config: DreamerV2Config,
        logdir: str | Path,
        *,
        device: str | torch.device = "auto",
        progress: bool = True,
        parallel_envs: bool = True,
    ):
        self.logdir = Path(logdir).expanduser().absolute()
        if not self.logdir.parent.is_dir():
            raise FileNotFoundError(f"The parent of the log directory does not exist: {self.logdir.parent}")
        self.logdir.mkdir(exist_ok=True)
        self.config = self._reconcile_config(config)
        cfg = self.config
        if cfg.train_every % cfg.num_envs:
            raise ValueError(f"train_every ({cfg.train_every}) must be a multiple of num_envs ({cfg.num_envs}).")
        self.device = resolve_device(device)
        self.progress = progress
        self.parallel_envs = parallel_envs
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)

        probe = self._make_single_env(cfg.seed)
        self.obs_key = infer_obs_key(probe.observation_spec)
        self.models = cfg.make_models(probe.observation_spec, probe.action_spec, device=self.device)
        probe.close()
        self.loss = cfg.make_loss(self.models)
        self.stepper = cfg.make_stepper(self.loss)
        self.replay = make_replay_buffer(
            capacity=cfg.replay_capacity,
            seq_len=cfg.batch_length,
            batch_size=cfg.batch_size,
            num_envs=cfg.num_envs,
            obs_keys=(self.obs_key,),
            scratch_dir=self.logdir / "replay",
            prioritize_ends=cfg.prioritize_ends,
            device=self.device,
            seed=cfg.seed,
        )
        self.tracker = EpisodeTracker(cfg.num_envs)
        self.logger = make_logger(self.logdir)
        self.counters = {"steps": 0, "updates": 0, "episodes": 0, "next_eval": cfg.eval_every,
                         "next_log": cfg.log_every, "next_video": cfg.video_every, "next_checkpoint": cfg.checkpoint_every}
        self.last_return = float("nan")
        self.resumed = self.load_checkpoint() if (self.logdir / CHECKPOINT_FILE).exists() else False
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0

    # ---- set-up -----------------------------------------------------------------------------------------
    def _reconcile_config(self, config: DreamerV2Config) -> DreamerV2Config:
        """A resumed run keeps its saved config (schedules excepted); a new one saves it."""
        path = self.logdir / CONFIG_FILE
        if (self.logdir / CHECKPOINT_FILE).exists() and path.exists():
            saved = json.loads(path.read_text())
            given = config.to_dict()
            changed = {k for k in given if k in saved and given[k] != saved[k] and k not in _RESUMABLE_CHANGES}
            if changed:
                print(f"Resuming {self.logdir}: keeping the saved values of {sorted(changed)} (delete the run to change them).")
            keep = {k: v for k, v in saved.items() if k not in _RESUMABLE_CHANGES}
            config = config.replace(**keep)
        path.write_text(json.dumps(config.to_dict(), indent=2))
        return config

    def _make_single_env(self, seed: int) -> EnvBase:
        cfg = self.config
        return make_env(cfg.env, seed=seed, **cfg.env_kwargs)

    def _make_train_env(self, seed: int) -> EnvBase:
        cfg = self.config
        if cfg.num_envs == 1:
            base = self._make_single_env(seed)
        else:
            fns = [functools.partial(make_env, cfg.env, seed=seed + i, **cfg.env_kwargs) for i in range(cfg.num_envs)]
            batched = ParallelEnv if self.parallel_envs else SerialEnv
            base = batched(cfg.num_envs, fns)
        return _with_primer(base, self.models.policy.make_tensordict_primer())

    def _make_collector(self) -> Collector:
        cfg = self.config
        # new seeds after a resume, so that the environments do not replay the same episodes
        env = self._make_train_env(cfg.seed + 1 + self.counters["steps"])
        return Collector(
            env,
            self.models.policy,
            frames_per_batch=cfg.train_every,
            total_frames=-1,
            init_random_frames=max(0, cfg.prefill - self.counters["steps"]),
            policy_device=self.device,
            env_device="cpu",
            storing_device="cpu",
        )

    # ---- one update ---------------------------------------------------------------------------------------
    def update(self) -> TensorDictBase:
        """Samples a batch from replay and runs one DreamerV2 update; returns its metrics."""
        metrics = self.stepper.step(None, self.replay.sample())
        self.counters["updates"] += 1
        for key, value in metrics.items():
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + value
        self._metric_count += 1
        return metrics

    def _updates_due(self) -> int:
        cfg, steps = self.config, self.counters["steps"]
        if steps < cfg.prefill or not self.replay.can_sample():
            return 0
        return cfg.pretrain + (steps - cfg.prefill) // cfg.train_every - self.counters["updates"]

    # ---- evaluation and records ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, episodes: int | None = None, *, max_steps: int = 108_000) -> dict[str, float]:
        """Greedy-policy episodes (actor mode) on a fresh environment; returns mean return and length."""
        episodes = self.config.eval_episodes if episodes is None else episodes
        env = _with_primer(
            self._make_single_env(self.config.seed + 10_000 + self.counters["steps"]),
            self.models.policy.make_tensordict_primer(),
        )
        returns, lengths = [], []
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            for _ in range(episodes):
                td, total, length = env.reset(), 0.0, 0
                for length in range(1, max_steps + 1):
                    td = self.models.policy(td.to(self.device)).to("cpu")
                    td = env.step(td)
                    total += float(td.get(("next", "reward")).sum())
                    if bool(td.get(("next", "done")).any()):
                        break
                    td = step_mdp(td)
                returns.append(total)
                lengths.append(length)
        env.close()
        result = {"eval_return": float(np.mean(returns)), "eval_length": float(np.mean(lengths))}
        self.logger.log_scalars(result, self.frames)
        return result

    @torch.no_grad()
    def record_video(self) -> Path | None:
        """Writes the open-loop prediction GIF ``videos/openl_<frames>.gif``; None for vector observations."""
        if self.models.world_model.decoder.__class__.__name__ != "ConvDecoderV2" or not self.replay.can_sample():
            return None
        batch = self.replay.sample(min(6, self.config.batch_size))
        video = open_loop_video(self.models.world_model, batch, context=min(5, batch.shape[1] // 2))
        return write_gif(video, self.logdir / "videos" / f"openl_{self.frames}.gif")

    @property
    def frames(self) -> int:
        return self.counters["steps"] * self.config.action_repeat

    def _log_train(self, elapsed: float, steps_since: int) -> None:
        if self._metric_count:
            values = {k: float(v / self._metric_count) for k, v in self._metric_sums.items()}
            self.logger.log_scalars(values, self.frames)
        self.logger.log_scalar("fps", steps_since * self.config.action_repeat / max(elapsed, 1e-9), self.frames)
        self._metric_sums, self._metric_count = {}, 0

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "loss": self.loss.state_dict(),
            "optimizers": self.stepper.state_dict(),
            "counters": dict(self.counters),
            "tracker": self.tracker.state_dict(),
            "replay": self.replay.state_dict(),
            "replay_rows": len(self.replay),
            "rng": _rng_state(),
        }

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoint.pt`` atomically (a kill during the write leaves the previous one intact)."""
        path = self.logdir / CHECKPOINT_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as file:
            torch.save(self.state_dict(), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        return path

    def load_checkpoint(self) -> bool:
        """Restores models, optimisers, target critic, counters, RNG states and the replay buffer."""
        path = self.logdir / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
            if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
                raise CheckpointError("unknown checkpoint format")
            self.loss.load_state_dict(state["loss"])
            self.stepper.load_state_dict(state["optimizers"])
            self.replay.load_state_dict(state["replay"])
        except CheckpointError as err:
            raise CheckpointError(f"Cannot resume from {path}: {err}. Remove it or use another --logdir.") from err
        except Exception as err:  # truncated or foreign files surface as many error types
            raise CheckpointError(
                f"Cannot resume from {path}: the checkpoint is corrupt or belongs to another run "
                f"({type(err).__name__}: {err}). Remove it or use another --logdir."
            ) from err
        self.counters.update(state["counters"])
        self.tracker.load_state_dict(state["tracker"])
        _set_rng_state(state["rng"])
        return True

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Trains until ``total_steps`` agent steps; checkpoints on the way and on exit (Ctrl-C included).

        Returns: the final counters, with ``last_eval`` when an evaluation ran.
        """
        cfg, counters = self.config, self.counters
        collector = self._make_collector()
        pbar = self._progress_bar()
        last_eval: dict[str, float] | None = None
        previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        start, steps_at_log, interrupted = time.perf_counter(), counters["steps"], False
        try:
            for batch in collector:
                if counters["steps"] >= cfg.total_steps:
                    break
                self.replay.extend(batch)
                counters["steps"] += batch.numel()
                for episode_return, length in self.tracker.update(batch):
                    counters["episodes"] += 1
                    self.last_return = episode_return
                    self.logger.log_scalars({"train_return": episode_return, "train_length": length}, self.frames)
                for _ in range(self._updates_due()):
                    self.update()
                if counters["steps"] >= counters["next_log"]:
                    self._log_train(time.perf_counter() - start, counters["steps"] - steps_at_log)
                    start, steps_at_log = time.perf_counter(), counters["steps"]
                    counters["next_log"] += cfg.log_every
                if counters["steps"] >= counters["next_eval"]:
                    last_eval = self.evaluate()
                    counters["next_eval"] += cfg.eval_every
                if counters["steps"] >= counters["next_video"]:
                    self.record_video()
                    counters["next_video"] += cfg.video_every
                if counters["steps"] >= counters["next_checkpoint"]:
                    self.save_checkpoint()
                    counters["next_checkpoint"] += cfg.checkpoint_every
                if pbar is not None:
                    pbar.update(batch.numel() * cfg.action_repeat)
                    pbar.set_postfix(updates=counters["updates"], last_return=f"{self.last_return:.1f}")
                if counters["steps"] >= cfg.total_steps:
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            collector.shutdown()
            self.save_checkpoint()
            if pbar is not None:
                pbar.close()
        if interrupted:
            print(f"Interrupted: checkpoint saved in {self.logdir}; run the same command to resume.")
        result = {"steps": counters["steps"], "frames": self.frames, "updates": counters["updates"],
                  "episodes": counters["episodes"], "interrupted": interrupted}
        if last_eval is not None:
            result["last_eval"] = last_eval
        return result

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        total = self.config.total_steps * self.config.action_repeat
        return tqdm(total=total, initial=min(self.frames, total), unit="frame", unit_scale=True, dynamic_ncols=True,
                    desc=f"DreamerV2 {self.config.env}", smoothing=0.05)


def _with_primer(env: EnvBase, primer) -> TransformedEnv:
    """Appends the policy's recurrent-state primer to an env (flat transform stack)."""
    if isinstance(env, TransformedEnv):
        env.append_transform(primer)
        return env
    return TransformedEnv(env, primer)


def _raise_keyboard_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: checkpoint, then exit
    raise KeyboardInterrupt


def frames_to_steps(frames: float, action_repeat: int) -> int:
    """Agent steps for a frame budget."""
    return int(math.ceil(frames / action_repeat))
