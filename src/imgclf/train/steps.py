"""One stage's training pieces and its epoch of optimizer steps, top to bottom.

:func:`train_steps` is the loop, as in the torchvision reference's ``train_one_epoch`` or
nanoGPT's: forward, loss, backward, clip, step, schedule (and Lookahead's blend and the
weight EMA's update), then one call to :class:`AfterStep` for everything that is not
training: the epoch's running totals, the progress bar, one agreement of all ranks on a
diverged loss or non-finite weights (checked every WEIGHT_CHECK_EVERY steps and at the
epoch's last), Ctrl-C and a mid-epoch checkpoint, and the time budget's re-plans.

Ctrl-C is acted on between two steps, never inside one: a checkpoint taken half-way
through ``optimizer.step()`` would hold weights that its position says are not updated
yet. The order of these operations, and so the random numbers each step draws, is what
makes a resumed run equal an uninterrupted one bit for bit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from imgclf.data.loader import BatchLoader
from imgclf.runtime.distributed import Dist
from imgclf.runtime.finite import model_tensors, nonfinite
from imgclf.train.budget import Replanner
from imgclf.train.ema import WeightEma
from imgclf.train.feature_cache import FeatureCache
from imgclf.train.guards import CtrlC
from imgclf.train.lookahead import Lookahead
from imgclf.train.recipe import StageConfig
from imgclf.train.stages import group_of
from imgclf.train.state import Position, Progress

# Mid-epoch checkpoints at most this often: cheap insurance for hour-long CPU epochs.
CHECKPOINT_MINUTES = 10.0
# The weights are checked for NaN and infinity this often (in a stage's steps), and at each
# epoch's last step: a step can leave NaN weights behind a finite loss (an infinite
# learning rate did, issue #31 item 6), and the loss of the next step, checked at every
# step, catches most of the rest. One check reads every weight once, about what one
# optimizer step writes; at 50 steps it costs under 1% of a step's time (docs/benchmarks.md).
WEIGHT_CHECK_EVERY = 50


@dataclass(eq=False)
class StageRun:
    """What one stage trains with, made when the stage starts and dropped when it ends:
    the network stepped (the model, its feature cache's suffix, or either wrapped for
    data parallelism), the batches (images, or cached features), the optimizer, schedule,
    Lookahead, the weight EMA (imgclf.train.ema; it outlives the stage when the next one
    carries it on), the loss's settings and the budget's clock."""

    config: StageConfig
    model: nn.Module
    cache: FeatureCache | None
    batches: BatchLoader | FeatureCache
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    lookahead: Lookahead | None
    clock: Replanner
    steps: Callable[[], int]  # the stage's planned steps now (a re-plan moves them)
    autocast: torch.autocast
    loss_weights: torch.Tensor | None
    label_smoothing: float
    grad_clip: float | None
    lookahead_done: bool = False  # the last step has put the slow weights in place
    ema: WeightEma | None = None

    def stepped(self, done: int) -> None:
        """After the stage's optimizer step ``done`` (counted from 1) and its schedule:
        Lookahead's blend, then the EMA's update, which so averages the weights training
        goes on from."""
        if self.lookahead is not None:
            self.lookahead_step(done)
        if self.ema is not None:
            self.ema.update()

    def lookahead_step(self, done: int) -> None:
        """Lookahead after the stage's step ``done`` (counted from 1)."""
        total = self.steps()
        self.lookahead.after_step(self.model, done, total)
        if done >= total:
            self.lookahead.finish(self.model)
            self.lookahead_done = True

    def freeze_due(self, done: int, dist: Dist) -> None:
        """Stop training the groups of the stage's ``freeze_after`` whose share of its
        steps has passed, ``done`` steps in (checked at epoch starts, as airbench freezes
        its stem bias)."""
        total = self.steps()
        due = [g for g, share in self.config.freeze_after.items() if done >= share * total]
        if not due:
            return
        names = {n for n, g in group_of(self.model).items() if g in due}
        changed = False
        for name, p in self.model.named_parameters():
            if name in names and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                changed = True
        if changed and dist.enabled:  # DDP fixes its trained set when it is built
            unwrapped = self.cache.suffix if self.cache is not None else self.model
            self.net = dist.wrap(unwrapped)


def train_steps(st: StageRun, after: AfterStep) -> None:
    """One epoch of stage ``st``'s optimizer steps, from the batch its position is at to
    ``after.limit`` (the epoch's end, or a budgeted stage's last step)."""
    start = after.position.batch
    for step, (x, y) in enumerate(st.batches.iter_from(start), start=start):
        if step >= after.limit:
            break
        with st.autocast:
            logits = st.net(x)
            loss = F.cross_entropy(
                logits.float(), y, weight=st.loss_weights, label_smoothing=st.label_smoothing
            )
        diverged = not torch.isfinite(loss)
        # Data-parallel ranks all step (backward is a collective) and agree in after().
        if diverged and not after.dist.enabled:
            raise after.diverged(loss.item(), step)
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if st.grad_clip:
            torch.nn.utils.clip_grad_norm_(st.model.parameters(), st.grad_clip)
        st.optimizer.step()
        st.scheduler.step()
        st.stepped(after.first + step + 1)
        bad = nonfinite(model_tensors(st.model)) if after.weights_due(step) else []
        if bad and not after.dist.enabled:
            raise after.diverged(loss.item(), step, bad)
        after(step, loss, logits, y, diverged, bad)


class AfterStep:
    """Everything that follows an optimizer step, in order: the epoch's running totals
    (``totals``: loss, correct, count, seconds before this process), the progress bar,
    then one agreement of all ranks (any rank's diverged loss, Ctrl-C or due mid-epoch
    checkpoint holds for all, so no rank waits in a collective another has left), and a
    re-plan of the time budget when one is due. :meth:`weights_due` says after which steps
    the loop checks the weights.

    ``first``: the stage's steps before this epoch; ``limit``: the epoch's last step
    (moved by re-plans); ``save(totals, started)`` writes a mid-epoch checkpoint;
    ``diverged(loss, step, weights)`` makes the error to raise (``weights``: the names of
    non-finite tensors)."""

    def __init__(
        self,
        *,
        totals: dict[str, float],
        position: Position,
        progress: Progress,
        dist: Dist,
        ctrl_c: CtrlC,
        clock: Replanner,
        first: int,
        per_epoch: int,
        limit: int,
        save: Callable[[dict[str, float], float], None],
        diverged: Callable[..., Exception],
        bar: tqdm,
    ) -> None:
        self.totals, self.position, self.progress = totals, position, progress
        self.dist, self.ctrl_c, self.clock = dist, ctrl_c, clock
        self.first, self.per_epoch, self.limit = first, per_epoch, limit
        self.save, self.diverged, self.bar = save, diverged, bar
        self.started = time.perf_counter()
        self.last_save = self.started

    def weights_due(self, step: int) -> bool:
        """Whether the weights are checked after step index ``step`` of this epoch: every
        WEIGHT_CHECK_EVERY steps of the stage, and at the epoch's last step, so that
        validation and the checkpoint never see weights that were not checked. The same
        answer on every rank."""
        done = self.first + step + 1
        return done % WEIGHT_CHECK_EVERY == 0 or step + 1 >= min(self.per_epoch, self.limit)

    def __call__(
        self,
        step: int,
        loss: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
        diverged: bool,
        weights: Sequence[str] = (),
    ) -> None:
        acc, n = self.totals, len(y)
        acc["loss"] += loss.item() * n
        acc["correct"] += (logits.argmax(1) == y).sum().item()
        acc["count"] += n
        self.progress.images_seen += n * self.dist.world_size  # every rank's share
        self.position.batch = step + 1
        now = time.perf_counter()
        self._show(now)
        self._agree(now, diverged, loss, step, list(weights))
        done = self.first + self.position.batch
        if self.clock.due(done, self.first + min(self.per_epoch, self.limit)):
            self.clock.replan(done, epoch_ends=0)
            self.limit = self.clock.stage_steps() - self.first

    def _show(self, now: float) -> None:
        acc = self.totals
        ips = acc["count"] / max(acc["seconds"] + now - self.started, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{acc['loss'] / acc['count']:.3f}",
            acc=f"{acc['correct'] / acc['count']:.3f}",
            img_s=f"{ips:.0f}",
            refresh=False,
        )

    def _agree(
        self, now: float, diverged: bool, loss: torch.Tensor, step: int, weights: list[str]
    ) -> None:
        interrupt = self.ctrl_c.requested
        save_due = now - self.last_save > CHECKPOINT_MINUTES * 60
        if self.dist.enabled:  # any rank's reason holds for all of them
            agreed = self.dist.any(diverged or bool(weights), interrupt, save_due)
            diverged, interrupt, save_due = agreed
            if diverged:
                raise self.diverged(loss.item(), step, weights)
        if interrupt:
            self.save(self.totals, self.started)
            raise KeyboardInterrupt
        if save_due:
            self.save(self.totals, self.started)
            self.last_save = now


def progress_bar(total: int, initial: int, desc: str, show: bool) -> tqdm:
    """The epoch's bar on stderr, shown only where ``show`` (rank 0, not --quiet)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not show or None,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
