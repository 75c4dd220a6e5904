"""Small file helpers shared by every stage that writes results.

Writes are atomic: the content goes to a temporary file in the target's folder and is then
moved over the target with :func:`os.replace`, so a reader (or a run killed half-way) sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imgclf.errors import UserError


def _temp_sibling(path: Path) -> Path:
    # Same folder: os.replace is only atomic within one file system. Hidden, tagged with the
    # pid and a random token so concurrent writers never share a temp file, and ending with
    # the target's suffix so writers that pick a format from the name (savefig) still work.
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.stem}.tmp-{token}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success move it over ``path``.

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    The parent folder is created if missing. The temporary file is not created in
    advance, so writers create it with the usual permissions (umask), unlike mkstemp.

    >>> with atomic_path("model.pt") as tmp:
    ...     torch.save(state, tmp)
    """
    target = Path(path)
    make_folder(target.parent)
    tmp = _temp_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        # After a successful replace the temp name no longer exists; after a failure
        # (including KeyboardInterrupt) this removes the partial file.
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, newlines written exactly as given."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding, newline="") as f:
        f.write(text)


def make_folder(
    folder: str | os.PathLike[str], option: str | None = None, *, instead: str | None = None
) -> None:
    """``mkdir -p folder``; a folder that cannot be made is a :class:`UserError` naming
    what is in the way and, with ``option`` (``--out``), the option to change; ``instead``
    says what else to do (default: choose another ``option``, or another folder).

    Every output folder is made here (and by :func:`atomic_path`, which calls it): a
    broken symbolic link on the way made :meth:`Path.mkdir` raise ``FileExistsError``
    (issue #31), a traceback that named neither the link nor what to do.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = _in_the_way(path, instead or _another(option))
        what = f"{option} {path}" if option else f"cannot create {path}"
        raise UserError(f"{what}: {why or exc.strerror}") from None


def _another(option: str | None) -> str:
    return f"choose another {option}" if option else "choose another folder"


def _in_the_way(folder: Path, instead: str) -> str | None:
    """Why ``folder`` cannot be a folder: a broken symbolic link or a file on its path
    (the first, from the root down); None when nothing is in the way."""
    for part in [*reversed(folder.parents), folder]:
        if part.is_symlink() and not part.exists():  # exists() follows the link
            target = part.parent / os.readlink(part)
            return (
                f"{part} is a broken symbolic link (to {target}); create that folder, "
                f"remove the link, or {instead}"
            )
        if not part.exists():
            return None  # the rest is made by make_folder
        if not part.is_dir():
            return f"{part} is a file, not a folder; move it, or {instead}"
    return None


def check_output_dir(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse now, before any work, an output folder that could not be made or written
    in at the end (as :func:`check_output_file` for a file); nothing is created."""
    _check_folder(Path(path), f"{option} {path}", option)


def check_output_file(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse now, before models load or files decode, an output file that could not be
    written at the end: a folder in its place, a file where its folder should be, or a
    folder this process may not write in (permissions, a read-only file system).

    Writability is tried, not guessed from mode bits (root ignores those; a read-only
    mount does not show in them): an unnamed temporary file is made in the nearest
    existing folder, where :func:`atomic_path` would write, and removed at once.
    """
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {target} is a folder; give a file name in it or elsewhere")
    _check_folder(target.parent, f"{option} {target}", option)


def _check_folder(folder: Path, what: str, option: str) -> None:
    why = _in_the_way(folder, _another(option))
    if why:
        raise UserError(f"{what}: {why}")
    while not folder.exists() and folder != folder.parent:  # make_folder makes the rest
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"{what}: cannot write in {folder} ({exc.strerror})") from None
