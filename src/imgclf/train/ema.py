"""Weight EMA: an exponential moving average of the weights, validated and saved as best.pt.

The average is timm's ``ModelEmaV3`` (timm/utils/model_ema.py, timm 1.0): a copy of the
model whose floating-point ``state_dict`` entries (parameters and BatchNorm running
statistics, as timm's default ``exclude_buffers=False``) move toward the trained ones
after every optimizer step with one ``torch._foreach_lerp_``, integer buffers
(``num_batches_tracked``) copied, and the same decay schedule (first update a copy,
warmup 1 − (1 + t)^(−2/3)); tests/test_ema.py checks it bit for bit against timm's class.

It is not timm's class because that one lerps every entry of the model and rebuilds both
state dicts at each step, which cost more than a cached head-stage step of Lite0
(docs/benchmarks.md, "Weight EMA's update"). Here each stage pairs, once, only the entries
that can differ: the parameters it trains, the buffers of modules in training mode
(BatchNorm statistics), and whatever the average has not caught up with from an earlier
stage; for every other entry the average and the weights are equal and stay so, and an
update would leave it as it is (lerp(a, a, w) = a exactly), so the result is timm's. A
time budget's probe (imgclf.train.budget) times steps without the update; the budget's
re-plans absorb its cost.

Stages: the average starts from the weights when a stage with EMA follows one without
(or the run starts), carries on through consecutive EMA stages (one average, as timm keeps
one for a run; warmup counts its own updates), and is dropped in a stage without it. Under
torchrun only rank 0 keeps one: it alone validates and saves, and its weights are every
rank's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from imgclf.train.recipe import EmaConfig, Recipe
from imgclf.train.stages import split_at_first_trained

if TYPE_CHECKING:
    from imgclf.data.loader import BatchLoader
    from imgclf.train.feature_cache import FeatureCache
    from imgclf.train.state import Progress


class WeightEma:
    """The average of ``model``'s weights (``module``: a copy in eval mode). :meth:`track`
    at each stage's start, :meth:`update` after each of its optimizer steps."""

    def __init__(self, model: nn.Module, cfg: EmaConfig) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.cfg = cfg
        self.updates = 0
        self.suffix: nn.Module | None = None  # after the cached prefix, when it is the model's
        self._lerp: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._copy: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def decay(self) -> float:
        """timm's ``ModelEmaV3.get_decay(step=updates)`` (update_after_step 0, min_decay 0,
        warmup gamma 1 and power 2/3) for the update being made."""
        t = self.updates - 1
        if t <= 0:
            return 0.0
        if self.cfg.warmup:
            return min(self.cfg.decay, 1.0 - (1.0 + t) ** (-2.0 / 3.0))
        return self.cfg.decay

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average toward the weights paired by :meth:`track`."""
        self.updates += 1
        if self._lerp[0]:
            torch._foreach_lerp_(*self._lerp, weight=1.0 - self.decay())
        if self._copy[0]:
            torch._foreach_copy_(*self._copy)

    def track(
        self, model: nn.Module, cfg: EmaConfig, groups: list[str] | None, cached: bool
    ) -> None:
        """Pair the entries of ``model`` this stage may move (it trains ``groups``) or the
        average differs on; ``cached``: the stage trains on a frozen prefix's features."""
        self.cfg = cfg
        moving = _moving_buffers(model) | {
            n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
        }
        mine = self.module.state_dict()
        lerp: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        seen: set[int] = set()  # a tied tensor is one entry, not one per name
        for key, live in model.state_dict().items():
            ema = mine[key]
            if ema.numel() == 0 or ema.data_ptr() in seen:
                continue
            seen.add(ema.data_ptr())
            if key not in moving and torch.equal(ema, live):
                continue  # fixed in this stage and caught up with: an update keeps it
            pair = lerp if ema.is_floating_point() else copies
            pair[0].append(ema)
            pair[1].append(live)
        self._lerp, self._copy = lerp, copies
        self.suffix = self._suffix(model, groups) if cached else None

    def _suffix(self, model: nn.Module, groups: list[str] | None) -> nn.Module | None:
        """The average's part after the cached prefix, when its prefix is the model's (then
        validation can run on the cached features); None when it differs."""
        theirs = split_at_first_trained(model, groups)
        ours = split_at_first_trained(self.module, groups)
        if theirs is None or ours is None:
            return None
        a, b = theirs[0].state_dict(), ours[0].state_dict()
        return ours[1] if all(torch.equal(a[k], b[k]) for k in a) else None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``ema_state``: the settings, the update count and the weights."""
        return {
            "decay": self.cfg.decay,
            "warmup": self.cfg.warmup,
            "updates": self.updates,
            "weights": self.module.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


def _moving_buffers(model: nn.Module) -> set[str]:
    """``state_dict`` names of the buffers a training step can change: those of modules in
    training mode (BatchNorm updates its running statistics only there; the stage's modes
    are set before :meth:`WeightEma.track` and each epoch sets the same ones again)."""
    return {
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules(remove_duplicate=False)
        if module.training
        for buffer, _ in module.named_buffers(recurse=False)
    }


def stage_ema(
    current: WeightEma | None,
    model: nn.Module,
    cfg: EmaConfig | None,
    resume: dict[str, Any] | None,
    groups: list[str] | None,
    cached: bool,
) -> WeightEma | None:
    """The average a stage updates: none when ``cfg`` is None; else the ``current`` one
    (the previous stage kept one), or the ``ema_state`` of the checkpoint the stage
    resumes from, or a new one from the weights as they are."""
    if cfg is None:
        return None
    ema = current or WeightEma(model, cfg)
    if resume is not None and resume.get("ema_state") is not None:
        ema.load_state_dict(resume["ema_state"])
    ema.track(model, cfg, groups, cached)
    return ema


def validated(
    model: nn.Module,
    ema: WeightEma | None,
    cache: FeatureCache | None,
    val: BatchLoader,
) -> tuple[nn.Module, Iterable[tuple[Any, Any]]]:
    """What validation runs, on which batches: the average when there is one, else the
    model; on the cached validation features when the stage has them and the network's
    prefix is the one they came from, else on the images."""
    cached = cache is not None and cache.val_features is not None
    if ema is None:
        return (cache.suffix, cache.val_batches()) if cached else (model, val)
    if cached and ema.suffix is not None:
        return ema.suffix, cache.val_batches()
    return ema.module, val


def ema_summary(recipe: Recipe, progress: Progress) -> dict[str, Any] | None:
    """summary.json's ``ema``: the settings, the stages (from 1) that kept the average,
    and which weights best.pt holds ("ema", or "trained" when the best epoch was in a
    stage without it); None when no stage did."""
    stages = [i + 1 for i, s in enumerate(recipe.stages) if recipe.ema_for(s) is not None]
    if not stages:
        return None
    cfg = recipe.ema or EmaConfig()
    return {
        "decay": cfg.decay,
        "warmup": cfg.warmup,
        "stages": stages,
        "best_pt": progress.best_weights,
    }
