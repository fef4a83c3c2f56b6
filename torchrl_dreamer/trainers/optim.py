"""The reference DreamerV2 optimiser: Adam, global-norm clipping, decoupled weight decay."""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["DreamerV2Optimizer"]


def _as_lists(params) -> list:
    """Parameters or parameter groups as a list, each group's ``params`` as a list (read once)."""
    out = []
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            item = dict(item, params=[group] if isinstance(group, torch.Tensor) else list(group))
        out.append(item)
    return out


def _fused_supported(params: list) -> bool:
    """Whether torch's fused Adam takes these parameters (floating point, on the CPU or CUDA)."""
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    tensors = [t[1] if isinstance(t, tuple) else t for t in tensors]  # named parameters: (name, tensor)
    return bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


class DreamerV2Optimizer(torch.optim.Adam):
    """Adam (eps 1e-5) with global-norm gradient clipping and the reference weight decay.

    Each :meth:`step`:

    1. measures the global gradient norm and clips it to ``max_grad_norm``;
    2. decays every parameter as ``w <- (1 - weight_decay) * w`` (not scaled by
       the learning rate, unlike ``torch.optim.AdamW``);
    3. takes the Adam step.

    The Adam step is PyTorch's fused kernel (``fused=True``: one pass over each
    parameter, its gradient and moments, instead of one pass per operation) wherever
    every parameter is a floating-point tensor on the CPU or a CUDA device; it computes
    the same update.

    The pre-clipping norm of the last step is kept in :attr:`last_grad_norm`
    (a tensor). A step whose gradient norm is not finite (a NaN or inf loss or
    gradient) changes nothing: no decay, no Adam moment, no parameter moves,
    and :attr:`skipped` is True until the next step (checking costs one device
    synchronisation per step).

    Args:
        params: parameters or parameter groups.

    Keyword Args:
        lr (float): learning rate. Default: ``1e-4``.
        eps (float): Adam epsilon. Default: ``1e-5``.
        betas (tuple): Adam betas. Default: ``(0.9, 0.999)``.
        weight_decay (float): decay rate per step. Default: ``1e-6``.
        max_grad_norm (float | None): global-norm clip, ``None`` to disable. Default: ``100.0``.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = DreamerV2Optimizer([w], lr=0.0, weight_decay=0.5)
        >>> (w * 1000).sum().backward()
        >>> opt.step()
        >>> w.detach()
        tensor([0.5000, 0.5000, 0.5000])
        >>> round(float(opt.last_grad_norm), 1)
        1732.1
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float = 1e-4,
        eps: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-6,
        max_grad_norm: float | None = 100.0,
    ):
        params = _as_lists(params)
        super().__init__(params, lr=lr, eps=eps, betas=betas, weight_decay=0.0, fused=_fused_supported(params) or None)
        self.decoupled_weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm = torch.zeros(())
        self.skipped = False

    _EXTRA = ("decoupled_weight_decay", "max_grad_norm", "last_grad_norm", "skipped")

    def __getstate__(self) -> dict:
        """torch's optimiser pickles its defaults, state and groups only; these settings travel too (to the ranks
        of a Ray learner, which receive the optimiser pickled)."""
        return {**super().__getstate__(), **{name: self.__dict__[name] for name in self._EXTRA}}

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        with_grad = [p for p in params if p.grad is not None]
        self.skipped = False
        if with_grad:
            grads = [p.grad for p in with_grad]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self.last_grad_norm = norm
            if not bool(torch.isfinite(norm)):
                self.skipped = True
                return None
            if self.max_grad_norm is not None:
                scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                if bool(scale < 1.0):  # (the norm is on the host already) scaling by 1 would change nothing
                    torch._foreach_mul_(grads, scale)
        if self.decoupled_weight_decay:
            torch._foreach_mul_(params, 1.0 - self.decoupled_weight_decay)
        return super().step(closure)
