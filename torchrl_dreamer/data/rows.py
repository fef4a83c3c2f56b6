"""DreamerV2 replay rows: one row per observation, including every episode's final observation.

Collector batches hold transitions ``(o_t, a_t, r_{t+1}, o_{t+1})``. The replay stores one row per *observation*
(pixels once) and keeps the final observation of every episode::

    transition t of one env      ->  row: o_t  a_t  is_init_t | next: r_{t+1} term_{t+1} trunc_{t+1} done_{t+1}
    ... and if done_{t+1}        ->  row: o_{t+1}  0  False   | next: 0        False      False       False

so an episode of ``N`` transitions has ``N + 1`` rows. Keys other than these are dropped, so random-policy and
policy batches share one schema. :func:`transitions_as_sequences` does the same for slices that a stock TorchRL
replay buffer samples (the losses call it on such batches).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase

__all__ = [
    "NEXT_KEYS", "is_transition_batch", "next_key", "step_rows", "transitions_as_sequences", "transitions_to_rows",
]

NEXT_KEYS = ("reward", "terminated", "truncated", "done")


def next_key(key: NestedKey) -> tuple[str, ...]:
    """The ``("next", ...)`` counterpart of a root key."""
    return ("next", *key) if isinstance(key, tuple) else ("next", key)


def step_rows(
    steps: TensorDictBase, starts: torch.Tensor, obs_keys: Sequence[NestedKey], extra_keys: Sequence[NestedKey] = ()
) -> tuple[TensorDictBase, torch.Tensor]:
    """Rows of ``[T]`` transitions with ``is_init = starts``, and the row of every transition (``extra_keys``: per-step
    values kept as ``[1]`` per row, the final observation's row holding its last step's)."""
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
    for key in extra_keys:
        rows.set(key, steps.get(key).reshape(num_steps, 1))
    if done.any():
        transition_rows, rows = rows, rows.new_zeros(num_steps + int(done.sum()))
        rows[row_of_step] = transition_rows
        for key in obs_keys:
            rows.get(key)[row_of_step[done] + 1] = steps.get(next_key(key))[done]
        for key in extra_keys:
            rows.get(key)[row_of_step[done] + 1] = steps.get(key).reshape(num_steps, 1)[done]
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


def is_transition_batch(batch: TensorDictBase, obs_keys: Sequence[NestedKey]) -> bool:
    """Whether ``batch`` holds stock TorchRL transitions (each observation also under ``"next"``) rather than this
    package's observation rows (the replay keeps each observation once, without a ``"next"`` copy)."""
    keys = set(batch.keys(True, True))
    return bool(obs_keys) and all(next_key(key) in keys for key in obs_keys)


def transitions_as_sequences(
    batch: TensorDictBase,
    obs_keys: Sequence[NestedKey],
    *,
    action_key: NestedKey = "action",
    init_key: NestedKey = "is_init",
    reward_key: NestedKey = ("next", "reward"),
    terminated_key: NestedKey = ("next", "terminated"),
) -> TensorDictBase:
    """Stock TorchRL transitions, as a stock ``SliceSampler`` samples them, turned into ``[B, T + 1]`` observation rows.

    A stock :class:`~torchrl.data.TensorDictReplayBuffer` stores what a collector gives: transitions
    ``(o_t, a_t, r_{t+1}, o_{t+1})``, the last observation of a slice only under ``("next", obs)``. DreamerV2's
    world model filters observations and learns the reward and the terminal flag *entering* each one, so each slice
    becomes the rows of its ``T + 1`` observations (the reward and ends of the last transition are learnt at the last
    one)::

        slice     o_0 a_0 | o_1 a_1 | ... | o_{T-1} a_{T-1} -> next: r_T, terminated_T, o_T
        rows      o_0 a_0 | o_1 a_1 | ... | o_{T-1} a_{T-1} | o_T 0       (T + 1 rows)

    * A flat sample (``SliceSampler`` returns ``[B * T]``) is cut at its slice ends (``("next", "truncated")`` or
      ``("next", "done")``, which the sampler sets on each slice's last step): slices of one length give ``[B, T]``.
    * ``SliceSampler`` marks every slice start with ``is_init``, episode start or not: the reward entering a slice's
      first observation is unknown, and is not trained on (``is_init`` cleared on the first row; the world model
      starts every sequence from the zero state anyway).
    * An episode that ends inside a slice (a raw collector batch) would lose its final observation: refused, as are
      slices of different lengths.

    Args:
        batch (TensorDictBase): ``[B, T]`` or flat ``[B * T]`` transitions with the obs keys at root and under
            ``"next"``, ``"action"``, ``"is_init"`` and ``("next", "reward" | "terminated" | "done")``.
        obs_keys (sequence of NestedKey): the observation entries.

    Keyword Args:
        action_key, init_key, reward_key, terminated_key (NestedKey): where the batch holds them (TorchRL's names
            by default); the rows keep these names.

    Returns: ``[B, T + 1]`` rows (``T + 1`` for a single ``[T]`` slice without slice ends inside).

    Raises:
        ValueError: slices of different lengths, or an episode end inside a slice (one line, naming the fix).

    Examples:
        >>> T = 4
        >>> steps = TensorDict({"observation": torch.arange(2.0 * T).reshape(2 * T, 1), "action": torch.ones(2 * T, 2),
        ...     "is_init": torch.arange(2 * T).remainder(T).eq(0).unsqueeze(-1),
        ...     "next": {"observation": torch.arange(1., 2 * T + 1).reshape(2 * T, 1), "reward": torch.ones(2 * T, 1),
        ...              "terminated": torch.zeros(2 * T, 1, dtype=torch.bool),
        ...              "truncated": torch.arange(2 * T).remainder(T).eq(T - 1).unsqueeze(-1),
        ...              "done": torch.arange(2 * T).remainder(T).eq(T - 1).unsqueeze(-1)}}, [2 * T])
        >>> rows = transitions_as_sequences(steps, ["observation"])  # a SliceSampler's flat sample of 2 slices
        >>> rows.batch_size, rows["observation"][0].squeeze(-1).tolist()
        (torch.Size([2, 5]), [0.0, 1.0, 2.0, 3.0, 4.0])
    """
    if batch.ndim == 1:
        batch = _cut_slices(batch)
    elif batch.ndim != 2:
        raise ValueError(
            f"Transitions come as [B, T] slices or a flat [B * T] sample, got batch {tuple(batch.batch_size)}."
        )
    num, steps = batch.batch_size
    done = batch.get(("next", "done")).reshape(num, steps)
    inside = done[:, :-1]
    if inside.any():
        b, t = (int(i) for i in inside.nonzero()[0])
        raise ValueError(
            f"An episode ends inside a slice of transitions (slice {b}, step {t} of {steps}): its final observation "
            "would be lost. Sample slices within episodes (TorchRL's SliceSampler(traj_key=('collector', "
            "'traj_ids'))), or store the transitions as observation rows (DreamerReplayBuffer, or transitions_to_rows)."
        )
    rows = batch.new_zeros(num, steps + 1)
    for key in obs_keys:
        rows.set(key, torch.cat([batch.get(key), batch.get(next_key(key))[:, -1:]], 1))
    action = batch.get(action_key).float()
    rows.set(action_key, torch.cat([action, torch.zeros_like(action[:, :1])], 1))
    is_init = batch.get(init_key).reshape(num, steps, 1).bool().clone()
    is_init[:, 0] = False  # a slice start, not known to be an episode start: its entering reward is not trained on
    rows.set(init_key, torch.cat([is_init, torch.zeros_like(is_init[:, :1])], 1))
    keys = {"reward": reward_key, "terminated": terminated_key, "truncated": ("next", "truncated"),
            "done": ("next", "done")}
    for name, key in keys.items():
        value = batch.get(key, None)
        if value is None:
            if name != "truncated":
                raise KeyError(f"Transitions need {key!r}.")
            value = torch.zeros_like(done)
        value = value.reshape(num, steps, 1)
        value = value.float() if name == "reward" else value.bool()
        rows.set(key, torch.cat([value, torch.zeros_like(value[:, :1])], 1))
    return rows


def _cut_slices(batch: TensorDictBase) -> TensorDictBase:
    """A flat ``[B * T]`` sample as ``[B, T]``, cut where the slices end (``("next", "truncated" | "done")``)."""
    num = batch.shape[0]
    ends = batch.get(("next", "done")).reshape(num).bool().clone()
    truncated = batch.get(("next", "truncated"), None)
    if truncated is not None:
        ends |= truncated.reshape(num).bool()
    ends[-1] = True
    lengths = torch.diff(ends.nonzero().squeeze(-1), prepend=torch.tensor([-1]))
    if (lengths != lengths[0]).any():
        raise ValueError(
            f"A flat batch of {num} transitions holds slices of different lengths {sorted(set(lengths.tolist()))}: "
            "sample slices of one length (SliceSampler(slice_len=T, strict_length=True)), or pass [B, T] batches."
        )
    return batch.reshape(-1, int(lengths[0]))
