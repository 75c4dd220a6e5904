"""An ensemble folder's ``ensemble.yaml``: its members, their vote, and how far training got.

``imgclf train fast --data D --seeds 3`` (:mod:`imgclf.train.ensemble`) trains one run
folder per member inside one ensemble folder and writes this file beside them; ``eval``,
``predict``, ``export``, ``serve`` and ``report`` read it (:mod:`imgclf.inference.runs`)
and take the folder as one model. Training (below inference) and inference both read it,
so it lives here, with the other files a run leaves (:mod:`imgclf.runtime.schema`).

It is a file a person can edit, copy or damage, so it is read as a recipe is: bounded in
size, ``yaml`` without aliases into plain values (never a Python object, never executed),
and one pydantic schema whose first problem is one line naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgclf.errors import UserError, one_line
from imgclf.io_utils import atomic_write_text
from imgclf.runtime.schema import describe

ENSEMBLE_FILE = "ensemble.yaml"
# A hundred members take a few KB; past this it is not an ensemble file.
MAX_BYTES = 1 << 20
MAX_MEMBERS = 1000
STATES = ("pending", "running", "done")

# What a member's train() options may hold: the command line's values, nothing nested.
_Plain = str | bool | int | float | None
_Option = _Plain | list[_Plain]


class EnsembleFileError(UserError):
    """An ensemble.yaml that is unreadable, not what training wrote, or names a member
    folder that is not there."""


class _NoAliases(yaml.SafeLoader):
    """Safe YAML without aliases: nine lines of them expand to 10⁹ values (the "billion
    laughs", refused in recipes for the same reason: issue #31, item 7)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


class Member(BaseModel):
    """One member: its run folder (a name inside the ensemble folder), what trains it and
    how far it got (``seconds``: its training's wall time in the process that finished it)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(strict=True, min_length=1, max_length=255)
    recipe: str = Field(strict=True, min_length=1)
    set: list[Annotated[str, Field(strict=True)]] = Field(default_factory=list)
    seed: int = Field(strict=True, ge=0, le=2**32 - 1)
    state: Literal["pending", "running", "done"] = "pending"
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @field_validator("path")
    @classmethod
    def _inside(cls, path: str) -> str:
        # A member is a folder inside the ensemble folder, never a path out of it.
        if "/" in path or "\\" in path or path.startswith(".") or "\0" in path:
            raise ValueError(f"{path!r} is not a folder name inside the ensemble folder")
        return path


class EnsembleSpec(BaseModel):
    """The whole file. ``train_options``: the options every member trains with (those of
    :func:`imgclf.train.train` given on the command line, stored so that ``--resume``
    trains the members not started yet as the first command would have)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    name: str = Field(strict=True, min_length=1)
    vote: Literal["hard", "soft", "weighted"] = "soft"
    prefer: list[Annotated[str, Field(strict=True)]] = Field(default_factory=list)
    members: list[Member] = Field(min_length=1, max_length=MAX_MEMBERS)
    data: str | None = Field(None, strict=True)
    train_options: dict[str, _Option] = Field(default_factory=dict)
    time_budget: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleSpec:
        names = [m.path for m in self.members]
        twice = {n for n in names if names.count(n) > 1}
        if twice:
            raise ValueError(f"member folder {sorted(twice)[0]!r} is listed twice")
        unknown = [p for p in self.prefer if p not in names]
        if unknown:
            raise ValueError(f"prefer names {unknown[0]!r}, which is not a member")
        if self.prefer and self.vote != "hard":
            raise ValueError(f"prefer breaks hard-vote ties; it does not apply to vote {self.vote}")
        return self

    def member(self, path: str) -> Member:
        return next(m for m in self.members if m.path == path)


def is_ensemble_dir(path: str | Path) -> bool:
    """Whether ``path`` is an ensemble folder (one holding ensemble.yaml)."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


def read_ensemble(folder: str | Path) -> EnsembleSpec:
    """``folder``'s ensemble.yaml, checked; every problem is one
    :class:`EnsembleFileError` line naming the file and what to do."""
    path = Path(folder) / ENSEMBLE_FILE
    fix = "repair it from ensemble.yaml's own layout, or train the ensemble again"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise EnsembleFileError(f"{path}: larger than {MAX_BYTES >> 10} KiB; {fix}")
        data = yaml.load(raw.decode("utf-8"), Loader=_NoAliases)  # a SafeLoader
    except FileNotFoundError:
        raise EnsembleFileError(f"{path}: no such file; not an ensemble folder") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        why = one_line(str(exc)) or type(exc).__name__
        raise EnsembleFileError(f"{path}: not a readable YAML file ({why}); {fix}") from None
    if not isinstance(data, dict):
        raise EnsembleFileError(f"{path}: not a YAML mapping of keys to values; {fix}")
    try:
        return EnsembleSpec.model_validate(data)
    except ValidationError as exc:
        raise EnsembleFileError(f"{path}: {describe(exc)}; {fix}") from None


def write_ensemble(folder: str | Path, spec: EnsembleSpec) -> None:
    """Write ``spec`` as ``folder``'s ensemble.yaml, atomically (a kill leaves the old
    file or the new one)."""
    head = (
        "# An imgclf ensemble: eval, predict, export, serve and report take this folder as\n"
        "# one model (its members voted as below); `imgclf train --resume FOLDER` finishes it.\n"
    )
    body = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(Path(folder) / ENSEMBLE_FILE, head + body)


def member_dirs(folder: str | Path, spec: EnsembleSpec | None = None) -> list[Path]:
    """The trained members' run folders, in the file's order. A member that is not
    there, or not trained to its end, is one :class:`EnsembleFileError` line."""
    folder = Path(folder)
    spec = spec or read_ensemble(folder)
    where = folder / ENSEMBLE_FILE
    out = []
    for m in spec.members:
        path = folder / m.path
        if not path.is_dir():
            raise missing_member(folder, m)
        if m.state != "done":
            raise EnsembleFileError(
                f"{where}: member {m.path!r} is {m.state}, not trained yet; finish the "
                f"ensemble with `imgclf train --resume {folder}`"
            )
        out.append(path)
    return out


def missing_member(folder: Path, m: Member) -> EnsembleFileError:
    """The error for member ``m`` whose folder is not in ``folder``."""
    return EnsembleFileError(
        f"{folder / ENSEMBLE_FILE}: member {m.path!r}: no such folder {folder / m.path}; "
        "restore it, or delete its entry from ensemble.yaml (and from prefer)"
    )
