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
    target.parent.mkdir(parents=True, exist_ok=True)
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
    folder = target.parent
    while not folder.exists() and folder != folder.parent:  # atomic_path makes the rest
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {target}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"{option} {target}: cannot write in {folder} ({exc.strerror})") from None
