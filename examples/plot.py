"""Plot learning curves of one or more runs, over the DreamerV2 paper's curve for the same game.

Each run directory is a TorchRL ``CSVLogger`` experiment: ``<logdir>/scalars/<metric>.csv`` holds one ``step,value``
line per logged point (no header), the step being the number of environment frames. A resumed run may log the
same step twice; the last value wins. The game comes from ``--game`` or from the ``env`` field of
``<logdir>/config.json`` (``"atari:Pong"``); the paper's mean is drawn as a dashed line over its min-max spread
across seeds (shaded), up to the frames the runs reached.

Usage::

    python examples/plot.py runs/pong_seed0 runs/pong_seed1 --out curves.png
    python examples/plot.py runs/a --game Boxing --metric eval_return --out boxing.png
    python examples/plot.py runs/a runs/b --no-paper --metric train_return --out train.png
    python examples/plot.py runs/a --openl --out openl.png   # the open-loop prediction: truth above the model

``--openl`` draws one sequence of the run's latest open-loop video (``<logdir>/videos/openl_<frames>.gif``, written
by the training's video hook: the observed frames, then the world model's predictions from the recorded actions
alone) as a picture: the truth above the model's frames, every ``--every`` steps.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

try:
    import matplotlib
except ImportError:  # an optional extra
    sys.exit('error: plotting needs matplotlib: pip install matplotlib (or pip install -e ".[log]")')

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from torchrl_dreamer.paper import canonical_game, paper_curve  # noqa: E402
from torchrl_dreamer.record import read_scalar  # noqa: E402,F401  (also this script's API)

FRAMES_PER_BIN = 1_000_000


def game_of(logdir: Path) -> str | None:
    """The ``env`` field of ``<logdir>/config.json`` (``"atari:Pong"``), or ``None`` if absent."""
    config = logdir / "config.json"
    if not config.is_file():
        return None
    env = json.loads(config.read_text()).get("env")
    return env if isinstance(env, str) else None


def resolve_game(logdirs: list[Path], game: str | None) -> str | None:
    """The game to compare with: ``--game`` if given, else the one game named by the runs' configs, else ``None``."""
    if game is not None:
        return game
    games = {found for found in map(game_of, logdirs) if found is not None}
    if len(games) > 1:
        print(f"runs are on different games ({', '.join(sorted(games))}); pass --game to pick the paper curve",
              file=sys.stderr)
        return None
    return games.pop() if games else None


def plot_paper(ax: plt.Axes, game: str, max_frames: float) -> None:
    """Draw the paper's mean and min-max spread for ``game`` up to the first 1M bin at or after ``max_frames``."""
    curve = paper_curve(game)
    last_bin = max(1, math.ceil(max_frames / FRAMES_PER_BIN - 1e-9)) * FRAMES_PER_BIN
    keep = curve["frames"] <= last_bin
    frames, mean, low, high = (curve[key][keep] for key in ("frames", "mean", "min", "max"))
    seeds = curve["nseeds"][keep].max()
    if len(frames) == 1:  # a run shorter than 1M frames: the paper's first evaluation as a point with a range
        ax.errorbar(frames, mean, yerr=[mean - low, high - mean], fmt="s", color="0.3", capsize=4,
                    label=f"DreamerV2 paper: mean, min-max of {seeds} seeds")
        return
    ax.fill_between(frames, low, high, color="0.6", alpha=0.3, linewidth=0,
                    label=f"DreamerV2 paper: min-max of {seeds} seeds")
    ax.plot(frames, mean, "--", color="0.3", linewidth=1.5, label="DreamerV2 paper: mean")


def plot_curves(logdirs: list[Path], out: Path, *, metric: str = "eval_return", game: str | None = None,
                paper: bool = True) -> Path:
    """Plot ``metric`` against frames for every run, optionally over the paper's curve, and save a PNG.

    Args:
        logdirs: Run directories (``<logdir>/scalars/<metric>.csv``); each becomes a line labelled by its name.
        out: Path of the PNG to write.
        metric: Metric to plot. Default: ``"eval_return"``.
        game: Game of the paper curve (``"Pong"``, ``"atari:Pong"``); ``None`` reads it from the runs' configs.
        paper: Whether to draw the paper's curve. Default: ``True``.

    Returns:
        ``out``.
    """
    curves = {logdir: read_scalar(logdir, metric) for logdir in logdirs}
    names = [logdir.resolve().name for logdir in logdirs]
    if len(set(names)) < len(names):  # e.g. a/seed0 and b/seed0: label by the path as given
        names = [str(logdir) for logdir in logdirs]
    explicit, game = game is not None, resolve_game(logdirs, game)
    if game is not None:
        try:
            game = canonical_game(game)
        except KeyError:
            if paper and explicit:
                raise
            paper = False  # a config naming a game the paper table lacks (another suite): plot the runs only
            if not explicit:
                print(f"no paper curve for {game!r}; plotting the runs only", file=sys.stderr)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if paper and game is not None:
        plot_paper(ax, game, max(steps[-1] for steps, _ in curves.values()))
    for name, (steps, values) in zip(names, curves.values()):
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.8, label=name)

    title = f"{metric} vs frames" if game is None else f"{game}: {metric} vs frames"
    ax.set(title=title, xlabel="frames", ylabel=metric)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 500k, 1M, 1.5M
    ax.grid(True, alpha=0.4)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def latest_openl(logdir: Path) -> Path:
    """The run's open-loop video with the most frames, ``<logdir>/videos/openl_<frames>.gif``."""
    gifs = sorted((logdir / "videos").glob("openl_*.gif"), key=lambda path: int(path.stem.split("_")[1]))
    if not gifs:
        raise FileNotFoundError(f"{logdir} has no open-loop video (videos/openl_<frames>.gif): the run writes one "
                                "every video_every agent steps, for a world model with image observations")
    return gifs[-1]


def plot_openl(gif: Path, out: Path, *, sequence: int = 0, every: int = 3, context: int = 5) -> Path:
    """One sequence of an open-loop video as a picture: the truth above the model, every ``every`` steps.

    Args:
        gif: An ``openl_<frames>.gif`` of :func:`torchrl_dreamer.record.open_loop_video` (rows truth / model /
            error, sequences side by side, square frames).
        out: Path of the PNG to write.
        sequence: Which of the sequences side by side. Default: ``0``.
        every: Steps between the frames shown. Default: ``3``.
        context: Observed frames before the open-loop predictions (the hook's). Default: ``5``.

    Returns:
        ``out``.
    """
    from PIL import Image, ImageSequence

    frames = [np.array(frame.convert("L")) for frame in ImageSequence.Iterator(Image.open(gif))]
    side = frames[0].shape[0] // 3  # three rows of square frames
    sequences = frames[0].shape[1] // side
    if not 0 <= sequence < sequences:
        raise ValueError(f"{gif} holds {sequences} sequences; --sequence must be in [0, {sequences - 1}]")
    steps = sorted(set(range(0, len(frames), every)) | {context - 1, len(frames) - 1})
    columns = slice(sequence * side, (sequence + 1) * side)
    fig, axes = plt.subplots(2, len(steps), figsize=(1.1 * len(steps), 2.6), dpi=120, squeeze=False)
    for col, t in enumerate(steps):
        for row, name in enumerate(("truth", "model")):
            ax = axes[row, col]
            ax.imshow(frames[t][row * side:(row + 1) * side, columns], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
        axes[0, col].set_title(f"t={t}" + (" obs." if t < context else ""), fontsize="small")
    fig.suptitle(f"{gif.parent.parent.name}: {context} observed frames, then open-loop predictions "
                 f"({gif.stem})", fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description="Plot learning curves of CSVLogger runs against the paper.")
    parser.add_argument("logdirs", nargs="+", type=Path, help="run directories (<logdir>/scalars/<metric>.csv)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write (default: curves.png)")
    parser.add_argument("--game", help="game of the paper curve (default: env in <logdir>/config.json)")
    parser.add_argument("--metric", default="eval_return", help="metric to plot (default: eval_return)")
    parser.add_argument("--no-paper", action="store_true", help="do not draw the paper's curve")
    parser.add_argument("--openl", action="store_true",
                        help="draw the first run's latest open-loop prediction (truth above the model) instead")
    parser.add_argument("--sequence", type=int, default=0, help="with --openl: which sequence (default: 0)")
    parser.add_argument("--every", type=int, default=3, help="with --openl: steps between frames (default: 3)")
    args = parser.parse_args(argv)
    try:
        if args.openl:
            out = plot_openl(latest_openl(args.logdirs[0]), args.out, sequence=args.sequence,
                             every=max(1, args.every))
        else:
            out = plot_curves(args.logdirs, args.out, metric=args.metric, game=args.game, paper=not args.no_paper)
    except (FileNotFoundError, ValueError, KeyError) as error:
        parser.exit(2, f"error: {error.args[0] if error.args else error}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
