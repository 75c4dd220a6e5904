"""Muon for convolution filters, Nesterov SGD for everything else, in one optimizer.

Muon (Keller Jordan, 2024, kellerjordan.github.io/posts/muon; the optimizer of
github.com/KellerJordan/cifar10-airbench airbench94_muon.py, 94% on CIFAR-10 in 8 epochs
where airbench94's SGD needs 9.9): take the Nesterov momentum of a weight's gradient,
viewed as a matrix (out channels × the rest), and replace it by the nearest
semi-orthogonal matrix (all singular values 1) before the step. Every direction of the
filter bank then moves at the same rate, whatever the gradient's scale.

One optimizer rather than two keeps the trainer's single ``optimizer`` (its state_dict in
checkpoints, one LambdaLR over all groups, Lookahead, budgets) unchanged: groups marked
``muon: True`` take the Muon step, the others PyTorch's SGD step (same arithmetic as
``torch.optim.SGD`` with dampening 0). ``torch.optim.Muon`` takes 2-D weights only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

# Quintic Newton–Schulz coefficients tuned so that a few iterations push every singular
# value into roughly [0.7, 1.2] (Jordan 2024; torch.optim.Muon's defaults too). Exact
# orthogonality is not needed, only equal-ish rates across directions.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_EPS = 1e-7


def orthogonalize(update: torch.Tensor, steps: int) -> torch.Tensor:
    """``update`` (out × …) with its singular values pushed towards 1, same shape and dtype.

    float32 whatever the parameter's dtype: the iteration is a handful of small matmuls
    (256 × 2304 at most in ``fast``), nothing next to a batch's forward and backward.
    """
    x = update.reshape(len(update), -1).float()
    x = x / (x.norm() + _EPS)  # spectral norm ≤ Frobenius norm ≤ 1: inside the basin
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the small Gram matrix
        x = x.T
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if not wide:
        x = x.T
    return x.reshape(update.shape).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Hybrid optimizer. Per group: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``
    (SGD groups: added to the gradient, as torch.optim.SGD), ``muon`` (take the Muon step),
    ``ns_steps``.

    Muon groups keep each filter bank's Frobenius norm at sqrt(out channels) before every
    step (airbench94_muon): with the norm pinned, weight decay has nothing to do there and
    the learning rate is a fixed angular step, annealed by the schedule.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.85,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 3,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError("Muon: lr ≥ 0, 0 ≤ momentum < 1, weight_decay ≥ 0, ns_steps ≥ 1")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        defaults.update(muon=False, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take weights of 2 or more dimensions")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        momentum = group["momentum"]
        if group["weight_decay"] and not group["muon"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad)
        update = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        if group["muon"]:
            p.mul_(math.sqrt(len(p)) / p.norm().clamp_min(_EPS))
            update = orthogonalize(update, group["ns_steps"])
        p.add_(update, alpha=-group["lr"])
