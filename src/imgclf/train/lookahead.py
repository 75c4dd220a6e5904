"""Lookahead over a stage's weights, as airbench94 runs it (arXiv 2404.00498, from
tysam-code's hlb-cifar10; Zhang et al., "Lookahead Optimizer", arXiv 1907.08610).

The optimizer moves the "fast" weights; every ``every`` steps the "slow" copy moves
toward them, slow ← slow + (1 − d)(fast − slow), and training continues from the slow
copy. The decay d = decay**every × progress**power is near 0 early on (plain SGD) and
grows as the learning rate anneals, so the end of a run averages its last few hundred
steps (an EMA that the trainer keeps using, not only reads). The stage ends on the slow
weights. BatchNorm running statistics are floating-point state and are averaged too.

Its state is one tensor per floating-point entry of the model's ``state_dict``, saved in
mid-stage checkpoints so a resumed run continues the same averages.
"""

from __future__ import annotations

import torch
from torch import nn

from imgclf.train.recipe import LookaheadConfig


class Lookahead:
    def __init__(self, model: nn.Module, cfg: LookaheadConfig) -> None:
        self.cfg = cfg
        self.slow = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    def decay_at(self, done: int, total: int) -> float:
        progress = min(max(done / max(total, 1), 0.0), 1.0)
        return self.cfg.decay**self.cfg.every * progress**self.cfg.power

    def after_step(self, model: nn.Module, done: int, total: int) -> None:
        """Call after every optimizer step; ``done`` steps of ``total`` in this stage."""
        if done % self.cfg.every == 0:
            self._blend(model, self.decay_at(done, total))

    def finish(self, model: nn.Module) -> None:
        """End the stage on the slow weights (airbench: an update with decay 1)."""
        self._blend(model, 1.0)

    @torch.no_grad()
    def _blend(self, model: nn.Module, decay: float) -> None:
        state = model.state_dict()
        for key, slow in self.slow.items():
            fast = state[key]
            slow.lerp_(fast, 1.0 - decay)
            fast.copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.slow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.slow.keys() - state.keys()
        if missing:
            raise KeyError(f"lookahead state lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for key, slow in self.slow.items():
                slow.copy_(state[key])
