"""The trainer: stages in order, one epoch at a time, checkpointed, resumable.

:class:`Trainer` builds the model and loaders (imgclf.train.setup), runs every stage of
the recipe (freezing and unfreezing groups itself), and ends each epoch here: validation,
the callbacks (imgclf.train.callbacks: metrics.csv, TensorBoard, the caller's), the guard
rails (imgclf.train.guards), early stopping, a budget's re-plan, and ``last.pt``/``best.pt``
(imgclf.train.state). An epoch's steps are imgclf.train.steps; the end of the run is
imgclf.train.finish. With a weight EMA (imgclf.train.ema) validation and best.pt use the
average.

Resume is exact on CPU: batches are a function of (seed, epoch), the global RNG state is
saved, and a checkpoint taken mid-epoch (Ctrl-C, or every ``CHECKPOINT_MINUTES``) records
how many batches of that epoch were done, which the resumed run skips.

Under torchrun the same loop trains data-parallel (imgclf.runtime.distributed): each stage
wraps the trained network in DistributedDataParallel once its trainable set is fixed,
each rank steps through its share of every global batch, metrics are summed over ranks,
rank 0 alone validates (the result is broadcast, so early stopping and best.pt agree
everywhere) and writes the run folder, and every rank agrees at each step on Ctrl-C and
on mid-epoch checkpoints (one small all-reduce), so no rank waits in a collective that
another has left.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from imgclf.data.cache import Dataset
from imgclf.data.loader import Augment
from imgclf.errors import TrainingDiverged
from imgclf.evaluate.metrics import infer
from imgclf.io_utils import atomic_write_text, make_folder
from imgclf.models import model_spec
from imgclf.runtime import distributed
from imgclf.runtime.checkpoint import save_checkpoint
from imgclf.runtime.device import Hardware, resolve_hardware, set_threads
from imgclf.runtime.distributed import SINGLE, Dist
from imgclf.runtime.finite import checkpoint_tensors, nonfinite
from imgclf.train import precision
from imgclf.train.adapt import adapt
from imgclf.train.budget import Plan, PlanInputs, Replanner, agreed_plan
from imgclf.train.cached_eval import CachedVal
from imgclf.train.callbacks import Callback, Hooks
from imgclf.train.ema import WeightEma, ema_summary, stage_ema, validated
from imgclf.train.feature_cache import FeatureCache
from imgclf.train.final import FinalFit
from imgclf.train.finish import FinishInputs, finish_run
from imgclf.train.guards import (
    CtrlC,
    chance_warning,
    diverged_message,
    majority_rate,
    stage_drop_warning,
)
from imgclf.train.lookahead import Lookahead
from imgclf.train.optim import build_optimizer, build_scheduler, lr_of_last_step, muon_step
from imgclf.train.recipe import Recipe, StageConfig
from imgclf.train.rundir import summary_line, write_json, write_launch_marker
from imgclf.train.setup import (
    build_model,
    check_groups,
    config_yaml,
    init_from_data,
    loss_weights,
    make_loaders,
    share_batch,
)
from imgclf.train.shared_cache import StageCaches
from imgclf.train.stages import set_trainable, stage_size, train_mode
from imgclf.train.state import (
    Position,
    Progress,
    Run,
    best_checkpoint,
    from_checkpoint,
    restore_stage,
    to_checkpoint,
)
from imgclf.train.steps import AfterStep, StageRun, progress_bar, train_steps


class Trainer:
    """Trains one recipe on one data set into one run folder (``out``; None until
    :func:`~imgclf.train.api.train` numbers one), from scratch or from a checkpoint's
    ``state``. ``budget_seconds``: fit the run to that wall time (imgclf.train.budget),
    counted from ``started``. :meth:`run` trains, evaluates and returns the :class:`Run`."""

    def __init__(
        self,
        recipe: Recipe,
        ds: Dataset,
        out: Path | None,
        *,
        device: str | None = None,
        threads: int | None = None,
        progress: bool = True,
        state: dict | None = None,
        budget_seconds: float | None = None,
        started: float | None = None,
        dist: Dist = SINGLE,
        callbacks: Sequence[Callback] = (),
        final: FinalFit | None = None,
    ) -> None:
        self.started = started if started is not None else time.perf_counter()
        self.dist = dist
        self.budget_seconds = budget_seconds
        self.plan: Plan | None = None  # a time budget's steps per stage (imgclf.train.budget)
        self.recipe, self.ds, self.out = recipe, ds, out
        self.final = final  # a final fit: trains on train + val (imgclf.train.final)
        self.threads = set_threads(threads)
        self.hw: Hardware = resolve_hardware(device, recipe.precision, recipe.channels_last)
        self.show_progress = progress and dist.is_main  # one process speaks for the job
        dist.check_sync_bn(recipe.sync_bn)
        self.ctrl_c = CtrlC()
        torch.manual_seed(recipe.seed)
        self.resume_state = state  # until the stage it stopped in has restored from it
        self.model = build_model(recipe, len(ds.classes), self.hw, fresh=state is None)
        pretrained = model_spec(recipe.model).kind == "pretrained" and recipe.pretrained
        # The train split's size in a final fit too: its batch is the validation run's.
        self.adapted = adapt(recipe, pretrained, len(ds.indices("train")))
        if dist.enabled:
            self.adapted = share_batch(self.adapted, dist)
        self.train_loader, self.val_loader = make_loaders(
            recipe, ds, self.model, self.hw, dist, self.adapted.batch_size, final is not None
        )
        self.loss_weights = loss_weights(recipe, self.train_loader, len(ds.classes), self.hw)
        self.position, self.progress = Position(), Progress()
        self.wall_base = 0.0  # wall time of the processes before a resume
        self.stage: StageRun | None = None  # the stage training now
        self.ema: WeightEma | None = None  # the weight EMA, kept across the stages with one
        loaders = self.train_loader, self.val_loader
        self.caches = StageCaches(self.model, *loaders, self.hw, dist, lambda t: self._say(t))
        self.cached_val: CachedVal | None = None  # the last stage's (imgclf.train.cached_eval)
        # Rank 0 alone calls them, and writes metrics.csv and TensorBoard (Hooks.open).
        self.hooks = Hooks(self, callbacks if dist.is_main else ())
        check_groups(self.model, recipe)
        if state is None:
            init_from_data(self.model, self.train_loader, recipe.seed)
        else:
            self.position, self.progress, self.plan = from_checkpoint(state, self.model)
            self.wall_base = self.progress.wall_seconds

    # ------------------------------------------------------------------ lengths

    def _global_epoch(self, stage: int, epoch_in_stage: int) -> int:
        return sum(self._stage_epochs(i) for i in range(stage)) + epoch_in_stage

    def _stage_steps(self, si: int) -> int:
        """Optimizer steps of stage ``si``: the budget's plan, or whole recipe epochs."""
        if self.plan is not None:
            return self.plan.stage_steps[si]
        return self.recipe.stages[si].epochs * len(self.train_loader)

    def _stage_epochs(self, si: int) -> int:
        """Epochs (passes started) of stage ``si``; a budgeted stage may end mid-epoch."""
        if self.plan is None:
            return self.recipe.stages[si].epochs
        return math.ceil(self.plan.stage_steps[si] / len(self.train_loader))

    @property
    def total_epochs(self) -> int:
        return sum(self._stage_epochs(i) for i in range(len(self.recipe.stages)))

    def _stage_length(self, si: int) -> str:
        if self.plan is None:
            return f"{self.recipe.stages[si].epochs} epochs"
        return f"{self.plan.stage_epochs[si]:.2f} epochs ({self.plan.stage_steps[si]} steps)"

    def ensure_plan(self) -> None:
        """Probe and plan a time budget, once (a resumed run already has its plan)."""
        if self.budget_seconds is None or self.plan is not None:
            return
        loaders = (self.train_loader, self.val_loader)
        job = PlanInputs(
            self.model, self.recipe, *loaders, self.hw, self.adapted.freeze_bn, self.dist.enabled
        )
        self.plan = agreed_plan(job, self.budget_seconds, self.started, self.dist)

    # ------------------------------------------------------------------ stages

    def fit(self) -> None:
        """Train the stages from where the position stands (a resume's) to the end, or
        until early stopping."""
        if self.recipe.sync_bn:  # only now: the budget's probe (rank 0 alone) must not sync
            self.model = self.dist.sync_batchnorm(self.model)
        for si, stage in enumerate(self.recipe.stages):
            if si < self.position.stage:
                continue
            if si > self.position.stage:
                self.position = Position(si, 0, 0)
            if self.position.epoch >= self._stage_epochs(si):
                continue
            self.stage = self._start_stage(si, stage)
            self.hooks("on_stage_start")
            while self.position.epoch < self._stage_epochs(si):
                stop = self._epoch(si)
                if self._agreed(self.ctrl_c.requested):  # during validation or the save
                    raise KeyboardInterrupt
                if stop:
                    return
            self.stage = None

    def _start_stage(self, si: int, stage: StageConfig) -> StageRun:
        """Set up stage ``si``: its trainable groups, augmentation and feature cache, then
        its optimizer, schedule and Lookahead (a resumed stage's from the checkpoint)."""
        r = self.recipe
        n_train, cache = self._stage_network(si, stage)
        # Rank 0 alone keeps the average: it alone validates and saves (imgclf.train.ema).
        on = r.ema_for(stage) if self.dist.is_main else None
        self.ema = stage_ema(
            self.ema, self.model, on, self.resume_state, stage.groups(), cache is not None
        )
        # Wrapped now that the stage's trainable set and cache are fixed (see Dist.wrap);
        # one process trains the network itself.
        net = self.dist.wrap(cache.suffix if cache is not None else self.model)
        steps = self._stage_steps(si)
        optimizer = build_optimizer(self.model, r, stage, self.adapted.lr_scale, steps)
        # A budgeted stage squeezes or stretches the recipe's schedule onto its planned
        # steps, so it anneals fully whatever the length.
        planned = functools.partial(self._stage_steps, si)
        scheduler = build_scheduler(
            optimizer,
            stage.scheduler or r.scheduler,
            len(self.train_loader),
            stage.epochs,
            total_steps=planned if self.plan else None,
        )
        lookahead = Lookahead(self.model, r.lookahead) if r.lookahead else None
        if self.resume_state is not None:
            restore_stage(self.resume_state, optimizer, scheduler, lookahead)
            self.resume_state = None
        groups = stage.groups() or ["all"]
        self._say(
            f"stage {si + 1}/{len(r.stages)}: training {', '.join(groups)} "
            f"({n_train:,} parameters) for {self._stage_length(si)}"
        )
        self._say_muon_step(optimizer, steps)
        batches = cache if cache is not None else self.train_loader
        dtype = self._stage_dtype(si, cache)
        return StageRun(
            config=stage,
            model=self.model,
            cache=cache,
            batches=batches,
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            lookahead=lookahead,
            ema=self.ema,
            # Where this stage's clock starts for the budget's re-plans (after its cache).
            clock=self._clock(si, len(batches)),
            steps=planned,
            autocast=torch.autocast(self.hw.device.type, dtype=dtype, enabled=dtype is not None),
            loss_weights=self.loss_weights,
            label_smoothing=r.label_smoothing,
            grad_clip=r.grad_clip,
        )

    def _stage_dtype(self, si: int, cache: FeatureCache | None) -> torch.dtype | None:
        """Stage ``si``'s autocast dtype (imgclf.train.precision), recorded in the
        progress so that a resumed stage keeps it."""
        n = min(precision.PROBE_IMAGES, self.train_loader.num_samples)
        if cache is not None:
            net, sample = cache.suffix, lambda: cache.features[0][:n].float().clone()
        else:
            net, sample = self.model, lambda: self.train_loader.batch(torch.arange(n))
        saved = self.progress.stage_precision.get(str(si))
        dtype = precision.stage_precision(
            net, sample, self.hw, self.recipe.precision, saved, self.dist, self._say
        )
        self.progress.stage_precision[str(si)] = precision.name_of(dtype)
        return dtype

    def _stage_network(self, si: int, stage: StageConfig) -> tuple[int, FeatureCache | None]:
        """Make the stage's groups trainable and its augmentation current, and build its
        feature cache when the recipe wants one and the stage allows it; returns the
        number of trained parameters and the cache."""
        r = self.recipe
        n_train = set_trainable(
            self.model, stage.groups(), bn_update=stage.bn_update, freeze_bn=self.adapted.freeze_bn
        )
        self.train_loader.augment = Augment(**stage.augment_for(r).model_dump())
        self.train_loader.size = stage_size(stage, self.model)
        if not r.feature_cache:
            return n_train, None

        def epochs(sj: int) -> float:  # stage sj's planned length
            return self._stage_steps(sj) / len(self.train_loader)

        cache = self.caches.get(r, si, epochs, self.progress.stage_cached)
        self.cached_val = CachedVal.of(cache)  # where the final evaluation may start
        return n_train, cache

    def _clock(self, si: int, per_epoch: int) -> Replanner:
        done = self.position.epoch * per_epoch + self.position.batch
        return Replanner(self.plan, si, done, dist=self.dist, elapsed=self._elapsed, say=self._say)

    def _say_muon_step(self, optimizer, steps: int) -> None:
        """Say when a short stage raised Muon's step (optim.muon_step); the rate shown is
        the optimizer's own, which a resumed stage restored from its checkpoint."""
        opt = self.recipe.optimizer
        if opt.name != "muon" or muon_step(opt, steps) == opt.muon_lr:
            return
        rates = [g["initial_lr"] for g in optimizer.param_groups if g.get("muon")]
        if not rates:  # no filter bank trains in this stage
            return
        self._say(
            f"muon: step {max(rates):.3g} for this stage's {steps} steps (the recipe's "
            f"{opt.muon_lr:g} is for {opt.muon_lr_steps} or more; a short run takes larger steps)"
        )

    # ------------------------------------------------------------------ epochs

    def _epoch(self, si: int) -> bool:
        """One epoch of stage ``si``: its steps, validation, a metrics row, the guard
        rails, a budget's re-plan, the checkpoint; True when early stopping says stop."""
        st, pos, progress = self.stage, self.position, self.progress
        global_epoch = self._global_epoch(si, pos.epoch) + 1
        st.batches.set_epoch(global_epoch)
        train_mode(self.model, st.config.groups(), st.config.bn_update, self.adapted.freeze_bn)
        stats = self._train_epoch(si, global_epoch)
        val_loss, val_acc = self._validate_agreed()
        if val_acc == val_acc and not math.isfinite(val_loss):  # NaN scores: stop, unsaved
            raise self._diverged(si, global_epoch, val_loss, None)
        self._log_epoch(si, global_epoch, stats, val_loss, val_acc)
        self._check_chance(si, global_epoch, val_acc)
        if pos.epoch + 1 >= self._stage_epochs(si):
            self._check_stage_end(si, val_acc)
        weights = "trained" if self.ema is None else "ema"
        best = progress.record_epoch(
            global_epoch, val_acc, self.recipe.early_stopping.min_delta, weights
        )
        pos.epoch, pos.batch = pos.epoch + 1, 0
        progress.partial = {}
        if self.plan is not None:
            st.clock.replan(min(pos.epoch * len(st.batches), self.plan.stage_steps[si]))
        done_stage = pos.epoch >= self._stage_epochs(si)
        if done_stage and st.lookahead is not None and not st.lookahead_done:
            st.lookahead.finish(self.model)  # a re-plan ended the stage early
        if done_stage:
            self._save(None, None, best=best)
        else:
            self._save(st.optimizer, st.scheduler, best=best)
        patience = self.recipe.early_stopping.patience
        if patience and progress.epochs_since_best >= patience:
            self._say(f"early stopping: no val accuracy gain in {patience} epochs")
            return True
        return False

    def _train_epoch(self, si: int, global_epoch: int) -> dict[str, float]:
        """The epoch's steps (imgclf.train.steps); returns its mean loss and accuracy,
        seconds and images/s, over every rank."""
        st, pos = self.stage, self.position
        per_epoch = len(st.batches)
        first = pos.epoch * per_epoch  # the stage's steps before this epoch
        # A mid-epoch checkpoint's partial sums are the whole job's: rank 0 carries them on.
        partial = self.progress.partial if self.dist.is_main else {}
        after = AfterStep(
            totals=partial or {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0},
            position=pos,
            progress=self.progress,
            dist=self.dist,
            ctrl_c=self.ctrl_c,
            clock=st.clock,
            first=first,
            per_epoch=per_epoch,
            # Steps of this epoch: all of them, except in a budgeted stage's last epoch.
            limit=self._stage_steps(si) - first,
            save=functools.partial(
                self._checkpoint_mid_epoch, optimizer=st.optimizer, scheduler=st.scheduler
            ),
            diverged=functools.partial(self._diverged, si, global_epoch),
            bar=progress_bar(
                per_epoch,
                pos.batch,
                f"epoch {global_epoch}/{self.total_epochs}",
                self.show_progress,
            ),
        )
        st.freeze_due(first + pos.batch, self.dist)
        st.lookahead_done = False
        try:
            train_steps(st, after)
        finally:
            # An immediate interrupt (a second Ctrl-C) saves nothing: it may have landed
            # inside a step, and the previous checkpoint is a consistent one.
            after.bar.close()
        self.progress.seconds += time.perf_counter() - after.started
        acc = after.totals
        acc = self._reduced(
            {**acc, "seconds": acc["seconds"] + time.perf_counter() - after.started}
        )
        count = max(acc["count"], 1)
        return {
            "loss": acc["loss"] / count,
            "acc": acc["correct"] / count,
            "seconds": acc["seconds"],
            "images_per_second": acc["count"] / max(acc["seconds"], 1e-9),
        }

    def _log_epoch(self, si: int, epoch: int, stats: dict, val_loss: float, val_acc: float) -> None:
        pos, st = self.position, self.stage
        row = {
            "stage": si + 1,
            "epoch": epoch,
            "stage_epoch": pos.epoch + 1,
            "lr": lr_of_last_step(st.optimizer, st.scheduler),
            "train_loss": stats["loss"],
            "train_acc": stats["acc"],
            "val_loss": val_loss,
            "val_acc": val_acc,
            "seconds": stats["seconds"],
            "images_per_second": stats["images_per_second"],
        }
        self.hooks("on_epoch_end", epoch=epoch, metrics=row)
        self._say(summary_line(row, self.total_epochs, self.ema is not None))

    def _agreed(self, flag: bool) -> bool:
        """True on every rank when it is true on any (one rank's Ctrl-C stops them all)."""
        return self.dist.any(flag)[0]

    def _reduced(self, acc: dict[str, float]) -> dict[str, float]:
        """Epoch accumulators summed over ranks; time is the slowest rank's."""
        if not self.dist.enabled:
            return acc
        loss, correct, count = self.dist.sum([acc["loss"], acc["correct"], acc["count"]])
        (seconds,) = self.dist.max([acc["seconds"]])
        return {"loss": loss, "correct": correct, "count": count, "seconds": seconds}

    def _diverged(
        self, si: int, global_epoch: int, loss: float, step: int | None, weights=()
    ) -> TrainingDiverged:
        last = self.out / "last.pt"
        kept = last if last.is_file() else None  # finite: _save writes no other
        return TrainingDiverged(diverged_message(loss, si, global_epoch, step, kept, weights))

    # ------------------------------------------------------------------ checkpoints

    def _elapsed(self) -> float:
        """Wall time of this run so far, earlier processes (before a resume) included."""
        return self.wall_base + time.perf_counter() - self.started

    def _save(self, optimizer, scheduler, *, best: bool = False) -> None:
        """``last.pt`` (and ``best.pt``), on rank 0; ``optimizer``/``scheduler`` None at a
        stage's end."""
        self.progress.wall_seconds = self._elapsed()
        state = self._checkpoint(optimizer, scheduler) if self.dist.is_main else None
        # Never a non-finite checkpoint over a good one (the weights were checked at the
        # epoch's last step, an EMA was not); every rank agrees, as all of them save.
        bad = nonfinite(checkpoint_tensors(state)) if state is not None else []
        if self.dist.any(bool(bad))[0]:
            pos = self.position
            epoch = self._global_epoch(pos.stage, pos.epoch) + (pos.batch > 0)
            raise self._diverged(pos.stage, epoch, float("nan"), None, bad or ["on rank 0"])
        if state is None:
            return  # the weights are the same on every rank: rank 0 keeps them
        saves = [("best.pt", best_checkpoint(state))] if best else []
        for name, saved in [*saves, ("last.pt", state)]:
            save_checkpoint(saved, self.out / name)
            self.hooks("on_checkpoint", self.out / name)

    def _checkpoint(self, optimizer, scheduler) -> dict:
        lookahead = self.stage.lookahead if self.stage is not None else None
        ema = self.ema.state_dict() if self.ema is not None else None
        run = (self.model, self.ds, self.recipe, self.position, self.progress, self.plan)
        final = self.final.record() if self.final is not None else None
        return to_checkpoint(*run, optimizer, scheduler, lookahead, ema, final=final)

    def _checkpoint_mid_epoch(self, acc: dict, started: float, optimizer, scheduler) -> None:
        elapsed = time.perf_counter() - started
        self.progress.partial = self._reduced({**acc, "seconds": acc["seconds"] + elapsed})
        self._save(optimizer, scheduler)
        self.progress.partial = {}

    # ------------------------------------------------------------------ validation, guards

    def _validate_agreed(self) -> tuple[float, float]:
        """Rank 0 validates (on its copy of the weights, or of their EMA: the one it saves
        as best.pt) and every rank gets its numbers: early stopping and best.pt are then
        the same decision on all."""
        if not self.dist.enabled:
            return self._validate()
        return self.dist.broadcast(self._validate() if self.dist.is_main else None)

    def _validate(self) -> tuple[float, float]:
        if self.val_loader is None:
            return float("nan"), float("nan")
        cache = self.stage.cache if self.stage is not None else None
        net, batches = validated(self.model, self.ema, cache, self.val_loader)
        logits, labels = infer(net, batches, autocast_dtype=self.hw.autocast_dtype)
        loss = F.cross_entropy(logits, labels).item()
        return loss, (logits.argmax(1) == labels).float().mean().item()

    def _check_chance(self, si: int, epoch: int, val_acc: float) -> None:
        """Warn, once a stage, when validation accuracy is no better than always answering
        the most common class (guards.chance_warning)."""
        labels = self.val_loader.labels if self.val_loader is not None else None
        text = chance_warning(si, epoch, val_acc, majority_rate(labels), self.progress.warnings)
        if text is not None:
            self._warn(text)

    def _check_stage_end(self, si: int, val_acc: float) -> None:
        """Record where stage ``si`` ended and warn when it is below where the previous
        one ended (guards.stage_drop_warning)."""
        ends = self.progress.stage_end_acc
        del ends[si:]  # a resumed stage replaces its own entry
        ends.append(val_acc)
        if si == 0:
            return
        n_val = self.val_loader.num_samples if self.val_loader is not None else 0
        text = stage_drop_warning(si, val_acc, ends[si - 1], n_val)
        if text is not None:
            self._warn(text)

    def _warn(self, text: str) -> None:
        self.progress.warnings.append(text)
        # Printed even with --quiet, like the interrupt line: it changes what to do next.
        if self.dist.is_main:
            tqdm.write(f"warning: {text}", file=sys.stderr)

    def _say(self, text: str) -> None:
        if self.show_progress:
            tqdm.write(text, file=sys.stderr)

    # ------------------------------------------------------------------ run

    def run(self) -> Run:
        """Train in the run folder (``out``), evaluate the best weights and write the rest
        of the run's files; returns the :class:`Run` (other ranks than 0: no summary)."""
        main = self.dist.is_main
        launch_ids = self.dist.gather(distributed.launch_id()) if self.dist.enabled else None
        if main:
            self._open_run_dir(launch_ids)
        self._say(f"run folder: {self.out}")  # known before a kill: what --resume needs
        for note in self.adapted.notes:
            self._say(note)
        self.ensure_plan()
        if self.plan is not None and main:
            # Printed even with --quiet: it says what the budget buys on this machine.
            print(f"plan: {self.plan.text}", file=sys.stderr)
        try:
            with self.ctrl_c:
                self.fit()
        except KeyboardInterrupt:
            # Printed even with --quiet: it is the one line that says how to go on.
            saved = "checkpoint saved" if self.ctrl_c.requested else "not saved mid-step"
            if main:
                print(
                    f"interrupted ({saved}); continue with `imgclf train --resume {self.out}`",
                    file=sys.stderr,
                )
            self.hooks("on_train_end", status="interrupted")
            raise
        except BaseException:
            self.hooks("on_train_end", status="failed")
            raise
        if not main:
            # Rank 0 evaluates and writes the rest alone; the others are done (no
            # collective follows, so a long evaluation cannot time one out).
            return Run(self.out, {})
        summary = finish_run(self._finish_inputs())
        summary["world_size"] = self.dist.world_size
        summary["backend"] = self.dist.backend  # None: one process, no process group
        summary["ema"] = ema_summary(self.recipe, self.progress)  # None: no weight EMA
        write_json(self.out / "summary.json", summary)
        self.hooks("on_train_end", status="finished", summary=summary)
        return Run(self.out, summary)

    def _open_run_dir(self, launch_ids: list[str] | None) -> None:
        """Rank 0's run folder: the launch marker (torchrun), config.yaml, then the
        callbacks' start (metrics.csv and TensorBoard first)."""
        make_folder(self.out, "--out")
        write_launch_marker(self.out, launch_ids)  # torchrun: every node's agent
        run = (self.recipe, self.ds, self.adapted, self.hw, self.threads, self.dist)
        config = config_yaml(*run, self.train_loader, self.final is not None)
        atomic_write_text(self.out / "config.yaml", config)
        self.hooks.open()
        self.hooks("on_train_start")

    def _finish_inputs(self) -> FinishInputs:
        # In FinishInputs' field order.
        run = (self.out, self.model, self.recipe, self.ds, self.val_loader, self.hooks.rows)
        trained = (self.progress, self.plan, len(self.train_loader), self.adapted)
        final = (self.final, self.train_loader.num_samples)
        return FinishInputs(
            *run, *trained, self.hw, self.threads, self.started, *final, self.cached_val
        )
