"""Optimisers, including RMSProp with TensorFlow 1's semantics.

TF1's ``tf.train.RMSPropOptimizer`` differs from ``torch.optim.RMSprop`` in two
ways that change the trajectory: its mean-square accumulator starts at 1.0, not 0,
and epsilon sits inside the square root (TF1 ``ApplyRMSProp``):
    ms  ← ρ·ms + (1 − ρ)·g²
    mom ← μ·mom + lr·g / √(ms + ε)
    w   ← w − mom
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vaeserve.training.config import TrainConfig


class TF1RMSprop(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        decay: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-10,
    ) -> None:
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, epsilon=epsilon))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            ms, mom = self._buffers(params)
            torch._foreach_mul_(ms, group["decay"])
            torch._foreach_addcmul_(ms, grads, grads, value=1.0 - group["decay"])
            denom = torch._foreach_add(ms, group["epsilon"])
            torch._foreach_sqrt_(denom)
            if group["momentum"] == 0.0:
                torch._foreach_addcdiv_(params, grads, denom, value=-group["lr"])
                continue
            torch._foreach_mul_(mom, group["momentum"])
            torch._foreach_addcdiv_(mom, grads, denom, value=group["lr"])
            torch._foreach_sub_(params, mom)

    def _buffers(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for p in params:
            state = self.state[p]
            if not state:
                state["ms"] = torch.ones_like(p)  # TF1 initialises the accumulator to 1.0
                state["mom"] = torch.zeros_like(p)
        return [self.state[p]["ms"] for p in params], [self.state[p]["mom"] for p in params]


def make_optimizer(config: TrainConfig, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "tf1-rmsprop":
        return TF1RMSprop(params, lr=config.lr)
    return torch.optim.Adam(params, lr=config.lr, eps=1e-4)
