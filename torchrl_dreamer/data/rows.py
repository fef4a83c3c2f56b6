"""DreamerV2 replay rows: one row per observation, including every episode's final observation.

Collector batches hold transitions ``(o_t, a_t, r_{t+1}, o_{t+1})``. The replay stores one row per *observation*
(pixels once) and keeps the final observation of every episode::

    transition t of one env      ->  row: o_t  a_t  is_init_t | next: r_{t+1} term_{t+1} trunc_{t+1} done_{t+1}
    ... and if done_{t+1}        ->  row: o_{t+1}  0  False   | next: 0        False      False       False

so an episode of ``N`` transitions has ``N + 1`` rows. Keys other than these are dropped, so random-policy and
policy batches share one schema.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase

__all__ = ["NEXT_KEYS", "next_key", "step_rows", "transitions_to_rows"]

NEXT_KEYS = ("reward", "terminated", "truncated", "done")


def next_key(key: NestedKey) -> tuple[str, ...]:
    """The ``("next", ...)`` counterpart of a root key."""
    return ("next", *key) if isinstance(key, tuple) else ("next", key)


def step_rows(
    steps: TensorDictBase, starts: torch.Tensor, obs_keys: Sequence[NestedKey]
) -> tuple[TensorDictBase, torch.Tensor]:
    """Rows of ``[T]`` transitions with ``is_init = starts``, and the row of every transition."""
    num_steps = steps.shape[0]
    done = steps.get(("next", "done")).reshape(num_steps).bool()
    # Row of transition t = t + number of final rows inserted before it; a final row follows its done transition.
    row_of_step = torch.arange(num_steps) + done.long().cumsum(0) - done.long()
    rows = TensorDict({}, batch_size=[num_steps])
    for key in obs_keys:
        rows.set(key, steps.get(key))
    rows.set("action", steps.get("action").float())  # random policies may emit integer one-hots
    rows.set("is_init", starts.reshape(num_steps, 1))
    rows.set(("next", "reward"), steps.get(("next", "reward")).reshape(num_steps, 1).float())
    for flag in NEXT_KEYS[1:]:
        rows.set(("next", flag), steps.get(("next", flag)).reshape(num_steps, 1).bool())
    if done.any():
        transition_rows, rows = rows, rows.new_zeros(num_steps + int(done.sum()))
        rows[row_of_step] = transition_rows
        for key in obs_keys:
            rows.get(key)[row_of_step[done] + 1] = steps.get(next_key(key))[done]
    return rows, row_of_step


def transitions_to_rows(
    steps: TensorDictBase,
    *,
    obs_keys: Sequence[NestedKey] = ("pixels",),
    continues_episode: bool = False,
) -> tuple[TensorDictBase, torch.Tensor]:
    """Turns the transitions of one environment into observation rows, adding a final row after each episode end.

    ``is_init`` is set on the first row of every episode: where the batch says so, after a ``("next", "done")``
    and on the first row unless ``continues_episode``.

    Args:
        steps (TensorDictBase): transitions of one env, shape ``[T]``, with the obs keys at root and in ``"next"``,
            ``"action"``, ``"is_init"`` and ``("next", "reward" | "terminated" | "truncated" | "done")``.
        obs_keys (sequence of NestedKey, optional): observation keys. Defaults to ``("pixels",)``.
        continues_episode (bool, optional): whether the first transition continues an episode of an earlier
            batch. Defaults to ``False``.

    Returns:
        rows (TensorDictBase): shape ``[T + D]`` with ``D`` the number of episode ends.
        episode_starts (torch.Tensor): int64 row offsets where an episode begins.

    Examples:
        >>> done = torch.tensor([False, True, False]).unsqueeze(-1)
        >>> steps = TensorDict({"observation": torch.arange(3.).unsqueeze(-1), "action": torch.ones(3, 2),
        ...     "is_init": torch.tensor([True, False, True]).unsqueeze(-1),
        ...     "next": {"observation": torch.arange(1., 4.).unsqueeze(-1), "reward": torch.ones(3, 1),
        ...              "terminated": done, "truncated": torch.zeros_like(done), "done": done}}, [3])
        >>> rows, starts = transitions_to_rows(steps, obs_keys=("observation",))
        >>> rows["observation"].squeeze(-1).tolist(), starts.tolist()  # the final observation 2. gets its own row
        ([0.0, 1.0, 2.0, 2.0], [0, 3])
    """
    num_steps = steps.shape[0]
    done = steps.get(("next", "done")).reshape(num_steps).bool()
    starts = steps.get("is_init").reshape(num_steps).bool().clone()
    starts[1:] |= done[:-1]
    starts[0] |= not continues_episode
    rows, row_of_step = step_rows(steps, starts, obs_keys)
    return rows, row_of_step[starts]
