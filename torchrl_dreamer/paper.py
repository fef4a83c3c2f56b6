"""Reference scores of DreamerV2 on Atari, from the paper's published per-seed learning curves.

The table ships with the package (``torchrl_dreamer/data/paper_atari_dreamerv2.csv``, built by
``scripts/make_paper_table.py``): for each of the 55 Atari games and each 1M-frame bin from 1M to 200M, the mean,
standard deviation (``ddof=0``), min and max of the evaluation return across the paper's seeds (8 per game; runs
that stopped early make later bins hold fewer), plus the game's random and human-gamer scores.

Game names are matched loosely: ``"Pong"``, ``"pong"``, ``"atari:Pong"``, ``"atari_pong"`` and ``"ALE/Pong-v5"``
all name the same game, as do ``"MsPacman"`` and ``"ms_pacman"``.

Reference:
    Hafner, Lillicrap, Norouzi, Ba. "Mastering Atari with Discrete World Models", ICLR 2021.

Example:
    >>> from torchrl_dreamer.paper import paper_reference, human_normalised
    >>> round(paper_reference("atari:Pong", 2e6)["mean"])
    -9
    >>> round(human_normalised("Pong", 14.6), 3)
    1.0
"""
from __future__ import annotations

import csv
import re
from functools import lru_cache
from importlib.resources import files

import numpy as np

__all__ = ["available_games", "baselines", "canonical_game", "human_normalised", "paper_curve", "paper_reference"]

_TABLE = "paper_atari_dreamerv2.csv"
_STATS = ("mean", "std", "min", "max")
_BASELINES = ("random", "human_gamer", "simple_4e5", "rainbow_4e5")
_BIN_FRAMES = 1_000_000


def _key(name: str) -> str:
    """Canonical lookup key: no suite prefix or version suffix, lower case, no separators (``mspacman``)."""
    name = re.sub(r"^(atari[:_]|ALE/)", "", name.strip(), flags=re.IGNORECASE)
    name = re.sub(r"(NoFrameskip)?-v\d+$", "", name)
    return re.sub(r"[^a-z0-9]", "", name.lower())


@lru_cache(maxsize=1)
def _load() -> dict[str, dict]:
    """Parse the packaged table once into ``{key: {"game", "task", "random", "human_gamer", columns...}}``."""
    text = (files("torchrl_dreamer") / "data" / _TABLE).read_text()
    rows: dict[str, list[dict[str, str]]] = {}
    for row in csv.DictReader(text.splitlines()):
        rows.setdefault(row["game"], []).append(row)
    table = {}
    for game, game_rows in rows.items():
        game_rows.sort(key=lambda row: int(row["mframes"]))
        entry = {
            "game": game, "task": game_rows[0]["task"],
            "random": float(game_rows[0]["random"]), "human_gamer": float(game_rows[0]["human_gamer"]),
            **{name: float(game_rows[0][name]) if game_rows[0].get(name) else float("nan") for name in _BASELINES[2:]},
            "frames": np.array([int(row["mframes"]) * _BIN_FRAMES for row in game_rows], dtype=np.int64),
            "nseeds": np.array([int(row["nseeds"]) for row in game_rows], dtype=np.int64),
        }
        for stat in _STATS:
            entry[stat] = np.array([float(row[stat]) for row in game_rows])
        table[_key(game)] = entry
    return table


def available_games() -> list[str]:
    """ALE names of the games in the table, sorted (``["Alien", ..., "Zaxxon"]``)."""
    return sorted(entry["game"] for entry in _load().values())


def canonical_game(game: str) -> str:
    """The ALE name of a game under any accepted spelling.

    Args:
        game: Game name (``"ms_pacman"``, ``"atari:MsPacman"``, ``"atari_ms_pacman"``...).

    Returns:
        The name used in the table and by ``atari:<Name>`` (``"MsPacman"``).

    Raises:
        KeyError: If the game is not in the table (the message lists the available games).

    Example:
        >>> canonical_game("atari_ms_pacman")
        'MsPacman'
    """
    return _entry(game)["game"]


def _entry(game: str) -> dict:
    """The table entry of ``game`` under any accepted spelling; ``KeyError`` listing the games otherwise."""
    entry = _load().get(_key(game))
    if entry is None:
        raise KeyError(f"no DreamerV2 paper scores for game {game!r}; available games: "
                       f"{', '.join(available_games())}")
    return entry


def paper_curve(game: str) -> dict[str, np.ndarray]:
    """The paper's learning curve of one game, across seeds.

    Args:
        game: Game name (``"Pong"``, ``"pong"``, ``"atari:Pong"``, ``"atari_pong"``).

    Returns:
        Dict of 1-D arrays of equal length ``[num_bins]`` (one per 1M-frame bin, increasing): ``frames`` (int64,
        environment frames), ``mean``, ``std``, ``min``, ``max`` (float64, evaluation return across seeds) and
        ``nseeds`` (int64). The arrays are copies and may be modified.

    Raises:
        KeyError: If the game is not in the table (the message lists the available games).

    Example:
        >>> curve = paper_curve("Pong")
        >>> int(curve["frames"][0]), int(curve["nseeds"][0])
        (1000000, 8)
    """
    entry = _entry(game)
    return {key: entry[key].copy() for key in ("frames", *_STATS, "nseeds")}


def paper_reference(game: str, frames: float) -> dict[str, float]:
    """The paper's score of one game after a budget of environment frames.

    The budget is rounded to the nearest 1M-frame bin (``1.4e6 -> 1M``, ``1.5e6 -> 2M``) and that bin is returned.
    Budgets below 1M frames are refused: the paper has no evaluation before its first bin.

    Args:
        game: Game name (``"Pong"``, ``"pong"``, ``"atari:Pong"``, ``"atari_pong"``).
        frames: Budget in environment frames (with DreamerV2's action repeat of 4, frames = 4 x agent steps).

    Returns:
        Dict with ``mean``, ``std``, ``min``, ``max`` (floats, evaluation return across seeds), ``nseeds`` (int)
        and ``frames`` (int, the bin actually used).

    Raises:
        KeyError: If the game is not in the table.
        ValueError: If the budget is below 1M frames or rounds to a bin beyond the table's last one.

    Example:
        >>> ref = paper_reference("boxing", 1e6)
        >>> round(ref["mean"]), ref["frames"]
        (38, 1000000)
    """
    entry = _entry(game)
    target = int(np.floor(float(frames) / _BIN_FRAMES + 0.5)) * _BIN_FRAMES
    index = np.searchsorted(entry["frames"], target)
    if frames < _BIN_FRAMES:
        raise ValueError(f"{entry['game']}: a budget of {frames:.0f} frames is below the paper's first bin "
                         f"({_BIN_FRAMES} frames)")
    if index == len(entry["frames"]) or entry["frames"][index] != target:
        raise ValueError(f"{entry['game']}: {frames:.0f} frames rounds to the {target} bin, not in the paper "
                         f"table ({entry['frames'][0]} to {entry['frames'][-1]} frames in 1M bins)")
    return {
        **{stat: float(entry[stat][index]) for stat in _STATS},
        "nseeds": int(entry["nseeds"][index]), "frames": int(target),
    }


def baselines(game: str) -> dict[str, float]:
    """Per-game reference scores: ``random`` and ``human_gamer`` (the paper's), and the Atari 100k (400k frames)
    scores of SimPLe (``simple_4e5``) and Rainbow (``rainbow_4e5``), ``nan`` where none was published (those two ran
    without sticky actions).

    Example:
        >>> baselines("Boxing")
        {'random': 0.1, 'human_gamer': 12.1, 'simple_4e5': 9.1, 'rainbow_4e5': 0.2}
    """
    entry = _entry(game)
    return {name: entry[name] for name in _BASELINES}


def human_normalised(game: str, score: float | np.ndarray) -> float | np.ndarray:
    """Human-normalised score, ``(score - random) / (human_gamer - random)``.

    0 is the random policy, 1 the human gamer (the baselines used in the DreamerV2 paper).

    Args:
        game: Game name (``"Pong"``, ``"pong"``, ``"atari:Pong"``, ``"atari_pong"``).
        score: Raw episode return(s); a scalar or an array.

    Returns:
        The normalised score, a float for a scalar input, an array of the same shape otherwise.

    Raises:
        KeyError: If the game is not in the table.

    Example:
        >>> human_normalised("Pong", -20.7)
        0.0
    """
    entry = _entry(game)
    normalised = (np.asarray(score, dtype=np.float64) - entry["random"]) / (entry["human_gamer"] - entry["random"])
    return float(normalised) if normalised.ndim == 0 else normalised
