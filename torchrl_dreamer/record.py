"""Run records: loggers, episode statistics and the open-loop prediction video."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.record.loggers import CSVLogger, Logger, TensorboardLogger

__all__ = [
    "MultiLogger", "make_logger", "truncate_scalars", "last_logged_step", "read_scalar", "EpisodeTracker",
    "open_loop_video", "write_gif",
]


class MultiLogger:
    """Forwards scalars, videos and hyperparameters to several TorchRL loggers (CSV always, TensorBoard when installed).

    CSV files land in ``<logdir>/scalars/<name>.csv`` as ``step,value`` lines; the CSV logger stores videos as
    ``<logdir>/videos/<name>_<step>.pt`` tensors.
    """

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = list(loggers)
        self._warned_video = False

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_scalar(name, float(value), step=step)

    def log_video(self, name: str, video: torch.Tensor, step: int | None = None, **kwargs) -> None:
        for logger in list(self.loggers):
            if isinstance(logger, TensorboardLogger) and importlib.util.find_spec("moviepy") is None:
                if not self._warned_video:
                    warnings.warn("TensorBoard videos need moviepy (pip install moviepy); the open-loop videos are "
                                  "written as GIFs and CSV-logger tensors only.", stacklevel=2)
                    self._warned_video = True
                continue
            try:
                logger.log_video(name, video, step=step, **kwargs)
            except BaseException:  # e.g. a full disk: no partial video file is left
                for partial in _video_files(logger, name, step):
                    partial.unlink(missing_ok=True)
                raise

    def log_hparams(self, cfg: dict) -> None:
        for logger in self.loggers:
            logger.log_hparams(cfg)


def _video_files(logger: Logger, name: str, step: int | None) -> list[Path]:
    """The files a CSV logger writes for one video (``<log_dir>/videos/<name>_<step>.pt``)."""
    log_dir = getattr(logger, "log_dir", None)
    if log_dir is None:
        return []
    return list(Path(log_dir).glob(f"**/videos/{name}_{step}.pt"))


def truncate_scalars(logdir: str | Path, step: int) -> int:
    r"""Drops the rows logged after ``step`` from ``<logdir>/scalars/*.csv`` (a resumed run repeats those steps).

    Each file is rewritten atomically, and only if it has such rows. Returns the number of rows dropped.

    Examples:
        >>> import tempfile
        >>> logdir = Path(tempfile.mkdtemp())
        >>> (logdir / "scalars").mkdir()
        >>> _ = (logdir / "scalars" / "loss.csv").write_text("100,1.0\n200,0.5\n300,0.2\n")
        >>> truncate_scalars(logdir, 200), (logdir / "scalars" / "loss.csv").read_text()
        (1, '100,1.0\n200,0.5\n')
    """
    dropped = 0
    for path in sorted(Path(logdir, "scalars").glob("*.csv")):
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or _csv_step(line) <= step]
        if len(kept) < len(lines):
            dropped += len(lines) - len(kept)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
    return dropped


def read_scalar(logdir: str | Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one metric of a ``CSVLogger`` run, de-duplicated and sorted by step.

    Args:
        logdir: Run directory containing ``scalars/<metric>.csv``.
        metric: Metric name (may contain ``/`` for nested names).

    Returns:
        ``(steps, values)``, float arrays of shape ``[num_points]``; for a step logged more than once (a resumed
        run) only its last value is kept.

    Raises:
        FileNotFoundError: If the metric file is missing (the message lists the metrics the run has).
        ValueError: If the file is empty or a line is not ``step,value``.
    """
    logdir = Path(logdir)
    path = logdir / "scalars" / f"{metric}.csv"
    if not path.is_file():
        scalars = logdir / "scalars"
        found = sorted(str(p.relative_to(scalars).with_suffix("")) for p in scalars.rglob("*.csv")) \
            if scalars.is_dir() else []
        raise FileNotFoundError(f"{logdir}: no metric {metric!r} (expected {path}); "
                                f"metrics found: {', '.join(found) if found else 'none'}")
    last_value: dict[float, float] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            step, value = (float(field) for field in line.split(","))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'step,value', got {line!r}") from None
        last_value[step] = value  # a later line for the same step overrides the earlier one
    if not last_value:
        raise ValueError(f"{path} has no data")
    steps = np.array(sorted(last_value))
    return steps, np.array([last_value[step] for step in steps])


def last_logged_step(logdir: str | Path) -> int:
    r"""The largest step (x value, frames) in ``<logdir>/scalars/*.csv``: how far a run got; 0 for none.

    Examples:
        >>> import tempfile
        >>> logdir = Path(tempfile.mkdtemp())
        >>> (logdir / "scalars").mkdir()
        >>> _ = (logdir / "scalars" / "loss.csv").write_text("100,1.0\n300,0.2\n")
        >>> _ = (logdir / "scalars" / "fps.csv").write_text("200,9.0\n25")  # a row cut by a kill
        >>> last_logged_step(logdir)
        300
    """
    steps = [_csv_step(line) for path in Path(logdir, "scalars").glob("*.csv") for line in path.read_text().split()]
    return int(max([0.0, *steps]))


def _csv_step(line: str) -> float:
    try:
        return float(line.split(",", 1)[0])
    except ValueError:
        return float("-inf")  # not a data row: keep it


def make_logger(logdir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None) -> MultiLogger:
    """CSV logger in ``logdir`` plus a TensorBoard one in ``logdir/tb`` if tensorboard is installed.

    With ``resume_step`` (the frames of the checkpoint a run resumes from; ``0`` for a run that starts again without
    one), the rows logged after it are dropped from the CSV files (:func:`truncate_scalars`) and TensorBoard purges
    its later events (``purge_step``), so a killed and resumed run has no duplicate steps and no backward jumps.
    """
    if resume_step is not None:
        truncate_scalars(logdir, resume_step)
    loggers: list[Logger] = [CSVLogger(exp_name="", log_dir=str(logdir))]
    if tensorboard:
        if importlib.util.find_spec("tensorboard") is None:
            warnings.warn(
                f"tensorboard is not installed: scalars are logged as CSV files in {Path(logdir) / 'scalars'} only "
                "(pip install tensorboard for TensorBoard logs).",
                stacklevel=2,
            )
        else:
            loggers.append(ResumableTensorboardLogger(exp_name="tb", log_dir=str(logdir), purge_step=resume_step))
    return MultiLogger(loggers)


class ResumableTensorboardLogger(TensorboardLogger):
    """TorchRL's TensorBoard logger, purging the events after ``purge_step`` of a resumed run."""

    def __init__(self, exp_name: str, log_dir: str, purge_step: int | None = None) -> None:
        self._purge_step = purge_step
        super().__init__(exp_name=exp_name, log_dir=log_dir)

    def _create_experiment(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(Path(self.log_dir) / self.exp_name), purge_step=self._purge_step)


class EpisodeTracker:
    """Accumulates per-env episode returns and lengths across collector batches.

    Args:
        num_envs (int): parallel environments (the leading dim of batches).

    Examples:
        >>> from tensordict import TensorDict
        >>> tracker = EpisodeTracker(1)
        >>> batch = TensorDict({("next", "reward"): torch.ones(1, 4, 1),
        ...                     ("next", "done"): torch.tensor([[[False], [True], [False], [False]]])}, [1, 4])
        >>> tracker.update(batch)
        [(2.0, 2)]
    """

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def update(self, batch: TensorDictBase) -> list[tuple[float, int]]:
        """Adds a ``[num_envs, T]`` (or ``[T]``) batch; returns the ``(return, length)`` of finished episodes."""
        reward = batch.get(("next", "reward")).reshape(len(self.returns), -1).double().cpu().numpy()
        done = batch.get(("next", "done")).reshape(len(self.returns), -1).cpu().numpy()
        finished = []
        for t in range(reward.shape[1]):
            self.returns += reward[:, t]
            self.lengths += 1
            for env in np.flatnonzero(done[:, t]):
                finished.append((float(self.returns[env]), int(self.lengths[env])))
                self.returns[env], self.lengths[env] = 0.0, 0
        return finished

    def state_dict(self) -> dict:
        return {"returns": self.returns.copy(), "lengths": self.lengths.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.returns, self.lengths = state["returns"].copy(), state["lengths"].copy()


@torch.no_grad()
def open_loop_video(world_model, batch: TensorDictBase, *, context: int = 5, num_videos: int = 6) -> torch.Tensor:
    """DreamerV2's "openl" video: ``context`` observed frames, then open-loop predictions.

    The model filters the first ``context`` observations, then rolls the prior
    forward from the last posterior with the recorded actions and decodes. The
    frames are those of the world model's first image entry (``cnn_keys[0]``).

    Args:
        world_model: a :class:`~torchrl_dreamer.modules.WorldModelV2` with at least one image entry.
        batch (TensorDictBase): ``[B, T]`` replay sequences (``B >= 1``).

    Keyword Args:
        context (int): observed frames. Default: ``5``.
        num_videos (int): sequences shown side by side. Default: ``6``.

    Returns: ``uint8 [T, C, 3 * H, n * W]``: rows truth / model / ``(model - truth + 1) / 2``. Images with other
    than 1 or 3 channels (e.g. MinAtar's object planes) come back as ``[T, 1, 3 * H, C * n * W]``: one grayscale
    panel per channel, side by side, which video loggers and GIFs can show.
    """
    if not world_model.cnn_keys:
        raise ValueError(
            f"open_loop_video needs an image entry, but the world model only models vectors {world_model.mlp_keys}."
        )
    batch = batch[:num_videos]
    key = world_model.cnn_keys[0]
    pixels = batch.get(key)
    if pixels.ndim != 5:
        raise ValueError(f"open_loop_video needs images [B, T, C, H, W] under {key!r}, got {tuple(pixels.shape)}.")
    steps = pixels.shape[1]
    context = min(context, steps)
    observed = batch[:, :context].clone()
    world_model(observed)
    rssm = world_model.rssm
    filter_module = world_model.module[1]  # the RSSM filter: its keys follow set_keys renames
    state_key, belief_key = filter_module.out_keys[:2]
    state, belief = observed.get(state_key)[:, -1], observed.get(belief_key)[:, -1]
    states, beliefs = [observed.get(state_key)], [observed.get(belief_key)]
    actions = batch.get(filter_module.in_keys[1]).float()
    for t in range(context, steps):
        belief = rssm.deter_step(state, actions[:, t - 1], belief)
        state = rssm.sample(rssm.prior_logits(belief), straight_through=False)
        states.append(state[:, None])
        beliefs.append(belief[:, None])
    model = (world_model.decode(torch.cat(states, 1), torch.cat(beliefs, 1))[key] + 0.5).clamp(0, 1)
    # in [0, 1]: uint8 frames as x / 255, floating frames (in [0, 1]) as they are
    truth = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float().clamp(0, 1)
    error = (model - truth + 1) / 2
    video = torch.cat([truth, model, error], -2)  # [B, T, C, 3H, W]
    video = video.permute(1, 2, 3, 0, 4).flatten(-2)  # [T, C, 3H, B*W]
    if video.shape[1] not in (1, 3):
        video = video.transpose(1, 2).flatten(-2).unsqueeze(1)  # [T, 1, 3H, C*B*W]
    return (video * 255).round().to(torch.uint8).cpu()


def write_gif(video: torch.Tensor, path: str | Path, *, fps: int = 10, scale: int = 2) -> Path:
    """Writes a ``uint8 [T, C, H, W]`` video (C = 1 or 3) as an animated GIF a person can open."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = video.permute(0, 2, 3, 1).numpy()
    if frames.shape[-1] == 1:
        frames = frames[..., 0]
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    tmp = path.with_name(path.name + ".tmp")
    try:  # written whole or not at all (a full disk leaves no partial GIF)
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
