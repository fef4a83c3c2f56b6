"""Tests of the packaged DreamerV2 paper scores (torchrl_dreamer.paper) and the learning-curve plot script."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from torchrl_dreamer.paper import (
    available_games,
    canonical_game,
    human_normalised,
    paper_curve,
    paper_reference,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PLOT_SCRIPT = REPO_ROOT / "examples" / "plot.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- paper table


@pytest.mark.parametrize(
    "game, frames, expected",
    [("Pong", 1e6, -18), ("Pong", 2e6, -9), ("Boxing", 1e6, 38), ("Boxing", 2e6, 85),
     ("Freeway", 1e6, 12), ("Freeway", 2e6, 31)],
)
def test_reference_matches_paper_means(game, frames, expected):
    ref = paper_reference(game, frames)
    assert ref["mean"] == pytest.approx(expected, abs=1)
    assert ref["nseeds"] == 8
    assert ref["frames"] == int(frames)
    assert ref["min"] <= ref["mean"] <= ref["max"]
    assert ref["std"] > 0


def test_reference_rounds_to_nearest_bin():
    assert paper_reference("Pong", 1_000_000)["frames"] == 1_000_000
    assert paper_reference("Pong", 1_499_999)["frames"] == 1_000_000
    assert paper_reference("Pong", 1_500_000)["frames"] == 2_000_000
    assert paper_reference("Pong", 2_400_000) == paper_reference("Pong", 2e6)


@pytest.mark.parametrize("alias", ["Pong", "pong", "atari:Pong", "atari_pong", "ALE/Pong-v5", " PONG "])
def test_aliases_of_pong(alias):
    assert canonical_game(alias) == "Pong"
    assert paper_reference(alias, 2e6) == paper_reference("Pong", 2e6)


@pytest.mark.parametrize(
    "alias, name",
    [("ms_pacman", "MsPacman"), ("atari:MsPacman", "MsPacman"), ("atari_private_eye", "PrivateEye"),
     ("james_bond", "Jamesbond"), ("atari_up_n_down", "UpNDown"), ("montezuma_revenge", "MontezumaRevenge")],
)
def test_snake_case_and_ale_names(alias, name):
    assert canonical_game(alias) == name
    np.testing.assert_array_equal(paper_curve(alias)["mean"], paper_curve(name)["mean"])


def test_unknown_game_lists_available_games():
    with pytest.raises(KeyError, match="available games: .*Pong"):
        paper_reference("Pongg", 1e6)
    with pytest.raises(KeyError, match="Pongg"):
        paper_curve("Pongg")
    with pytest.raises(KeyError):
        human_normalised("dmc:walker-walk", 0.0)


@pytest.mark.parametrize("frames", [0, 500_000, 999_999, -1])
def test_budget_below_first_bin_is_refused(frames):
    with pytest.raises(ValueError, match="below"):
        paper_reference("Pong", frames)


def test_budget_beyond_last_bin_is_refused():
    assert paper_reference("Pong", 200e6)["frames"] == 200_000_000
    with pytest.raises(ValueError, match="not in the paper table"):
        paper_reference("Pong", 201e6)


def test_curves_are_well_formed():
    games = available_games()
    assert len(games) == 55 and {"Pong", "Boxing", "Freeway", "MsPacman"} <= set(games)
    for game in games:
        curve = paper_curve(game)
        assert set(curve) == {"frames", "mean", "std", "min", "max", "nseeds"}
        assert len({len(column) for column in curve.values()}) == 1
        assert curve["frames"].dtype == np.int64 and curve["nseeds"].dtype == np.int64
        assert curve["frames"][0] == 1_000_000 and np.all(np.diff(curve["frames"]) == 1_000_000)
        assert np.all(curve["min"] <= curve["mean"] + 1e-2) and np.all(curve["mean"] <= curve["max"] + 1e-2)
        assert np.all(curve["std"] >= 0) and np.all((curve["nseeds"] >= 1) & (curve["nseeds"] <= 8))
    assert len(paper_curve("Pong")["frames"]) == 200


def test_curve_is_a_copy():
    paper_curve("Pong")["mean"][:] = 0
    assert paper_reference("Pong", 1e6)["mean"] == pytest.approx(-18.27, abs=0.01)


def test_human_normalised():
    # Pong baselines: random -20.7, human gamer 14.6.
    assert human_normalised("Pong", -20.7) == pytest.approx(0.0)
    assert human_normalised("atari:Pong", 14.6) == pytest.approx(1.0)
    assert isinstance(human_normalised("pong", 0.0), float)
    np.testing.assert_allclose(human_normalised("Pong", np.array([-20.7, -3.05, 14.6])), [0.0, 0.5, 1.0])


def test_table_ships_in_the_package():
    table = files("torchrl_dreamer") / "data" / "paper_atari_dreamerv2.csv"
    header = table.read_text().splitlines()[0]
    assert header == "game,task,mframes,mean,std,min,max,nseeds,random,human_gamer,simple_4e5,rainbow_4e5"


# ---------------------------------------------------------------------------------------------- plot script


def _write_run(logdir: Path, points: list[tuple[float, float]], env: str | None = "atari:Pong") -> Path:
    (logdir / "scalars").mkdir(parents=True)
    (logdir / "scalars" / "eval_return.csv").write_text("".join(f"{step},{value}\n" for step, value in points))
    if env is not None:
        (logdir / "config.json").write_text(json.dumps({"env": env}))
    return logdir


@pytest.fixture
def two_runs(tmp_path):
    steps = np.arange(0, 3_000_001, 250_000)
    first = [(int(step), -21 + 35 * step / 3e6) for step in steps]
    # A resumed run: the 1.5M evaluation is logged again after a restart, the second value must win.
    resumed = first[:7] + [(1_500_000, -99.0)] + [(1_500_000, -5.0)] + first[7:]
    second = [(int(step), -20 + 30 * (step / 3e6) ** 2) for step in steps[::-1]]  # unsorted on disk
    return [_write_run(tmp_path / "seed0", resumed), _write_run(tmp_path / "seed1", second, env=None)]


def _run_plot(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(PLOT_SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def _load_plot_module():
    spec = importlib.util.spec_from_file_location("plot_example", PLOT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_read_scalar_keeps_last_duplicate_and_sorts(two_runs):
    read_scalar = _load_plot_module().read_scalar
    steps, values = read_scalar(two_runs[0], "eval_return")
    assert np.all(np.diff(steps) > 0) and len(steps) == 13
    assert values[steps == 1_500_000].tolist() == [-5.0]
    steps, values = read_scalar(two_runs[1], "eval_return")
    assert np.all(np.diff(steps) > 0) and values[0] == pytest.approx(-20)


@pytest.mark.parametrize("extra", [[], ["--game", "atari_pong"], ["--no-paper"]])
def test_plot_writes_png(two_runs, tmp_path, extra):
    out = tmp_path / "plots" / "curves.png"
    result = _run_plot(*two_runs, "--out", out, "--metric", "eval_return", *extra)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_plot_paper_band_changes_the_image(two_runs, tmp_path):
    with_band, without_band = tmp_path / "band.png", tmp_path / "plain.png"
    assert _run_plot(*two_runs, "--out", with_band).returncode == 0
    assert _run_plot(*two_runs, "--out", without_band, "--no-paper").returncode == 0
    assert with_band.read_bytes() != without_band.read_bytes()


def test_plot_missing_metric_is_a_clear_error(two_runs, tmp_path):
    result = _run_plot(*two_runs, "--metric", "train_return", "--out", tmp_path / "x.png")
    assert result.returncode != 0
    assert "train_return" in result.stderr and "seed0" in result.stderr and "eval_return" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_unknown_game_is_a_clear_error(two_runs, tmp_path):
    result = _run_plot(*two_runs, "--game", "Pongg", "--out", tmp_path / "x.png")
    assert result.returncode != 0 and "available games" in result.stderr


def test_atari_100k_baselines_ship_with_the_table():
    """SimPLe's and Rainbow's scores at 400k frames (Atari 100k), where published; nan elsewhere."""
    import math

    from torchrl_dreamer.paper import baselines

    assert baselines("Krull") == {"random": 1598.0, "human_gamer": 2665.5, "simple_4e5": 4539.9, "rainbow_4e5": 2851.5}
    assert math.isnan(baselines("Zaxxon")["simple_4e5"])  # not one of the 26 Atari 100k games


def test_plot_openl_draws_the_latest_open_loop_video(tmp_path):
    """``--openl``: the run's latest ``videos/openl_<frames>.gif`` (as the video hook writes it) as a picture of one
    sequence, truth above the model; a sequence that is not there and a run without videos are one-line errors."""
    import torch

    from torchrl_dreamer.record import write_gif

    run = tmp_path / "run"
    generator = torch.Generator().manual_seed(0)
    for frames in (400, 2000):  # the later video is drawn
        video = torch.randint(0, 256, (12, 1, 3 * 16, 2 * 16), dtype=torch.uint8, generator=generator)  # 2 sequences
        write_gif(video, run / "videos" / f"openl_{frames}.gif")
    result = _run_plot(run, "--openl", "--sequence", "1", "--out", tmp_path / "openl.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "openl.png").read_bytes()[:8] == PNG_SIGNATURE
    plot = importlib.util.spec_from_file_location("plot_script", PLOT_SCRIPT)
    module = importlib.util.module_from_spec(plot)
    plot.loader.exec_module(module)
    assert module.latest_openl(run).name == "openl_2000.gif"
    result = _run_plot(run, "--openl", "--sequence", "2", "--out", tmp_path / "bad.png")
    assert result.returncode == 2 and "holds 2 sequences" in result.stderr and "Traceback" not in result.stderr
    result = _run_plot(tmp_path / "empty", "--openl", "--out", tmp_path / "bad.png")
    assert result.returncode == 2 and "no open-loop video" in result.stderr
