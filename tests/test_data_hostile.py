"""Hostile and odd data sources (issue #10): no code runs, memory and disk stay bounded,
nothing is lost or merged silently, and mistakes are one ``error:`` line with exit 2.

Every input is built here in ``tmp_path``. Memory cases run the import in a child process
and read its peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_archive, write_cifar10
from imgclf.data import import_dataset
from imgclf.errors import DataError

IMGCLF = Path(sys.executable).with_name("imgclf")


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGCLF_HOME": str(home)}
    return subprocess.run(
        [str(IMGCLF), *args], capture_output=True, text=True, env=env, timeout=300
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0]


# ---------------------------------------------------------------- 1. pickles are code


class _RunsCode:
    """Unpickling this runs ``touch MARKER``: what a crafted CIFAR batch could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_cifar(root: Path, marker: Path, file: str) -> None:
    write_cifar10(root, per_batch=2)
    payload = {b"label_names": _RunsCode(marker), b"labels": _RunsCode(marker)}
    (root / file).write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("file", ["batches.meta", "data_batch_3"])
def test_crafted_cifar_pickle_in_a_folder_runs_no_code(tmp_path, imgclf_home, file):
    marker = tmp_path / "pwned"
    _evil_cifar(tmp_path / "cifar-10-batches-py", marker, file)
    proc = run_cli("data", "import", str(tmp_path / "cifar-10-batches-py"), home=imgclf_home)
    assert not marker.exists()
    assert_one_error_line(proc, file, "refused", "system")


def test_crafted_cifar_pickle_in_a_tar_gz_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    _evil_cifar(tmp_path / "src" / "cifar-10-batches-py", marker, "batches.meta")
    archive = make_archive(tmp_path / "src", tmp_path / "cifar.tar.gz")
    with pytest.raises(DataError, match=r"cifar.tar.gz/.*batches.meta: refused") as err:
        import_dataset(archive, "evil")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_real_cifar_pickles_still_load_at_every_protocol(tmp_path):
    for protocol in (2, 4, 5):
        root = tmp_path / f"p{protocol}" / "cifar-10-batches-py"
        write_cifar10(root, per_batch=2)
        for f in root.iterdir():
            if f.name != "readme.html":
                obj = pickle.loads(f.read_bytes())
                f.write_bytes(pickle.dumps(obj, protocol=protocol))
        ds = import_dataset(root, f"c{protocol}")
        assert len(ds.labels) == 12
