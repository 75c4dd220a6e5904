"""Recipes: one YAML file per experiment, validated, with ``--set`` overrides.

A recipe names the model, input size, augmentation, optimizer, scheduler, batch size and
a list of stages (which parameter groups train, for how long, at what learning rate).
Validation is pydantic's (``extra="forbid"``): an unknown key or a bad value is a one-line
:class:`RecipeError` naming the key and the valid choices.
"""

from __future__ import annotations

import copy
import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from imgclf.errors import RecipeError, one_line

# A recipe file is a few KB (the bundled ones are under 4); past this it is not a recipe,
# and reading it would only cost memory.
MAX_RECIPE_BYTES = 1 << 20


class _RecipeLoader(yaml.SafeLoader):
    """YAML without aliases (``*name``): each one repeats a whole subtree, so nine lines
    of them (the "billion laughs") expand to 10⁹ values when the recipe is validated or
    written out as config.yaml, which hung (issue #31, item 7). A recipe has no use for
    them, and without them the file's size bounds its values."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"alias *{event.anchor} is not allowed in a recipe: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _yaml(text: str) -> Any:
    """``text`` read as a recipe's YAML: safe, without aliases; a structure nested too deep
    for the parser's recursion is a YAMLError like any other."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: no Python objects
    except RecursionError:
        raise yaml.YAMLError("nested too deep") from None


# A run's config.yaml is the resolved recipe plus these facts about the run; reading it
# back as a recipe (to repeat the run) skips them.
RUN_INFO_KEYS = ("dataset", "adapted", "hardware", "distributed", "imgclf_version", "final")


def _not_a_switch(wanted: str) -> BeforeValidator:
    """Refuse YAML's true/false for a number: `decay: false` would otherwise be a silent
    0.0 (bool is an int to pydantic's lax mode); ``wanted`` says what to give instead."""

    def check(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"{wanted}, not {v}")
        return v

    return BeforeValidator(check)


class _Strict(BaseModel):
    # allow_inf_nan=False: `--set optimizer.lr=inf` (or .nan) is a bad value, not a run
    # whose first step fills the weights with NaN (issue #31, item 6).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(_Strict):
    # Pixel counts are strict whole numbers: YAML's `true` is not 1 px (a user who writes
    # `cutout: true` wants some size, and gets an error that asks for one).
    crop_padding: int = Field(0, ge=0, le=64, strict=True)
    # true: each image mirrored with probability 1/2 per epoch; "alternate": a fixed random
    # half mirrored in odd epochs and the other half in even ones (airbench94's
    # derandomised flips, arXiv 2404.00498 §3.6: every image seen both ways every 2 epochs).
    flip: bool | Literal["alternate"] = False
    # Cutout (DeVries & Taylor 2017, arXiv 1708.04552): a square of this many pixels (of the
    # stored image), centred anywhere in it and clipped at its edges, set to the mean
    # colour. airbench96 uses 12 px on 32-px images for its 40-epoch runs.
    cutout: int = Field(0, ge=0, le=1024, strict=True)
    # With random crops, a stage whose frozen prefix is cached (feature_cache) would need
    # the prefix run again every epoch; instead the cache can hold this many fixed views of
    # each image (the image, its mirror with `flip`, then random crops and mirrors drawn
    # once), and each epoch shows one of them per image. 0: no cache for random crops.
    cache_views: int = Field(0, ge=0, le=16, strict=True)


# Largest learning rate accepted: far past any useful one (the bundled recipes' largest is
# 1.3), below float32's largest (3.4e38), where AdamW's step stops on torch's "cannot be
# converted to type float without overflow" instead of an error line. Rates that diverge
# below it are stopped by the weight check (imgclf.runtime.finite).
MAX_LR = 1e30


def _rate(value: float) -> float:
    if value > MAX_LR:
        raise ValueError(f"{value:g} is past any useful learning rate (at most {MAX_LR:g})")
    return value


Rate = Annotated[float, Field(gt=0), AfterValidator(_rate)]


class OptimizerConfig(_Strict):
    # muon: Muon (imgclf.train.muon) for dense convolution filters, this SGD for the rest.
    name: Literal["sgd", "adamw", "muon"] = "sgd"
    lr: Rate = 0.1
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    # Learning-rate multiplier for BatchNorm biases and other 1-D parameters
    # (airbench94 trains its BatchNorm biases 64× faster than the weights).
    # It applies to the parameters of normalization layers (BatchNorm, GroupNorm, LayerNorm).
    bias_lr_mult: float = Field(1.0, gt=0)
    # false: weight decay per step stays the other parameters' under bias_lr_mult (airbench
    # scales "learning rate (but not weight decay) for BatchNorm biases").
    bias_lr_mult_decay: bool = True
    # Parameter groups whose biases also take bias_lr_mult, e.g. [stem]: airbench94_muon
    # trains its whitening layer's bias at the BatchNorm biases' rate.
    bias_lr_groups: list[str] = Field(default_factory=list)
    no_decay_1d: bool = False  # no weight decay on biases and norm parameters
    # name: muon — the filters' rate (an angular step per update, not scaled with the
    # batch), momentum and Newton–Schulz iterations (airbench94_muon: 0.24, 0.6, 3).
    muon_lr: Rate = 0.24
    muon_momentum: float = Field(0.6, ge=0, lt=1)
    muon_ns_steps: int = Field(3, ge=1, le=10)
    # A stage shorter than muon_lr_steps optimizer steps takes a larger step, × sqrt(
    # muon_lr_steps / steps), up to muon_lr_max (imgclf.train.optim.muon_step): a run of
    # fixed-size steps travels about sqrt(steps) × step. Unset: muon_lr whatever the length.
    muon_lr_steps: int | None = Field(None, ge=1)
    muon_lr_max: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _muon_lr_max_above_muon_lr(self) -> OptimizerConfig:
        if self.muon_lr_max is not None and self.muon_lr_max < self.muon_lr:
            raise ValueError(
                f"muon_lr_max ({self.muon_lr_max}) is below muon_lr ({self.muon_lr}): it "
                "caps how far a short stage raises the step; raise it or drop it"
            )
        return self


class LookaheadConfig(_Strict):
    """Lookahead as airbench94 runs it (from hlb-cifar10): every ``every`` steps the slow
    weights move toward the fast ones, slow ← slow + (1 − d)(fast − slow), and the fast
    weights restart from the slow ones. d = decay**every × (progress)**power: near 0 early
    (plain SGD), heavy averaging as the learning rate anneals; the stage ends on the slow
    weights. Ablation (cifar10-zoo airbench_ablations): 14 → 12 epochs to 94%."""

    every: int = Field(5, ge=1)
    decay: float = Field(0.95, gt=0, lt=1)
    power: float = Field(3.0, ge=0)


class EmaConfig(_Strict):
    """An exponential moving average of the weights, as timm's ``ModelEmaV3`` keeps it
    (imgclf.train.ema): after every optimizer step, ema ← ema + (1 − d)(weights − ema) over
    the parameters and floating-point buffers (BatchNorm statistics), integer buffers
    copied. Validation and best.pt use the average; training continues from the weights.

    The average's first update copies the weights (d = 0, as in timm); update t + 1 uses
    d = ``decay``, or with ``warmup`` d = min(decay, 1 − (1 + t)^(−2/3)) (timm's warmup,
    gamma 1, power 2/3: 0.9 at t ≈ 31, 0.99 at 1,000, 0.999 at 31,600), so a short stage
    is not held near its starting weights."""

    decay: Annotated[
        float, _not_a_switch("a number from 0 up to (not including) 1, e.g. 0.999")
    ] = Field(0.999, ge=0, lt=1)
    warmup: bool = True


def _ema_switch(v: Any, expected: str) -> Any:
    """``ema``'s value when it is on/off or settings; anything else is an error that says
    what was ``expected`` (and where a bare number, probably a decay, goes)."""
    if v is None or isinstance(v, bool | dict | EmaConfig):
        return v
    hint = f" (a decay is ema.decay={v})" if isinstance(v, int | float) else ""
    raise ValueError(f"{expected}, not {v!r}{hint}")


class SchedulerConfig(_Strict):
    name: Literal["constant", "step", "multistep", "cosine", "onecycle", "linear"] = "constant"
    step_size: int = Field(7, ge=1)  # epochs, for "step" (the study: StepLR(7, 0.1))
    gamma: float = Field(0.1, gt=0)
    milestones: list[int] = Field(default_factory=list)  # epochs, for "multistep"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_factor: float = Field(0.0, ge=0, le=1)  # floor of cosine/linear/onecycle decay
    pct_start: float = Field(0.25, gt=0, lt=1)  # onecycle: share of steps spent rising
    end_lr_factor: float = Field(0.0, ge=0, le=1)  # onecycle: where the decay ends


class EarlyStopConfig(_Strict):
    patience: int = Field(0, ge=0)  # epochs without a better val accuracy; 0 = off
    min_delta: float = Field(0.0, ge=0)


class HeadConfig(_Strict):
    """A pretrained backbone's new classification head (imgclf.models.backbones.build_head):
    ``linear`` (Dropout, then one Linear layer) or ``mlp`` (Linear, ReLU, Dropout, Linear).
    Unset values take the type's defaults there (dropout 0.0 linear, 0.3 mlp; hidden 512)."""

    type: Literal["linear", "mlp"] = "linear"
    dropout: Annotated[
        float | None, _not_a_switch("a probability from 0 up to (not including) 1")
    ] = Field(None, ge=0, lt=1)
    hidden: int | None = Field(None, ge=1, le=65536, strict=True)

    @model_validator(mode="after")
    def _hidden_is_mlp(self) -> HeadConfig:
        if self.hidden is not None and self.type != "mlp":
            raise ValueError(f"hidden is the mlp head's width; type {self.type} has none")
        return self


class StageConfig(_Strict):
    epochs: int = Field(1, ge=1)
    train: str | list[str] = "all"  # parameter groups: "all", "head", [layer4, head]
    lr: Rate | None = None  # default: optimizer.lr
    # Multiplier for groups outside the last trained one, e.g. 0.1 (discriminative lr).
    lower_lr_mult: float = Field(1.0, gt=0)
    bn_update: bool = False  # frozen BatchNorm layers keep updating running statistics
    # This stage's augmentation, when it differs from the recipe's: e.g. flips only in a
    # head-only stage, so the frozen backbone's features can be cached.
    augment: AugmentConfig | None = None
    # Groups that stop training after this share of the stage's steps, e.g. {stem: 0.3}:
    # airbench94 trains its whitening-layer bias for 3 of 10 epochs, then freezes it
    # (no accuracy change, less backward work). A share keeps it right under --epochs/--time.
    freeze_after: dict[str, float] = Field(default_factory=dict)
    # true: a group of freeze_after runs the stage's schedule squeezed onto its own steps,
    # so its rate reaches the schedule's end (0 for linear) at its freeze point instead of
    # stopping mid-curve (airbench94_muon anneals its whitening bias over its 3 epochs).
    freeze_anneal: bool = False
    # Training images' size in this stage, when it differs from the model's input size
    # (validation, evaluation and prediction stay at that): FixRes (Touvron et al. 2019,
    # "Fixing the train-test resolution discrepancy") trains at about 0.8× the test size
    # for the same or better accuracy at 0.64× the pixels.
    input_size: int | None = Field(None, ge=8, le=2048, strict=True)
    # true/false: this stage updates (and validates) the recipe's weight EMA or not, e.g.
    # only the fine-tuning stage; unset: it does when the recipe has an `ema` block.
    ema: bool | None = None
    # This stage's schedule when it is not the recipe's: the stage `--resume RUN --epochs N`
    # adds (imgclf.train.more) runs constant at the last rate, or a cosine decay.
    scheduler: SchedulerConfig | None = None
    name: str = ""

    @field_validator("ema", mode="before")
    @classmethod
    def _ema_on_off(cls, v: Any) -> Any:
        if isinstance(v, dict | EmaConfig):
            raise ValueError("true or false here; the EMA's settings are the recipe's `ema` block")
        return _ema_switch(v, "true or false")

    @field_validator("train")
    @classmethod
    def _groups(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("train: give at least one parameter group, or 'all'")
        return v

    @field_validator("freeze_after")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not 0 <= x <= 1}
        if bad:
            raise ValueError(f"freeze_after: shares of the stage between 0 and 1, got {bad}")
        return v

    def augment_for(self, recipe: Recipe) -> AugmentConfig:
        return self.augment or recipe.augment

    def groups(self) -> list[str] | None:
        """Group names, or None for every parameter."""
        if self.train == "all" or self.train == ["all"]:
            return None
        return [self.train] if isinstance(self.train, str) else list(self.train)


class Recipe(_Strict):
    """A whole experiment as data: model, input size, augmentation, optimizer, schedule,
    batch, stages and switches. Built by :func:`load_recipe` (YAML, ``--set``, ``--epochs``)."""

    name: str = "custom"
    description: str = ""
    model: str
    # The model's own keyword arguments (its builder refuses unknown ones): numbers,
    # strings, true/false or lists of them, never nested deeper.
    model_args: dict[str, Any] = Field(default_factory=dict)
    input_size: int | None = Field(None, ge=8, le=1024)  # default: the model's own
    batch_size: int = Field(256, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    lookahead: LookaheadConfig | None = None
    # Weight EMA (EmaConfig), off unless given; `ema: true` takes the defaults. A stage's
    # own `ema: true/false` turns it on or off there.
    ema: EmaConfig | None = None
    early_stopping: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    stages: list[StageConfig] = Field(default_factory=lambda: [StageConfig()], min_length=1)
    # torch, numpy and the loaders seed their generators from it (and from it plus small
    # offsets): 0 to 2**32 - 1, numpy's range; past 2**63 torch.manual_seed overflowed.
    seed: int = Field(0, ge=0, le=2**32 - 1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    # Frozen-prefix feature cache for stages that freeze a prefix with fixed views
    # (imgclf.train.feature_cache); off only to compare against the uncached path.
    feature_cache: bool = True
    # How cached activations are stored: fp16 halves their memory (relative error 5e-4,
    # below bf16 training's own); auto: fp16 once fp32 would take FP16_ABOVE_GB
    # (imgclf.train.feature_cache), so small caches reproduce the uncached path exactly.
    feature_cache_dtype: Literal["auto", "fp32", "fp16"] = "auto"
    tta: bool = False  # evaluate with flipped (and shifted) views averaged
    # Data-parallel training (torchrun): BatchNorm statistics over the global batch instead
    # of each process's share (torch.nn.SyncBatchNorm; GPUs only). No effect in one process.
    sync_bn: bool = False
    # BatchNorm while training: "frozen" keeps every BatchNorm layer on its running
    # statistics (eval mode; scale and shift still learn), "train" normalizes trained
    # layers by batch statistics, "auto" is "frozen" for a pretrained backbone on a data
    # set under FREEZE_BN_BELOW training images (imgclf.train.adapt) and "train"
    # otherwise.
    batchnorm: Literal["auto", "frozen", "train"] = "auto"
    # Unbalanced classes: weight the loss by inverse class frequency, or draw each epoch's
    # samples with class-balanced probabilities; "none" trains on the data as it is.
    class_balance: Literal["none", "loss", "sampler"] = "none"
    # Small data sets: the batch shrinks (and the learning rate with it, linearly) until an
    # epoch has at least this many optimizer steps; 0 turns it off.
    min_steps_per_epoch: int = Field(0, ge=0)
    # Transfer learning (pretrained backbones): weights file and head.
    pretrained: bool = True
    weights: str | None = None
    # A run (or checkpoint) whose weights this run starts from, classes matched by name
    # (`--init RUN`, imgclf.train.init_from); nothing is downloaded then.
    init: str | None = None
    # A pretrained model's new head (HeadConfig); None (or {}): the linear default.
    head: HeadConfig | None = None

    @field_validator("channels_last", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean: `channels_last: off` means "off".
        if isinstance(v, bool):
            return "on" if v else "off"
        return v

    @field_validator("model_args")
    @classmethod
    def _plain_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            items = value if isinstance(value, list | tuple) else [value]
            if not all(x is None or isinstance(x, bool | int | float | str) for x in items):
                nested = isinstance(value, list | tuple)
                what = "a list of lists or mappings" if nested else type(value).__name__
                raise ValueError(
                    f"{key}: a number, string, true/false or a list of them, not {what}"
                )
        return v

    @field_validator("head", mode="before")
    @classmethod
    def _empty_head(cls, v: Any) -> Any:
        return None if v == {} else v  # recipes and checkpoints before HeadConfig had {}

    @field_validator("ema", mode="before")
    @classmethod
    def _ema_true_false(cls, v: Any) -> Any:
        v = _ema_switch(v, "a mapping such as {decay: 0.999, warmup: true}, or true/false")
        return {} if v is True else None if v is False else v

    def ema_for(self, stage: StageConfig) -> EmaConfig | None:
        """The EMA settings ``stage`` trains with, None when it keeps no EMA."""
        if stage.ema is None:
            return self.ema
        return (self.ema or EmaConfig()) if stage.ema else None

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def with_epochs(self, total: int) -> Recipe:
        """Share ``total`` epochs among the stages in proportion, each stage at least 1."""
        if total < len(self.stages):
            raise RecipeError(
                f"--epochs {total}: this recipe has {len(self.stages)} stages, "
                "each needs at least 1 epoch"
            )
        old = [s.epochs for s in self.stages]
        share = [total * e / sum(old) for e in old]
        # Largest remainders (Hamilton's method): each stage within 1 of its exact share,
        # a longer stage never shorter than a shorter one, and the sum exact. Raising a
        # share below 1 to 1 is paid by the stages most over their shares.
        new = [max(1, math.floor(x)) for x in share]
        while sum(new) < total:
            new[max(range(len(new)), key=lambda i: share[i] - new[i])] += 1
        while sum(new) > total:
            over = [i for i in range(len(new)) if new[i] > 1]
            new[max(over, key=lambda i: new[i] - share[i])] -= 1
        stages = [s.model_copy(update={"epochs": n}) for s, n in zip(self.stages, new, strict=True)]
        return self.model_copy(update={"stages": stages})


def recipes_dir() -> Path:
    return Path(str(resources.files("imgclf") / "recipes"))


def list_recipes() -> dict[str, str]:
    """Bundled recipe names → descriptions."""
    out = {}
    for path in sorted(recipes_dir().glob("*.yaml"), key=lambda p: p.stem):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", ""))
    return out


def _recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        return path
    bundled = recipes_dir() / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(list_recipes())
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RecipeError(
        f"unknown recipe {str(name_or_path)!r}; {hint}choose one of: {', '.join(names)} "
        "(or give a path to a .yaml file)"
    )


def load_recipe(
    name_or_path: str | Path | dict | Recipe,
    overrides: list[str] | tuple[str, ...] = (),
    epochs: int | None = None,
) -> Recipe:
    """Read, override (``key.sub=value``, values in YAML syntax) and validate a recipe."""
    if isinstance(name_or_path, Recipe):
        data = name_or_path.model_dump()
        where = name_or_path.name
    elif isinstance(name_or_path, dict):
        # A deep copy: --set overrides write into nested dicts, not into the caller's.
        data, where = copy.deepcopy(name_or_path), "recipe"
    else:
        path = _recipe_path(name_or_path)
        where = str(path)
        try:
            data = _yaml(_read_recipe_text(path))
        except UnicodeDecodeError:
            raise RecipeError(
                f"{path}: not a text file (a recipe is YAML text; name a .yaml file)"
            ) from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({one_line(str(exc))})") from exc
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping of keys to values")
        for key in RUN_INFO_KEYS:
            data.pop(key, None)
        data.setdefault("name", path.stem)
    for item in overrides:
        apply_override(data, item)
    recipe = validate(data, where)
    if epochs is not None:
        recipe = recipe.with_epochs(epochs)
    return recipe


def _read_recipe_text(path: Path) -> str:
    """The recipe file's text, refused past MAX_RECIPE_BYTES before more is read."""
    with open(path, "rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: larger than {MAX_RECIPE_BYTES // 1024} KiB, too large for a recipe "
            "(a recipe is a short YAML file; name a .yaml file)"
        )
    return raw.decode("utf-8")


# Keys that recipes once had and no longer do: the value that meant "off" is dropped, so a
# checkpoint saved before the key went still resumes; any other value is an error that
# says why the key went.
RETIRED = {"compile": False}
RETIRED_WHY = {
    # Never read (issue #29). Wiring it in was measured (issue #32, item 6): a compiled
    # training step of the fast net ran 0.94x the speed of eager on the 2-core AVX2 EPYC
    # (benchmarks/bench_compile.py, docs/benchmarks.md §13), after ~47 s of compilation.
    "compile": "torch.compile was not faster than eager for a training step on a CPU "
    "(docs/benchmarks.md §13) and this key never had an effect; delete the line",
}


def validate(data: dict, where: str = "recipe") -> Recipe:
    """A :class:`Recipe` from a plain dict (a YAML file's, or a checkpoint's ``recipe``);
    every problem is one :class:`RecipeError` line that starts with ``where``."""
    data = _drop_retired(data, where)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{where}: {_describe(exc)}") from exc


def _drop_retired(data: dict, where: str) -> dict:
    if not isinstance(data, dict) or not RETIRED.keys() & data.keys():
        return data
    data = dict(data)
    for key, off in RETIRED.items():
        if key in data and data.pop(key) != off:
            raise RecipeError(f"{where}: {key}: was removed: {RETIRED_WHY[key]}")
    return data


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        valid = ", ".join(parent.model_fields) if parent else "see the docs"
        msg = f"unknown key {loc!r}; valid keys here: {valid}"
    else:
        # Our own validators' messages read whole without pydantic's "Value error, " prefix.
        msg = f"{loc}: {err['msg'].removeprefix('Value error, ')}"
    more = len(exc.errors()) - 1
    return msg + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        sub = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in sub if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def apply_override(data: dict, item: str) -> None:
    """Apply ``a.b.c=value`` to nested dicts/lists (list parts are indices: stages.0.lr)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. optimizer.lr=0.05")
    key, _, raw = item.partition("=")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {part!r} is not an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])!r} is not a mapping")
        if last:
            node[part] = value
        else:
            if part == "stages" and part not in node:
                node[part] = [{}]
            if node.get(part) is None:  # absent, or null: `lookahead: null`, a dumped `head`
                node[part] = {}
            node = node[part]


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
