"""The trainer: stages in order, one epoch at a time, checkpointed, resumable.

``train(recipe, data)`` builds the model, runs every stage of the recipe (freezing and
unfreezing groups itself), logs each epoch to ``metrics.csv`` and TensorBoard, keeps
``last.pt``/``best.pt`` and finally evaluates the best weights on the validation split.

Resume is exact on CPU: batches are a function of (seed, epoch), the global RNG state is
saved, and a checkpoint taken mid-epoch (Ctrl-C, or every ``checkpoint_minutes``) records
how many batches of that epoch were done, which the resumed run skips. Ctrl-C is acted on
between two steps, never inside one: a checkpoint taken half-way through
``optimizer.step()`` would hold weights that its position says are not updated yet.

Under torchrun the same loop trains data-parallel (imgclf.runtime.distributed): each stage
wraps the trained network in DistributedDataParallel once its trainable set is fixed,
each rank steps through its share of every global batch, metrics are summed over ranks,
rank 0 alone validates (the result is broadcast, so early stopping and best.pt agree
everywhere) and writes the run folder, and every rank agrees at each step on Ctrl-C and
on mid-epoch checkpoints (one small all-reduce), so no rank waits in a collective that
another has left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from imgclf import __version__
from imgclf.data.cache import Dataset, load_dataset
from imgclf.data.loader import Augment, BatchLoader
from imgclf.errors import CheckpointError, DataError, RecipeError, TrainingDiverged
from imgclf.io_utils import atomic_write_text
from imgclf.models import create, model_spec
from imgclf.runtime import distributed
from imgclf.runtime.checkpoint import check_same_dataset, load_resumable, save_checkpoint
from imgclf.runtime.device import Hardware, resolve_device, resolve_hardware, set_threads
from imgclf.runtime.distributed import SINGLE, Dist
from imgclf.train.adapt import Adapted, adapt, class_weights, sample_weights
from imgclf.train.budget import Plan, make_plan, parse_duration
from imgclf.train.choose import choose_recipe
from imgclf.train.feature_cache import FeatureCache
from imgclf.train.lookahead import Lookahead
from imgclf.train.optim import build_optimizer, build_scheduler, muon_step
from imgclf.train.recipe import Recipe, load_recipe, recipe_yaml, validate
from imgclf.train.rundir import (
    MetricsLog,
    TensorBoard,
    check_run_dir,
    claim_run_dir,
    disk_full_is_an_error,
    new_run_dir,
    write_json,
)
from imgclf.train.stages import group_of, resolve_groups, set_trainable, train_mode

# Mid-epoch checkpoints at most this often: cheap insurance for hour-long CPU epochs.
CHECKPOINT_MINUTES = 10.0
# Images used to fit a whitening stem (airbench94 uses 5,000).
WHITENING_IMAGES = 5000
# Validation accuracy this close to the majority-class rate counts as "learned nothing".
CHANCE_MARGIN = 0.02
# A stage ending below the previous one by more than this (or two standard errors of the
# validation accuracy, if larger) is reported.
STAGE_DROP_MIN = 0.01
# Rank 0 of a torchrun job names the job here, so that a restarted job recognises the
# folder its killed first attempt made before any checkpoint (imgclf.runtime.distributed).
LAUNCH_MARKER = ".imgclf-launch"


@dataclass
class Run:
    """A finished (or stopped) run and where its files are."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    def __repr__(self) -> str:
        acc = self.summary.get("val_accuracy")
        return f"Run({str(self.path)!r}, val_accuracy={acc})"


@dataclass
class Position:
    """Where training stands: stage index, epochs done in it, batches done in the next."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Progress:
    best_val_acc: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0
    partial: dict[str, float] = field(default_factory=dict)  # mid-epoch accumulators
    seconds: float = 0.0  # training wall time so far, across resumes
    stage_end_acc: list[float] = field(default_factory=list)  # val accuracy ending each stage
    images_seen: int = 0  # training images processed, across resumes
    wall_seconds: float = 0.0  # wall time of the run's processes up to the last checkpoint
    warnings: list[str] = field(default_factory=list)  # guard-rail warnings, for summary.json


class _CtrlC:
    """While training, the first Ctrl-C only sets ``requested``; the loop checks it between
    steps, checkpoints and raises KeyboardInterrupt. A second Ctrl-C interrupts at once.
    Installed only where Python's own handler is (the main thread, SIGINT not ignored)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _data(data: str | Path | Dataset | None, state: dict | None) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if data is None:
        if state is None:
            raise CheckpointError("no --data given and nothing to resume")
        data = state["dataset"]
    return load_dataset(data)


class Trainer:
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
    ) -> None:
        self.started = started if started is not None else time.perf_counter()
        self.dist = dist
        self.budget_seconds = budget_seconds
        self.plan: Plan | None = None  # a time budget's steps per stage (imgclf.train.budget)
        self.recipe, self.ds, self.out = recipe, ds, out
        self.threads = set_threads(threads)
        self.hw: Hardware = resolve_hardware(device, recipe.precision, recipe.channels_last)
        self.show_progress = progress and dist.is_main  # one process speaks for the job
        dist.check_sync_bn(recipe.sync_bn)
        self.ctrl_c = _CtrlC()
        torch.manual_seed(recipe.seed)
        self.resume_state = state
        self.model = self._build_model()
        self.adapted = adapt(
            recipe,
            model_spec(recipe.model).kind == "pretrained" and recipe.pretrained,
            len(ds.indices("train")),
        )
        if dist.enabled:
            self.adapted = _share_batch(self.adapted, dist)
        self.train_loader, self.val_loader = self._loaders()
        self.loss_weights = (
            class_weights(self.train_loader.labels.cpu().numpy(), len(ds.classes)).to(
                self.hw.device
            )
            if recipe.class_balance == "loss"
            else None
        )
        self.position, self.progress = Position(), Progress()
        self.wall_base = 0.0
        self.cache: FeatureCache | None = None
        self.train_net: torch.nn.Module | None = None  # this stage's DDP wrapper, if any
        self.lookahead: Lookahead | None = None  # this stage's slow weights, if the recipe has it
        self.lookahead_done = False  # the stage's last step has put the slow weights in place
        for stage in recipe.stages:  # bad group names fail now, before any file is written
            resolve_groups(self.model, stage.groups())
            if stage.freeze_after:
                resolve_groups(self.model, list(stage.freeze_after), "freeze_after")
        if recipe.optimizer.bias_lr_groups:
            resolve_groups(self.model, recipe.optimizer.bias_lr_groups, "bias_lr_groups")
        if state is None:
            self._init_from_data()
        else:
            self._restore(state)

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> torch.nn.Module:
        r = self.recipe
        size = r.input_size or model_spec(r.model).input_size
        kwargs = {**r.model_args, "input_size": size}
        if model_spec(r.model).kind == "pretrained":
            # On resume the checkpoint holds the weights: never fetch or read them again.
            fresh = self.resume_state is None
            kwargs.update(
                pretrained=r.pretrained and fresh,
                weights=r.weights if fresh else None,
                head=r.head or None,
            )
        try:
            model = create(r.model, num_classes=len(self.ds.classes), **kwargs)
        except (TypeError, ValueError) as exc:  # bad model_args or input_size in the recipe
            raise RecipeError(f"model {r.model!r}: {exc}") from exc
        memory = torch.channels_last if self.hw.channels_last else torch.preserve_format
        return model.to(self.hw.device, memory_format=memory)

    def _loaders(self) -> tuple[BatchLoader, BatchLoader | None]:
        r, ds, m = self.recipe, self.ds, self.model
        common = dict(
            size=m.input_size,
            mean=m.mean,
            std=m.std,
            channels_last=self.hw.channels_last,
            device=self.hw.device,
        )
        train_idx = ds.indices("train")
        if len(train_idx) == 0:
            raise CheckpointError(f"dataset {ds.name!r} has no training images")
        if len(train_idx) < self.dist.world_size:
            raise DataError(
                f"dataset {ds.name!r} has {len(train_idx)} training images, fewer than the "
                f"{self.dist.world_size} processes: run fewer processes"
            )
        batch = self.adapted.batch_size  # the global batch; each rank takes its share
        labels = ds.labels[train_idx]
        train = BatchLoader(
            ds.images[train_idx],
            labels,
            batch_size=batch // self.dist.world_size,
            shuffle=True,
            augment=Augment(**r.augment.model_dump()),
            seed=r.seed,
            drop_last=len(train_idx) > batch,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            sample_weights=(
                sample_weights(labels, len(ds.classes)) if r.class_balance == "sampler" else None
            ),
            **common,
        )
        val = None
        if ds.has_split("val"):
            val_idx = ds.indices("val")
            val = BatchLoader(
                ds.images[val_idx], ds.labels[val_idx], batch_size=r.eval_batch_size, **common
            )
        return train, val

    def _init_from_data(self) -> None:
        init = getattr(self.model, "init_whitening", None)
        if init is None:
            return
        n = min(WHITENING_IMAGES, self.train_loader.num_samples)
        idx = torch.randperm(
            self.train_loader.num_samples, generator=torch.Generator().manual_seed(self.recipe.seed)
        )[:n]
        init(self.train_loader.batch(idx).float())

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model_state"])
        if state.get("plan"):
            self.plan = Plan.from_dict(state["plan"])  # a resumed run keeps its budget's plan
        pos = state["position"]
        self.position = Position(pos["stage"], pos["epoch"], pos["batch"])
        self.progress = Progress(**state["progress"])
        self.wall_base = self.progress.wall_seconds

    # ------------------------------------------------------------------ state

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

    def _state(self, optimizer, scheduler) -> dict[str, Any]:
        m = self.model
        return {
            "imgclf_version": __version__,
            "model_name": m.name,
            "model_args": m.model_args,
            "class_names": list(self.ds.classes),
            "input_size": m.input_size,
            "mean": list(m.mean),
            "std": list(m.std),
            # What turns a raw file into this model's input (imgclf.data.preprocess):
            # files are cropped to the training cache's size, then resized on the batch.
            "source_size": list(self.ds.image_size),
            "recipe": self.recipe.model_dump(mode="json"),
            "dataset": str(self.ds.root),
            "position": vars(self.position).copy(),
            "progress": vars(self.progress).copy(),
            "model_state": m.state_dict(),
            "optimizer_state": optimizer.state_dict() if optimizer else None,
            "lookahead_state": (
                self.lookahead.state_dict() if optimizer and self.lookahead else None
            ),
            "scheduler_state": scheduler.state_dict() if scheduler else None,
            "torch_rng": torch.get_rng_state(),
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }

    def _elapsed(self) -> float:
        """Wall time of this run so far, earlier processes (before a resume) included."""
        return self.wall_base + time.perf_counter() - self.started

    def _save(self, optimizer, scheduler, *, best: bool = False) -> None:
        self.progress.wall_seconds = self._elapsed()
        if not self.dist.is_main:
            return  # the weights are the same on every rank: rank 0 keeps them
        state = self._state(optimizer, scheduler)
        if best:
            save_checkpoint(state, self.out / "best.pt")
        save_checkpoint(state, self.out / "last.pt")

    # ------------------------------------------------------------------ loop

    def fit(self) -> None:
        r = self.recipe
        if r.sync_bn:  # only now: the budget's probe (rank 0 alone) must not sync anything
            self.model = self.dist.sync_batchnorm(self.model)
        for si, stage in enumerate(r.stages):
            if si < self.position.stage:
                continue
            if si > self.position.stage:
                self.position = Position(si, 0, 0)
            if self.position.epoch >= self._stage_epochs(si):
                continue
            n_train = set_trainable(
                self.model,
                stage.groups(),
                bn_update=stage.bn_update,
                freeze_bn=self.adapted.freeze_bn,
            )
            self.train_loader.augment = Augment(**stage.augment_for(r).model_dump())
            self.cache = None
            if r.feature_cache:
                self.cache = FeatureCache.build(
                    self.model,
                    r,
                    stage,
                    self.train_loader,
                    self.val_loader,
                    self.hw.autocast_dtype,
                    say=self._say,
                    dist=self.dist,
                    with_val=self.dist.is_main,  # rank 0 alone validates
                )
            # Wrapped now that the stage's trainable set and cache are fixed (see
            # Dist.wrap); one process trains the network itself.
            self.train_net = self.dist.wrap(self._net())
            steps = self._stage_steps(si)
            optimizer = build_optimizer(self.model, r, stage, self.adapted.lr_scale, steps)
            # A budgeted stage squeezes or stretches the recipe's schedule onto its planned
            # steps, so it anneals fully whatever the length.
            scheduler = build_scheduler(
                optimizer,
                r.scheduler,
                len(self.train_loader),
                stage.epochs,
                total_steps=functools.partial(self._stage_steps, si) if self.plan else None,
            )
            self.lookahead = Lookahead(self.model, r.lookahead) if r.lookahead else None
            state = self.resume_state
            if state is not None and state.get("optimizer_state") is not None:
                optimizer.load_state_dict(state["optimizer_state"])
                scheduler.load_state_dict(state["scheduler_state"])
                if self.lookahead is not None and state.get("lookahead_state"):
                    self.lookahead.load_state_dict(state["lookahead_state"])
            if state is not None:
                torch.set_rng_state(state["torch_rng"])
                self.resume_state = None
            groups = stage.groups() or ["all"]
            self._say(
                f"stage {si + 1}/{len(r.stages)}: training {', '.join(groups)} "
                f"({n_train:,} parameters) for {self._stage_length(si)}"
            )
            self._say_muon_step(optimizer, steps)
            # Where this stage's clock starts for the budget's re-plans (after its cache).
            self._mark = (
                time.perf_counter(),
                self.position.epoch * len(self._batches()) + self.position.batch,
            )
            while self.position.epoch < self._stage_epochs(si):
                stop = self._epoch(si, stage, optimizer, scheduler)
                if self._agreed(self.ctrl_c.requested):  # during validation or the save
                    raise KeyboardInterrupt
                if stop:
                    return
            self.cache = None
            self.train_net = None
            self.lookahead = None

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

    def _epoch(self, si: int, stage, optimizer, scheduler) -> bool:
        """One epoch; returns True when early stopping says to stop."""
        r, pos = self.recipe, self.position
        global_epoch = self._global_epoch(si, pos.epoch) + 1
        self._batches().set_epoch(global_epoch)
        train_mode(self.model, stage.groups(), stage.bn_update, self.adapted.freeze_bn)
        stats = self._train_epoch(si, global_epoch, optimizer, scheduler, stage)
        val_loss, val_acc = self._validate_agreed()
        row = {
            "stage": si + 1,
            "epoch": global_epoch,
            "stage_epoch": pos.epoch + 1,
            "lr": _lr_of_last_step(optimizer, scheduler),
            "train_loss": stats["loss"],
            "train_acc": stats["acc"],
            "val_loss": val_loss,
            "val_acc": val_acc,
            "seconds": stats["seconds"],
            "images_per_second": stats["images_per_second"],
        }
        self.log.append(row)
        self.tb.log(row)
        self._say(_summary_line(row, self.total_epochs))
        self._check_chance(si, global_epoch, val_acc)
        if pos.epoch + 1 >= self._stage_epochs(si):
            self._check_stage_end(si, val_acc)
        improved = (
            val_acc == val_acc and val_acc > self.progress.best_val_acc + r.early_stopping.min_delta
        )
        no_val = val_acc != val_acc
        if improved or no_val:
            self.progress.best_val_acc = val_acc if improved else self.progress.best_val_acc
            self.progress.best_epoch = global_epoch
            self.progress.epochs_since_best = 0
        else:
            self.progress.epochs_since_best += 1
        pos.epoch, pos.batch = pos.epoch + 1, 0
        self.progress.partial = {}
        if self.plan is not None:
            self._replan(si, min(pos.epoch * len(self._batches()), self.plan.stage_steps[si]))
        done_stage = pos.epoch >= self._stage_epochs(si)
        if done_stage and self.lookahead is not None and not self.lookahead_done:
            self.lookahead.finish(self.model)  # a re-plan ended the stage early
        self._save(
            None if done_stage else optimizer,
            None if done_stage else scheduler,
            best=improved or no_val,
        )
        patience = r.early_stopping.patience
        if patience and self.progress.epochs_since_best >= patience:
            self._say(f"early stopping: no val accuracy gain in {patience} epochs")
            return True
        return False

    def _replan(self, si: int, done: int, epoch_ends: int = 1) -> None:
        """Fit the rest of a budget's plan to the time measured since the last re-plan
        (Plan.keep_to_budget), ``done`` steps into stage ``si``."""
        note = None
        now = time.perf_counter()
        if self.dist.is_main:  # one clock decides: every rank must run the same steps
            window = (now - self._mark[0], done - self._mark[1])
            note = self.plan.keep_to_budget(si, done, self._elapsed(), window, epoch_ends)
        self._mark = (now, done)  # every rank: _replan_due counts steps from here
        if self.dist.enabled:
            steps, note = self.dist.broadcast((self.plan.stage_steps, note))
            self.plan.stage_steps = list(steps)
        if note:
            self._say(note)

    def _replan_due(self, si: int, done: int, epoch_end: int) -> bool:
        """A re-plan within the epoch: every ``replan_every`` steps since the last one,
        unless this epoch's end (which re-plans anyway) is nearer than that."""
        if self.plan is None or self.plan.is_kept(si):
            return False
        every = self.plan.replan_every(si)
        return done - self._mark[1] >= every and epoch_end - done >= every // 2

    def _train_epoch(self, si: int, global_epoch: int, optimizer, scheduler, stage) -> dict:
        r, hw, pos = self.recipe, self.hw, self.position
        # A mid-epoch checkpoint's partial sums are the whole job's: rank 0 carries them on.
        partial = self.progress.partial if self.dist.is_main else {}
        acc = partial or {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
        bar = tqdm(
            total=len(self._batches()),
            initial=pos.batch,
            desc=f"epoch {global_epoch}/{self.total_epochs}",
            disable=not self.show_progress or None,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        last_save = started
        autocast = torch.autocast(
            hw.device.type, dtype=hw.autocast_dtype, enabled=hw.autocast_dtype is not None
        )
        batches = self._batches()
        self._freeze_due(si, stage, pos.epoch * len(batches) + pos.batch)
        net = self.train_net if self.train_net is not None else self._net()
        # Steps of this epoch: all of them, except in a budgeted stage's last epoch.
        limit = self._stage_steps(si) - pos.epoch * len(batches)
        self.lookahead_done = False
        try:
            for step, (x, y) in enumerate(batches.iter_from(pos.batch), start=pos.batch):
                if step >= limit:
                    break
                with autocast:
                    logits = net(x)
                    loss = F.cross_entropy(
                        logits.float(),
                        y,
                        weight=self.loss_weights,
                        label_smoothing=r.label_smoothing,
                    )
                diverged = not torch.isfinite(loss)
                # Data-parallel ranks all step (backward is a collective) and agree below.
                if diverged and not self.dist.enabled:
                    raise self._diverged(loss.item(), si, global_epoch, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if r.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
                optimizer.step()
                scheduler.step()
                if self.lookahead is not None:
                    self._lookahead_step(si, pos.epoch * len(batches) + step + 1)
                n = len(y)
                acc["loss"] += loss.item() * n
                acc["correct"] += (logits.argmax(1) == y).sum().item()
                acc["count"] += n
                self.progress.images_seen += n * self.dist.world_size  # every rank's share
                pos.batch = step + 1
                now = time.perf_counter()
                ips = acc["count"] / max(acc["seconds"] + now - started, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{acc['loss'] / acc['count']:.3f}",
                    acc=f"{acc['correct'] / acc['count']:.3f}",
                    img_s=f"{ips:.0f}",
                    refresh=False,
                )
                interrupt = self.ctrl_c.requested
                save_due = now - last_save > CHECKPOINT_MINUTES * 60
                if self.dist.enabled:  # any rank's reason holds for all of them
                    diverged, interrupt, save_due = self.dist.any(diverged, interrupt, save_due)
                    if diverged:
                        raise self._diverged(loss.item(), si, global_epoch, step)
                if interrupt:
                    self._checkpoint_mid_epoch(acc, started, optimizer, scheduler)
                    raise KeyboardInterrupt
                if save_due:
                    self._checkpoint_mid_epoch(acc, started, optimizer, scheduler)
                    last_save = now
                done = pos.epoch * len(batches) + pos.batch
                if self._replan_due(si, done, pos.epoch * len(batches) + min(len(batches), limit)):
                    self._replan(si, done, epoch_ends=0)
                    limit = self._stage_steps(si) - pos.epoch * len(batches)
        finally:
            # An immediate interrupt (a second Ctrl-C) saves nothing: it may have landed
            # inside a step, and the previous checkpoint is a consistent one.
            bar.close()
        self.progress.seconds += time.perf_counter() - started
        acc = self._reduced({**acc, "seconds": acc["seconds"] + time.perf_counter() - started})
        seconds = acc["seconds"]
        count = max(acc["count"], 1)
        return {
            "loss": acc["loss"] / count,
            "acc": acc["correct"] / count,
            "seconds": seconds,
            "images_per_second": acc["count"] / max(seconds, 1e-9),
        }

    def _lookahead_step(self, si: int, done: int) -> None:
        total = self._stage_steps(si)
        self.lookahead.after_step(self.model, done, total)
        if done >= total:
            self.lookahead.finish(self.model)
            self.lookahead_done = True

    def _freeze_due(self, si: int, stage, done: int) -> None:
        """Stop training the groups of ``stage.freeze_after`` whose share of the stage's
        steps has passed (checked at epoch starts, as airbench freezes its stem bias)."""
        total = self._stage_steps(si)
        due = [g for g, share in stage.freeze_after.items() if done >= share * total]
        if not due:
            return
        names = {n for n, g in group_of(self.model).items() if g in due}
        changed = False
        for name, p in self.model.named_parameters():
            if name in names and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                changed = True
        if changed and self.dist.enabled:  # DDP fixes its trained set when it is built
            self.train_net = self.dist.wrap(self._net())

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

    def _diverged(self, loss: float, si: int, global_epoch: int, step: int) -> TrainingDiverged:
        last = self.out / "last.pt"
        kept = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint"
        where = "" if math.isfinite(loss) else f" {loss}"
        return TrainingDiverged(
            f"loss became{where or ' non-finite on another process'} at stage {si + 1}, "
            f"epoch {global_epoch}, step {step + 1}; lower the learning rate ({kept})"
        )

    def _batches(self):
        """This stage's training batches: cached prefix features, or images."""
        return self.cache if self.cache is not None else self.train_loader

    def _net(self) -> torch.nn.Module:
        return self.cache.suffix if self.cache is not None else self.model

    def _checkpoint_mid_epoch(self, acc: dict, started: float, optimizer, scheduler) -> None:
        elapsed = time.perf_counter() - started
        self.progress.partial = self._reduced({**acc, "seconds": acc["seconds"] + elapsed})
        self._save(optimizer, scheduler)
        self.progress.partial = {}

    def _validate_agreed(self) -> tuple[float, float]:
        """Rank 0 validates (on its copy of the weights, the one it saves) and every rank
        gets its numbers: early stopping and best.pt are then the same decision on all."""
        if not self.dist.enabled:
            return self._validate()
        return self.dist.broadcast(self._validate() if self.dist.is_main else None)

    def _validate(self) -> tuple[float, float]:
        if self.val_loader is None:
            return float("nan"), float("nan")
        from imgclf.evaluate.metrics import infer

        if self.cache is not None and self.cache.val_features is not None:
            logits, labels = infer(
                self.cache.suffix, self.cache.val_batches(), autocast_dtype=self.hw.autocast_dtype
            )
        else:
            logits, labels = infer(
                self.model, self.val_loader, autocast_dtype=self.hw.autocast_dtype
            )
        loss = F.cross_entropy(logits, labels).item()
        return loss, (logits.argmax(1) == labels).float().mean().item()

    # ------------------------------------------------------------------ guard rails

    def _majority_rate(self) -> float:
        labels = self.val_loader.labels if self.val_loader is not None else None
        if labels is None or len(labels) == 0:
            return float("nan")
        return torch.bincount(labels.cpu()).max().item() / len(labels)

    def ensure_plan(self) -> None:
        """Probe and plan a time budget, once (a resumed run already has its plan)."""
        if self.budget_seconds is None or self.plan is not None:
            return
        if not self.dist.enabled:
            self.plan = make_plan(self, self.budget_seconds, self.started)
            return
        # Every rank must run the same steps: rank 0 probes and plans, the rest follow
        # (a budget too short is the same one-line error on every rank).
        outcome: tuple[str, Any] | None = None
        if self.dist.is_main:
            try:
                outcome = ("plan", make_plan(self, self.budget_seconds, self.started).to_dict())
            except RecipeError as exc:
                outcome = ("error", str(exc))
        kind, value = self.dist.broadcast(outcome)
        if kind == "error":
            raise RecipeError(value)
        self.plan = Plan.from_dict(value)

    def _stage_length(self, si: int) -> str:
        if self.plan is None:
            return f"{self.recipe.stages[si].epochs} epochs"
        return f"{self.plan.stage_epochs[si]:.2f} epochs ({self.plan.stage_steps[si]} steps)"

    def _check_chance(self, si: int, epoch: int, val_acc: float) -> None:
        """Warn (once a stage) when validation accuracy is no better than always answering
        the most common class: a run that learns nothing otherwise ends looking normal."""
        majority = self._majority_rate()
        if not val_acc <= majority + CHANCE_MARGIN:
            return
        key = f"stage {si + 1}: "
        if any(w.startswith(key) and "most common class" in w for w in self.progress.warnings):
            return
        self._warn(
            f"{key}epoch {epoch} val accuracy {val_acc:.4f} is no better than always "
            f"answering the most common class ({majority:.4f}, {CHANCE_MARGIN * 100:.0f} "
            "points of margin): the model has learned next to nothing. Likely causes: a "
            "learning rate far too high or too low, labels that do not match the images, "
            "an input size far from the images'. Try --set optimizer.lr=<10x lower>, check "
            "`imgclf data info`, or a recipe made for this data (imgclf recipes)"
        )

    def _check_stage_end(self, si: int, val_acc: float) -> None:
        """Warn when a stage ends below where the previous one ended: fine-tuning that
        undoes what the head stage learned (issue #9: 80.6% → 70.7% on clothing)."""
        ends = self.progress.stage_end_acc
        del ends[si:]  # a resumed stage replaces its own entry
        ends.append(val_acc)
        if si == 0 or not val_acc < ends[si - 1] - self._noise(ends[si - 1]):
            return
        self._warn(
            f"stage {si + 1} ended at val accuracy {val_acc:.4f}, below stage {si}'s "
            f"{ends[si - 1]:.4f}: it undid what the earlier stage learned. Likely causes: "
            "a learning rate too high for the unfrozen layers (lower stages.N.lr or "
            "lower_lr_mult), BatchNorm re-estimated on small batches (--set "
            "batchnorm=frozen), too few images for the layers trained. best.pt keeps the "
            "best epoch, which eval and predict use"
        )

    def _noise(self, accuracy: float) -> float:
        """How far validation accuracy moves by chance: two binomial standard errors
        (2·sqrt(p(1-p)/n), a ~95% band), at least STAGE_DROP_MIN. One photo of 110 is 0.9
        points; with one standard error a 2-photo drop at 97% warned (1 run in 6 by chance
        alone), while the collapse issue #9 reported (80.6% → 70.7% on 341) is 4.6 of them."""
        n = self.val_loader.num_samples if self.val_loader is not None else 0
        se = math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0
        return max(STAGE_DROP_MIN, 2 * se)

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
        main = self.dist.is_main
        self.log: MetricsLog | _Discard = _Discard()  # other ranks write nothing
        self.tb: TensorBoard | _Discard = _Discard()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.dist.enabled:
                atomic_write_text(self.out / LAUNCH_MARKER, distributed.launch_id() + "\n")
            self.log = MetricsLog(self.out / "metrics.csv")
            # A resume drops rows logged after its checkpoint (a kill between two writes).
            self.log.truncate(self._global_epoch(self.position.stage, self.position.epoch))
            atomic_write_text(self.out / "config.yaml", self._config_yaml())
            self.tb = TensorBoard(self.out / "tb")
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
            raise
        finally:
            self.tb.close()
        if not main:
            # Rank 0 evaluates and writes the rest alone; the others are done (no
            # collective follows, so a long evaluation cannot time one out).
            return Run(self.out, {})
        from imgclf.train.finish import finish_run

        summary = finish_run(self)
        summary["world_size"] = self.dist.world_size
        summary["backend"] = self.dist.backend  # None: one process, no process group
        write_json(self.out / "summary.json", summary)
        return Run(self.out, summary)

    def _config_yaml(self) -> str:
        import yaml

        extra = {
            "dataset": {
                "name": self.ds.name,
                "path": str(self.ds.root),
                "classes": self.ds.classes,
            },
            "adapted": {
                "batchnorm": "frozen" if self.adapted.freeze_bn else "train",
                "batch_size": self.adapted.batch_size,
                "lr_scale": self.adapted.lr_scale,
            },
            "hardware": {
                "device": str(self.hw.device),
                "precision": self.hw.precision,
                "channels_last": self.hw.channels_last,
                "threads": self.threads,
                "torch": str(torch.__version__),
            },
            **(
                {
                    "distributed": {
                        "world_size": self.dist.world_size,
                        "backend": self.dist.backend,
                        "batch_per_process": self.train_loader.batch_size,
                    }
                }
                if self.dist.enabled
                else {}
            ),
            "imgclf_version": __version__,
        }
        return recipe_yaml(self.recipe) + yaml.safe_dump(extra, sort_keys=False)


class _Discard:
    """The metrics log and TensorBoard writer of ranks other than 0: they write nothing."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _share_batch(adapted: Adapted, dist: Dist) -> Adapted:
    """The global batch split among the ranks. The recipe's own batch was checked to
    divide (distributed.per_rank_batch); one shrunk for a small data set (adapt) is rounded
    down to a multiple of the processes, the learning rate following linearly as adapt's
    rule does."""
    batch = adapted.batch_size
    if batch % dist.world_size == 0:
        return adapted
    shared = max(dist.world_size, batch - batch % dist.world_size)
    return dataclasses.replace(
        adapted,
        batch_size=shared,
        lr_scale=adapted.lr_scale * shared / batch,
        notes=(
            *adapted.notes,
            f"batch {shared} instead of {batch}: a multiple of the {dist.world_size} processes",
        ),
    )


def _lr_of_last_step(optimizer, scheduler) -> float:
    """The learning rate the epoch's last step used (the first group's); the optimizer
    already holds the next step's, which for StepLR(7) would log epoch 7 at the decayed lr."""
    group = optimizer.param_groups[0]
    return group["initial_lr"] * scheduler.lr_lambdas[0](max(scheduler.last_epoch - 1, 0))


def _summary_line(row: dict, total_epochs: int) -> str:
    val = (
        ""
        if math.isnan(row["val_acc"])
        else f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
    )
    return (
        f"epoch {row['epoch']:>3}/{total_epochs} stage {row['stage']}  lr {row['lr']:.4g}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}{val}  "
        f"{row['seconds']:.1f}s {row['images_per_second']:.0f} img/s"
    )


def train(
    recipe: str | Path | Recipe | dict | None = None,
    data: str | Path | Dataset | None = None,
    *,
    out: str | Path | None = None,
    epochs: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: str | Path | None = None,
    time_budget: str | float | None = None,
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    runs_dir: str | Path = "runs",
    exist_ok: bool = False,
    new_data: bool = False,
) -> Run:
    """Train a recipe on a dataset; returns the :class:`Run` (its folder and summary).
    Without a recipe, one is chosen from the data (:func:`imgclf.train.choose.choose_recipe`).

    ``time_budget`` (``"10m"``, ``"1h30m"``, or seconds): scale every stage to finish,
    evaluation included, within that wall time (:mod:`imgclf.train.budget`).

    One process trains in a run folder at a time (:func:`~imgclf.train.rundir.claim_run_dir`).
    ``out`` may not hold a run already unless ``exist_ok`` (its run files are removed
    first); a resume continues on its checkpoint's data set unless ``new_data``.

    Under torchrun (``torchrun --nproc-per-node N -m imgclf train ...``) it trains
    data-parallel (module docstring); the returned summary is rank 0's, other ranks get an
    empty one. After torchrun restarts a failed job (``--max-restarts``), ``out`` is what
    lets the restarted processes find the run and resume it from its ``last.pt``.

    >>> run = imgclf.train("fast", data="c10", epochs=2)
    >>> run = imgclf.train("fast", data="c10", time_budget="10m")
    """
    started = time.perf_counter()
    env = distributed.from_env()
    if env.enabled and resume is None:
        restarted = _after_restart(Path(out) if out else None, exist_ok, env)
        if restarted is not None:
            resume, exist_ok = restarted
        if resume is not None:  # the checkpoint holds the recipe, its length and plan
            overrides, epochs, time_budget, new_data = (), None, None, False
    budget = None
    if time_budget is not None:
        if resume is not None:
            raise RecipeError("--time: a resumed run keeps the plan of its budget; drop --time")
        if epochs is not None:
            raise RecipeError("--time and --epochs both set the length; give one of them")
        budget = parse_duration(time_budget) if isinstance(time_budget, str) else float(time_budget)
        if not budget > 0:
            raise RecipeError(f"--time {time_budget}: the budget must be more than zero")
    state = None
    if resume is not None:
        resume = Path(resume)
        last = resume / "last.pt" if resume.is_dir() else resume
        state = load_resumable(last)
        rec = validate(state["recipe"], str(last))
        if overrides or epochs:
            raise CheckpointError("--resume continues the saved recipe; drop --set/--epochs")
        if exist_ok:
            raise CheckpointError("--exist-ok starts a fresh run; --resume continues one")
        out_dir = last.parent
    else:
        if recipe is None:
            if data is None:
                raise CheckpointError("give a recipe, --data to choose one for, or --resume")
            recipe, why = choose_recipe(_data(data, None))
            # Printed even with --quiet: it says what is being trained and how to change it.
            if env.is_main:
                print(
                    f"recipe: {recipe}, chosen because {why} (name a RECIPE to override)",
                    file=sys.stderr,
                )
        rec = load_recipe(recipe, overrides, epochs)
        out_dir = Path(out) if out else None
        if new_data:
            raise CheckpointError("--new-data goes with --resume: a fresh run takes any --data")
        # Early, before a model is built; checked again when locked. Rank 0's alone: it
        # holds the lock, and may hold it already when another rank gets here.
        if out_dir is not None and env.is_main:
            check_run_dir(out_dir, exist_ok=exist_ok)
    ds = _data(data, state)
    if state is not None and data is not None and not new_data:
        check_same_dataset(state, ds.root)
    if state is not None and sorted(state["class_names"]) != sorted(ds.classes):
        raise CheckpointError(
            f"checkpoint classes {state['class_names']} do not match data classes {ds.classes}"
        )
    if env.enabled:  # before any process group is joined: one line on every rank
        distributed.per_rank_batch(rec.batch_size, env)
        device, threads = distributed.local_device(device), distributed.default_threads(threads)
    dist = distributed.init(resolve_device(device))
    try:
        trainer = Trainer(
            rec,
            ds,
            out_dir,
            device=device,
            threads=threads,
            progress=progress,
            state=state,
            budget_seconds=budget,
            started=started,
            dist=dist,
        )
        trainer.ensure_plan()  # a budget too short is an error before any folder is made
        if trainer.out is None:  # numbered only now, so a bad recipe leaves no empty folder
            made = new_run_dir(rec.name, Path(runs_dir)) if dist.is_main else None
            trainer.out = dist.broadcast(made)
        with (
            claim_run_dir(trainer.out, exist_ok=exist_ok, resume=state)
            if dist.is_main
            else contextlib.nullcontext(),
            disk_full_is_an_error(trainer.out),
        ):
            return trainer.run()
    finally:
        dist.shutdown()


def _after_restart(out: Path | None, exist_ok: bool, env: Dist) -> tuple[Path | None, bool] | None:
    """After torchrun restarted the job's workers (``--max-restarts``): what to resume,
    as ``(resume, exist_ok)``, or None to start as the command line says.

    The run folder must be known (``--out``): with ``last.pt`` there the run resumes from
    it; without one, a folder whose launch marker names this same torchrun job is the
    first attempt's, killed before its first checkpoint, and is started afresh. A folder
    of anything else is left to the usual checks (a run there is never removed)."""
    count = distributed.restart_count()
    if count == 0:
        return None
    if out is None:
        if env.is_main:
            print(
                f"warning: torchrun restart {count}: without --out the restarted job cannot "
                "find its run folder and starts again in a new one; give --out to resume",
                file=sys.stderr,
            )
        return None
    if (out / "last.pt").is_file():
        if env.is_main:
            print(f"torchrun restart {count}: resuming from {out / 'last.pt'}", file=sys.stderr)
        return out, False
    marker = out / LAUNCH_MARKER
    with contextlib.suppress(OSError):
        if marker.read_text().strip() == distributed.launch_id():
            return None, True  # our own first attempt: replace it
    return None
