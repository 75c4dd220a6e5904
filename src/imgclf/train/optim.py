"""Optimizer and learning-rate schedule for one stage.

Every schedule is a pure function of the step (``lr_factor``) under a ``LambdaLR``: its
state is one integer, so a resumed run continues the exact same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from imgclf.train.muon import Muon
from imgclf.train.recipe import OptimizerConfig, Recipe, SchedulerConfig, StageConfig
from imgclf.train.stages import group_of, resolve_groups


def muon_step(opt: OptimizerConfig, steps: int | None) -> float:
    """Muon's rate for a stage of ``steps`` optimizer steps. Muon's update has a fixed size,
    so a run travels about sqrt(steps) × rate (a random walk's reach): a stage shorter than
    the ``muon_lr_steps`` the rate was tuned for takes rate × sqrt(muon_lr_steps / steps),
    up to ``muon_lr_max``. Longer stages keep ``muon_lr``. The same rule derived `fast`'s
    0.12 at batch 500 from airbench94_muon's 0.24 at 2,000 (four times the steps); on the
    clothing photos (80 steps) 0.24 beat 0.12 on 3 of 3 seeds (docs/results.md, "Muon's
    step and the run's length")."""
    if opt.muon_lr_steps is None or not steps or steps >= opt.muon_lr_steps:
        return opt.muon_lr
    scaled = opt.muon_lr * math.sqrt(opt.muon_lr_steps / steps)
    return scaled if opt.muon_lr_max is None else min(scaled, opt.muon_lr_max)


def build_optimizer(
    model: nn.Module,
    recipe: Recipe,
    stage: StageConfig,
    lr_scale: float = 1.0,
    steps: int | None = None,
) -> torch.optim.Optimizer:
    """``lr_scale`` multiplies every rate (the small-data batch rule, imgclf.train.adapt);
    ``steps``, the stage's optimizer steps, sets Muon's rate (muon_step)."""
    opt = recipe.optimizer
    base_lr = (stage.lr if stage.lr is not None else opt.lr) * lr_scale
    groups = resolve_groups(model, stage.groups())
    # Muon's rate is an angular step on a normalized update: the batch-size rule
    # (lr_scale) does not apply to it; the stage's length, its own lr and the lower groups'
    # multiplier do.
    muon_lr = muon_step(opt, steps) * (stage.lr / opt.lr if stage.lr is not None else 1.0)
    param_groups = _param_groups(model, opt, stage, groups[-1], base_lr, muon_lr)
    if not param_groups:
        raise ValueError("no trainable parameters in this stage")
    if opt.name == "muon":
        return Muon(
            param_groups,
            lr=base_lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            ns_steps=opt.muon_ns_steps,
        )
    if opt.name == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=base_lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov and opt.momentum > 0,
        )
    return torch.optim.AdamW(param_groups, lr=base_lr, betas=opt.betas)


def _param_groups(
    model: nn.Module,
    opt: OptimizerConfig,
    stage: StageConfig,
    top: str,
    base_lr: float,
    muon_lr: float,
) -> list[dict[str, Any]]:
    """The stage's trainable parameters in groups of one (lr, weight decay, Muon or not,
    share of the stage's schedule); ``top``, the last trained group in network order,
    keeps the full rate, the lower ones take ``lower_lr_mult``. The group at the stage's
    base lr comes first: metrics.csv logs param_groups[0]'s lr."""
    owner = group_of(model)
    norm = norm_parameter_names(model)
    # A group frozen mid-stage with freeze_anneal gets its own schedule: "until" is the share
    # of the stage's steps its curve is squeezed onto (build_scheduler).
    until = stage.freeze_after if stage.freeze_anneal else {}
    bias_groups = set(opt.bias_lr_groups)
    buckets: dict[tuple[float, float, bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = 1.0 if owner[name] == top else stage.lower_lr_mult
        share = until.get(owner[name], 1.0)
        if opt.name == "muon" and is_filter_bank(p):
            buckets.setdefault((muon_lr * mult, 0.0, True, share), []).append(p)
            continue
        lr = base_lr * mult
        wd = opt.weight_decay
        if name in norm or (p.ndim == 1 and owner[name] in bias_groups):
            lr *= opt.bias_lr_mult
            if not opt.bias_lr_mult_decay:  # the same decay per step (lr × wd) as the rest
                wd /= opt.bias_lr_mult
        if p.ndim <= 1 and opt.no_decay_1d:  # biases and norm parameters
            wd = 0.0
        buckets.setdefault((lr, wd, False, share), []).append(p)
    ordered = sorted(
        buckets.items(), key=lambda item: item[0][2] or item[0][0] != base_lr or item[0][3] < 1
    )
    return [
        {"params": ps, "lr": lr, "weight_decay": wd, "initial_lr": lr, "until": share}
        | ({"muon": True, "momentum": opt.muon_momentum} if muon else {})
        for (lr, wd, muon, share), ps in ordered
    ]


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def is_filter_bank(p: nn.Parameter) -> bool:
    """A dense convolution's weight (out × in × k × k, in > 1): what Muon orthogonalizes.
    Depthwise filters (in = 1 per group), linear layers and 1-D parameters stay on SGD,
    as airbench94_muon keeps its head and biases there."""
    return p.ndim == 4 and p.shape[1] > 1


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Parameters of normalization layers (what ``bias_lr_mult`` speeds up)."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, _NORMS)
        for name, _ in module.named_parameters(recurse=False)
    }


def lr_factor(cfg: SchedulerConfig, step: int, steps_per_epoch: float, total_steps: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps of a stage."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    epoch = step // max(1, steps_per_epoch)
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr_factor
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (epoch // cfg.step_size)
    if cfg.name == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    if cfg.name == "onecycle":
        # Triangle: rise from floor to 1 over pct_start of the steps, then down to
        # end_lr_factor (airbench94: 0.2 → 1 over 23%, → 0.07; Smith & Topin, 1708.07120).
        if progress < cfg.pct_start:
            return floor + (1 - floor) * progress / cfg.pct_start
        end = cfg.end_lr_factor
        return end + (1 - end) * (1 - progress) / (1 - cfg.pct_start)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: SchedulerConfig,
    steps_per_epoch: int,
    epochs: int,
    total_steps: int | Callable[[], int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's ``epochs``-long schedule; with ``total_steps`` (a time budget's plan,
    or a function returning it: a plan may shrink while the stage runs) the same curve,
    epoch-based milestones and warm-up included, scaled onto that many steps, so it still
    ends where the recipe's does."""

    def steps() -> int:
        if total_steps is None:
            return steps_per_epoch * epochs
        return max(total_steps() if callable(total_steps) else total_steps, 1)

    def factor_until(share: float) -> Callable[[int], float]:
        # A group frozen at ``share`` of the stage (freeze_anneal) runs the whole curve
        # before then; the others run it over the stage (share 1).
        def factor(step: int) -> float:
            total = steps()
            own = max(1, math.ceil(share * total))
            return lr_factor(cfg, step, own / epochs, own)

        return factor

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor_until(g.get("until", 1.0)) for g in optimizer.param_groups]
    )


def lr_of_last_step(optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
    """The learning rate the epoch's last step used (the first group's); the optimizer
    already holds the next step's, which for StepLR(7) would log epoch 7 at the decayed lr."""
    group = optimizer.param_groups[0]
    return group["initial_lr"] * scheduler.lr_lambdas[0](max(scheduler.last_epoch - 1, 0))
