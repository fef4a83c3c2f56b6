"""Catch: a tiny pixel game for fast learning tests, as a pure-torch TorchRL environment."""
from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, OneHot, Unbounded
from torchrl.envs import EnvBase

__all__ = ["CatchEnv"]

PADDLE_HALF_WIDTH = 1  # the paddle covers 3 pixels: centre - 1 .. centre + 1


class CatchEnv(EnvBase):
    """Catch on a ``size x size`` grid, rendered as uint8 pixels.

    A ball appears at a random column of the top row and falls one row per step. A 3-pixel paddle on the bottom row
    moves left, stays or moves right (3 one-hot actions, in that order); it starts centred and stays inside the
    grid. When the ball reaches the bottom row (after ``size - 1`` steps) the episode terminates with reward +1 if
    the paddle is under the ball and -1 otherwise; every other step gives 0. A uniformly random policy averages
    about -0.63 at ``size=16``, a policy following the ball scores +1.

    Keys: ``"pixels"`` uint8 ``[1, size * scale, size * scale]`` (ball and paddle 255, background 0), ``"action"`` one-hot ``[3]``,
    ``("next", "reward")`` float32 ``[1]``, ``"done"`` / ``"terminated"`` / ``"truncated"`` bool ``[1]`` (never
    truncated), plus the state entries ``"ball"`` (row, column) and ``"paddle"`` (centre column), int64. With
    ``vector_obs=True`` also ``"observation"``, float32 ``[3]``: (ball row, ball column, paddle centre) / (size - 1),
    a dict observation (image + vector) for tests.

    Args:
        size: side of the grid, at least 3. Defaults to 16.
        scale: pixels per grid cell side (``catch:8`` with ``scale=2`` renders 16 x 16 frames). Defaults to 1.
        seed: seed of the ball's starting column. Defaults to None (unseeded).
        vector_obs: also emit the float ``"observation"`` entry. Defaults to False.
        device: device of the tensors. Defaults to ``"cpu"``.

    Example:
        >>> env = CatchEnv(size=16, seed=0)
        >>> td = env.rollout(100)
        >>> td.shape, td["pixels"].shape, td["pixels"].dtype
        (torch.Size([15]), torch.Size([15, 1, 16, 16]), torch.uint8)
        >>> td["next", "reward"].abs().sum().item(), td["next", "terminated"][-1].item()
        (1.0, True)
    """

    def __init__(
        self,
        *,
        size: int = 16,
        scale: int = 1,
        seed: int | None = None,
        vector_obs: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if size < 3:
            raise ValueError(f"CatchEnv needs size >= 3, got {size}.")
        if scale < 1:
            raise ValueError(f"CatchEnv needs scale >= 1, got {scale}.")
        super().__init__(device=device, batch_size=torch.Size([]))
        self.size = size
        self.scale = scale
        self.vector_obs = vector_obs
        self._generator = torch.Generator()
        self._make_specs()
        if seed is not None:
            self.set_seed(seed)

    def _make_specs(self) -> None:
        size, device = self.size, self.device
        self.observation_spec = Composite(
            pixels=Bounded(
                low=0, high=255, shape=(1, size * self.scale, size * self.scale), dtype=torch.uint8, device=device
            ),
            ball=Bounded(low=0, high=size - 1, shape=(2,), dtype=torch.int64, device=device),
            paddle=Bounded(
                low=PADDLE_HALF_WIDTH, high=size - 1 - PADDLE_HALF_WIDTH, shape=(1,), dtype=torch.int64, device=device
            ),
            device=device,
        )
        if self.vector_obs:
            self.observation_spec["observation"] = Bounded(
                low=0.0, high=1.0, shape=(3,), dtype=torch.float32, device=device
            )
        self.action_spec = OneHot(3, dtype=torch.int64, device=device)
        self.reward_spec = Unbounded(shape=(1,), dtype=torch.float32, device=device)
        done = Categorical(n=2, shape=(1,), dtype=torch.bool, device=device)
        self.done_spec = Composite(done=done, terminated=done.clone(), truncated=done.clone(), device=device)

    def _set_seed(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self._generator.manual_seed(seed)

    def render(self, ball: torch.Tensor, paddle: torch.Tensor) -> torch.Tensor:
        """Draws the grid: uint8 ``[1, size * scale, size * scale]`` with the ball and the paddle at 255."""
        pixels = torch.zeros(1, self.size, self.size, dtype=torch.uint8, device=self.device)
        centre = int(paddle[0])
        pixels[0, -1, centre - PADDLE_HALF_WIDTH : centre + PADDLE_HALF_WIDTH + 1] = 255
        pixels[0, ball[0], ball[1]] = 255
        if self.scale > 1:  # each cell drawn as a scale x scale block
            pixels = pixels.repeat_interleave(self.scale, -1).repeat_interleave(self.scale, -2)
        return pixels

    def _observation(self, ball: torch.Tensor, paddle: torch.Tensor) -> dict[str, torch.Tensor]:
        obs = {"pixels": self.render(ball, paddle), "ball": ball, "paddle": paddle}
        if self.vector_obs:
            obs["observation"] = torch.cat([ball, paddle]).to(torch.float32) / (self.size - 1)
        return obs

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        column = int(torch.randint(self.size, (), generator=self._generator))
        ball = torch.tensor([0, column], dtype=torch.int64, device=self.device)
        paddle = torch.tensor([self.size // 2], dtype=torch.int64, device=self.device)
        false = torch.zeros(1, dtype=torch.bool, device=self.device)
        return TensorDict(
            {**self._observation(ball, paddle), "done": false, "terminated": false.clone(), "truncated": false.clone()},
            batch_size=self.batch_size,
            device=self.device,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        move = int(tensordict["action"].argmax(-1)) - 1  # left, stay, right -> -1, 0, +1
        lowest, highest = PADDLE_HALF_WIDTH, self.size - 1 - PADDLE_HALF_WIDTH
        paddle = (tensordict["paddle"] + move).clamp(lowest, highest)
        ball = tensordict["ball"] + torch.tensor([1, 0], dtype=torch.int64, device=self.device)
        landed = bool(ball[0] == self.size - 1)
        reward = 0.0
        if landed:
            reward = 1.0 if abs(int(ball[1]) - int(paddle[0])) <= PADDLE_HALF_WIDTH else -1.0
        terminated = torch.full((1,), landed, dtype=torch.bool, device=self.device)
        return TensorDict(
            {
                **self._observation(ball, paddle),
                "reward": torch.full((1,), reward, dtype=torch.float32, device=self.device),
                "done": terminated,
                "terminated": terminated.clone(),
                "truncated": torch.zeros(1, dtype=torch.bool, device=self.device),
            },
            batch_size=self.batch_size,
            device=self.device,
        )
