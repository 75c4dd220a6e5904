"""Hostile and odd data sources (issue #10): no code runs, memory and disk stay bounded,
nothing is lost or merged silently, and mistakes are one ``error:`` line with exit 2.

Every input is built here in ``tmp_path``. Memory cases run the import in a child process
and read its peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_archive, png_bytes, save_array, write_cifar10
from imgclf.data import import_dataset, load_dataset
from imgclf.data.decode import cover_crop, decode, probe
from imgclf.errors import DataError

IMGCLF = Path(sys.executable).with_name("imgclf")


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGCLF_HOME": str(home)}
    return subprocess.run(
        [str(IMGCLF), *args], capture_output=True, text=True, env=env, timeout=300
    )


def peak_rss_mb(*args: str, home: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``imgclf ARGS`` in a grandchild; its peak RSS, measured by the child that waits
    for it (so no earlier child of this test process can raise the figure)."""
    code = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(p.returncode)\n"
    )
    env = {**os.environ, "IMGCLF_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(IMGCLF), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    *rest, kib = proc.stderr.rstrip("\n").split("\n")
    proc.stderr = "\n".join(rest)
    return proc, int(kib) / 1024  # ru_maxrss is in KiB on Linux


def report_rows(home: Path, name: str) -> dict[str, str]:
    with open(home / "datasets" / name / "import-report.csv", newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def small_pngs() -> dict[str, bytes]:
    """Two classes of two 8×8 PNGs each, by member name."""
    out = {}
    for cls, value in (("cat", 40), ("dog", 200)):
        for i in range(2):
            out[f"{cls}/{i}.png"] = png_bytes(np.full((8, 8, 3), value + i, np.uint8))
    return out


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


# ---------------------------------------------------------------- 2a. archive bombs

ZEROS = 300 << 20  # 300 MiB of zeros: ~300 kB deflated


class _Zeros(io.RawIOBase):
    """``n`` zero bytes as a file, never held in memory at once."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def _bomb_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in small_pngs().items():
            zf.writestr(name, data)
        for name in ("cat/zeros.bin", "dog/zeros.png"):
            with zf.open(name, "w", force_zip64=True) as f:
                for _ in range(ZEROS >> 20):
                    f.write(bytes(1 << 20))
    return path


def _bomb_tar_gz(path: Path) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=6) as tf:
        for name, data in small_pngs().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name in ("cat/zeros.bin", "dog/zeros.png"):
            info = tarfile.TarInfo(name)
            info.size = ZEROS
            tf.addfile(info, _Zeros(ZEROS))
    return path


@pytest.mark.parametrize("make", [_bomb_zip, _bomb_tar_gz], ids=["zip", "tar.gz"])
def test_archive_of_zeros_is_streamed_capped_and_reported(tmp_path, imgclf_home, make):
    archive = make(tmp_path / ("bomb.zip" if make is _bomb_zip else "bomb.tar.gz"))
    assert archive.stat().st_size < 2 << 20
    proc, peak = peak_rss_mb("data", "import", str(archive), "--name", "bomb", home=imgclf_home)
    assert proc.returncode == 0, proc.stderr
    print(f"peak RSS {peak:.0f} MB")
    assert peak < 600, f"peak RSS {peak:.0f} MB"
    rows = report_rows(imgclf_home, "bomb")
    assert "not an image" in rows[f"{archive}/cat/zeros.bin"]
    assert "over the 64 MiB limit" in rows[f"{archive}/dog/zeros.png"]
    assert "imported 'bomb': 4 images" in proc.stdout


# ---------------------------------------------------------------- 2b. thin images


def test_thin_png_costs_the_target_size_not_its_cover_scale(tmp_path, imgclf_home):
    src = tmp_path / "thin"
    for cls, value in (("cat", 40), ("dog", 200)):
        for i in range(2):
            save_array(src / cls / f"{i}.png", np.full((32, 32, 3), value, np.uint8))
    strip = np.zeros((1, 300_000, 3), np.uint8)
    strip[0, 150_000 - 8 : 150_000 + 8] = 255  # the centre is white
    save_array(src / "cat" / "strip.png", strip)
    assert (src / "cat" / "strip.png").stat().st_size < 10_000
    proc, peak = peak_rss_mb("data", "import", str(src), "--name", "thin", home=imgclf_home)
    assert proc.returncode == 0, proc.stderr
    assert peak < 600, f"peak RSS {peak:.0f} MB"
    ds = import_dataset(src, "thin-again", val_fraction=0)
    (i,) = [k for k, f in enumerate(ds.files()) if f.endswith("strip.png")]
    assert ds.images[i].shape == (32, 32, 3)
    assert ds.images[i].mean() > 128  # the centre of the strip, scaled up


def test_cover_crop_of_a_thin_strip_equals_scaling_whole_then_cropping():
    # A smooth strip, 2×4000: small enough that the whole-then-crop reference is cheap.
    x = np.linspace(0, 4 * np.pi, 4000)
    row = (127.5 + 127.5 * np.sin(x)).astype(np.uint8)
    strip = np.stack([np.stack([row, row[::-1], row // 2], axis=-1)] * 2)
    whole = Image.fromarray(strip).resize((32_000, 16), Image.Resampling.BICUBIC)
    reference = np.asarray(whole.crop((16_000 - 8, 0, 16_000 + 8, 16)))
    out = cover_crop(strip, (16, 16))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - reference).max() <= 2


# ---------------------------------------------------------------- 3. full disks, kills


def _tiny_tree(root: Path) -> Path:
    for cls, value in (("cat", 40), ("dog", 200)):
        for i in range(2):
            save_array(root / cls / f"{i}.png", np.full((8, 8, 3), value + i, np.uint8))
    return root


def test_temp_folder_of_a_killed_import_is_removed_by_the_next(tmp_path, imgclf_home):
    # A real process makes its temporary folder, as an import does, then dies by SIGKILL.
    code = (
        "import os, signal\n"
        "from imgclf.data.importer import _make_tmp\n"
        "from imgclf.paths import dataset_dir\n"
        "tmp = _make_tmp(dataset_dir('photos'))\n"
        "(tmp / 'images.npy').write_bytes(bytes(1000))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "IMGCLF_HOME": str(imgclf_home)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120)
    assert proc.returncode == -9
    datasets = imgclf_home / "datasets"
    (dead,) = [p for p in datasets.iterdir() if p.name.startswith(".photos.tmp-")]
    alive = datasets / f".other.tmp-{os.getpid()}-abc"  # an import still running here
    alive.mkdir()
    untagged_old = datasets / ".older.tmp-k3j2x"  # made before pids were recorded
    untagged_old.mkdir()
    os.utime(untagged_old, (0, 0))
    import_dataset(_tiny_tree(tmp_path / "src"), "photos")
    left = sorted(p.name for p in datasets.iterdir() if ".v-" not in p.name)
    assert left == [alive.name, "photos"]
    assert not dead.exists()


def test_not_enough_disk_space_is_one_line_before_writing(
    tmp_path, imgclf_home, monkeypatch, capsys
):
    import shutil

    from imgclf.cli import main

    real = shutil.disk_usage

    def nearly_full(path):
        return real(path)._replace(free=1 << 20)

    monkeypatch.setattr("imgclf.data.importer.shutil.disk_usage", nearly_full)
    rc = main(["data", "import", str(_tiny_tree(tmp_path / "src")), "--name", "full"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("error:") == 1 and err.startswith("error:") and len(err.splitlines()) == 1
    assert "not enough disk space" in err and "MiB free" in err
    assert sorted(p.name for p in (imgclf_home / "datasets").iterdir()) == []


def test_disk_full_during_import_is_one_line(tmp_path, imgclf_home, monkeypatch, capsys):
    import errno

    from imgclf.cli import main

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("imgclf.data.importer.np.save", no_space)
    rc = main(["data", "import", str(_tiny_tree(tmp_path / "src")), "--name", "full"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error:") and "disk full" in err
    assert sorted(p.name for p in (imgclf_home / "datasets").iterdir()) == []


# ---------------------------------------------------------------- 11. atomic publish


def _sized_tree(root: Path, per_class: int) -> Path:
    for cls, value in (("cat", 40), ("dog", 200)):
        for i in range(per_class):
            save_array(root / cls / f"{i}.png", np.full((8, 8, 3), value, np.uint8))
    return root


def test_a_load_during_reimports_always_sees_one_version(tmp_path, imgclf_home):
    import threading

    sources = [_sized_tree(tmp_path / "a", 3), _sized_tree(tmp_path / "b", 5)]
    import_dataset(sources[0], "pets", val_fraction=0)
    stop, seen, problems = threading.Event(), set(), []

    def read_forever() -> None:
        while not stop.is_set():
            try:
                ds = load_dataset("pets")
                n = ds.meta["num_samples"]
                if not len(ds.labels) == len(ds.images) == len(ds.files()) == n:
                    problems.append((n, len(ds.labels), len(ds.images)))
                seen.add(n)
            except DataError as exc:  # only "imported again since it was loaded" is fair
                if "imported again" not in str(exc):
                    problems.append(str(exc))

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for k in range(12):
            import_dataset(sources[k % 2 == 0], "pets", val_fraction=0)
    finally:
        stop.set()
        reader.join()
    assert problems == []
    assert seen <= {6, 10}


def test_two_imports_of_one_name_at_once_both_succeed(tmp_path, imgclf_home):
    import threading

    sources = [_sized_tree(tmp_path / "a", 3), _sized_tree(tmp_path / "b", 5)]
    errors: list[BaseException] = []

    def run(src: Path) -> None:
        try:
            import_dataset(src, "pets", val_fraction=0, workers=1)
        except BaseException as exc:
            errors.append(exc)

    for _ in range(4):
        threads = [threading.Thread(target=run, args=(s,)) for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    ds = load_dataset("pets")
    assert len(ds.labels) == ds.meta["num_samples"] in (6, 10)
    entries = sorted(p.name for p in (imgclf_home / "datasets").iterdir())
    assert len(entries) == 2 and entries[1] == "pets"  # one version, no leftovers


# ---------------------------------------------------------------- 5-7. names in archives


def _tar(path: Path, members: list[tuple[str | bytes, bytes]], **kw) -> Path:
    """A tar of (name, data); bytes names are stored exactly as given."""
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w", **kw) as tf:
        for name, data in members:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def _png(value: int) -> bytes:
    return png_bytes(np.full((8, 8, 3), value, np.uint8))


@pytest.mark.parametrize("fmt", [".tar", ".zip"])
def test_unsafe_member_paths_are_reported_never_a_class(tmp_path, imgclf_home, fmt):
    members = [(name, data) for name, data in small_pngs().items()]
    members += [("../evil.png", _png(1)), ("/tmp/x.png", _png(2)), ("cat/../../y.png", _png(3))]
    make = _tar if fmt == ".tar" else _zip
    archive = make(tmp_path / f"unsafe{fmt}", members)
    ds = import_dataset(archive, "unsafe", val_fraction=0)
    assert ds.classes == ["cat", "dog"] and len(ds.labels) == 4
    rows = report_rows(imgclf_home, "unsafe")
    for name in ("../evil.png", "/tmp/x.png", "cat/../../y.png"):
        assert "unsafe path" in rows[f"{archive}/{name}"]
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("fmt", [".tar", ".tar.gz", ".zip"])
def test_duplicate_members_are_reported_and_the_first_copy_kept(tmp_path, imgclf_home, fmt):
    members = [*small_pngs().items(), ("cat/0.png", b"garbage, not a PNG")]
    if fmt == ".zip":
        import warnings

        with warnings.catch_warnings():  # zipfile warns about the duplicate name
            warnings.simplefilter("ignore", UserWarning)
            archive = _zip(tmp_path / "dup.zip", members)
    else:
        archive = _tar(tmp_path / f"dup{fmt}", members)
    ds = import_dataset(archive, "dup", val_fraction=0, image_size=8)
    (i,) = [k for k, f in enumerate(ds.files()) if f.endswith("cat/0.png")]
    assert ds.images[i].max() == 40  # the good first copy, not the garbage
    rows = report_rows(imgclf_home, "dup")
    assert "duplicate archive member" in rows[f"{archive}/cat/0.png"]


def test_zip_with_backslash_paths_is_read_as_folders(tmp_path):
    members = [(name.replace("/", "\\"), data) for name, data in small_pngs().items()]
    ds = import_dataset(_zip(tmp_path / "windows.zip", members), "win", val_fraction=0)
    assert ds.classes == ["cat", "dog"] and len(ds.labels) == 4


def test_latin1_tar_names_stay_two_classes(tmp_path, imgclf_home):
    members = []
    for k, cls in enumerate((b"caf\xe9", b"caf\xe8")):  # café, cafè in latin-1
        for i in range(6):
            members.append((cls + b"/%d.png" % i, _png(50 + 100 * k)))
    archive = _tar(tmp_path / "latin1.tar.gz", members, format=tarfile.GNU_FORMAT)
    proc = run_cli("data", "import", str(archive), "--name", "cafes", home=imgclf_home)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not UTF-8; read them as cp1252" in proc.stderr
    ds = load_dataset("cafes")
    assert ds.classes == ["cafè", "café"]
    assert np.bincount(ds.labels).tolist() == [6, 6]


def _latin1_csv_folder(root: Path) -> Path:
    rows = ["id,label"]
    for i in range(8):
        save_array(root / f"{i}.png", np.full((8, 8, 3), 30 * i, np.uint8))
        rows.append(f"{i},{'café' if i % 2 else 'cafè'}")
    (root.parent / "labels.csv").write_bytes("\n".join(rows).encode("latin-1"))
    return root


def test_latin1_labels_csv_inside_a_folder_keeps_two_classes(tmp_path, imgclf_home):
    src = _latin1_csv_folder(tmp_path / "src" / "images")
    (tmp_path / "src" / "labels.csv").rename(src / "labels.csv")
    proc = run_cli("data", "import", str(src), "--name", "csv-in", home=imgclf_home)
    assert proc.returncode == 0, proc.stderr
    assert "labels.csv: not UTF-8; read as cp1252" in proc.stderr
    assert load_dataset("csv-in").classes == ["cafè", "café"]


def test_latin1_labels_option_is_no_traceback(tmp_path, imgclf_home):
    src = _latin1_csv_folder(tmp_path / "images")
    labels = tmp_path / "labels.csv"
    proc = run_cli(
        "data", "import", str(src), "--labels", str(labels), "--name", "csv-opt", home=imgclf_home
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "not UTF-8" in proc.stderr
    ds = load_dataset("csv-opt")
    assert ds.classes == ["cafè", "café"] and np.bincount(ds.labels).tolist() == [4, 4]


def test_folder_names_that_are_not_utf8_stay_distinct_classes(tmp_path, imgclf_home):
    src = os.fsencode(tmp_path / "src")
    for k, cls in enumerate((b"caf\xe9", b"caf\xe8", "café".encode())):
        folder = os.path.join(src, cls)
        os.makedirs(folder)
        for i in range(2):
            with open(os.path.join(folder, b"%d\xff.png" % i), "wb") as f:
                f.write(_png(40 * k))
    proc = run_cli("data", "import", str(tmp_path / "src"), "--name", "raw", home=imgclf_home)
    assert proc.returncode == 0, proc.stderr
    assert "not UTF-8" in proc.stderr
    ds = load_dataset("raw")
    assert len(ds.classes) == 3 and len(ds.labels) == 6  # café twice would merge: latin-1


# ---------------------------------------------------------------- 4. symbolic links


def test_symlinked_class_folder_is_imported_and_loops_reported(tmp_path, imgclf_home):
    src = _tiny_tree(tmp_path / "src")
    elsewhere = _tiny_tree(tmp_path / "elsewhere")
    (src / "bird").symlink_to(elsewhere / "dog", target_is_directory=True)
    (src / "cat" / "again").symlink_to(src, target_is_directory=True)  # a loop
    (src / "dog" / "gone.png").symlink_to(tmp_path / "missing.png")
    (src / "dog" / "linked.png").symlink_to(src / "cat" / "0.png")
    ds = import_dataset(src, "links", val_fraction=0)
    assert ds.classes == ["bird", "cat", "dog"]
    assert np.bincount(ds.labels).tolist() == [2, 2, 3]
    rows = report_rows(imgclf_home, "links")
    assert "read already" in rows[str(src / "cat" / "again")]
    assert rows[str(src / "dog" / "gone.png")] == "broken symbolic link"


# ---------------------------------------------------------------- 8. EXIF past 64 KiB


def _jpeg_with_late_exif(orientation: int) -> bytes:
    """An 8×16 JPEG (left half black, right half white) whose APP1 Exif segment follows
    two 60 kB comment segments, as it may follow a large ICC profile."""
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, 8:] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    filler = segment(0xFE, bytes(60_000)) * 2
    return jpeg[:2] + filler + segment(0xE1, payload) + jpeg[2:]


def test_exif_orientation_after_64_kib_of_header_segments_is_applied(tmp_path, imgclf_home):
    data = _jpeg_with_late_exif(6)  # rotate 90° clockwise: the white half goes down
    assert data.index(b"Exif\x00") > 65_536
    assert probe(data, None) == (16, 8)
    arr, native, why = decode(data, None, None)
    assert why is None and native == (16, 8) and arr.shape == (16, 8, 3)
    assert arr[:6].mean() < 40 and arr[10:].mean() > 215
    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            (src / cls / f"{i}.jpg").write_bytes(data)
    ds = import_dataset(src, "late-exif", val_fraction=0, image_size=16)
    assert ds.images[0, :5].mean() < 40 and ds.images[0, 11:].mean() > 215


# ---------------------------------------------------------------- 15. minor


def test_class_folder_named_test_in_a_class_tree_is_a_class(tmp_path):
    src = _tiny_tree(tmp_path / "src")
    for i in range(2):
        save_array(src / "test" / f"{i}.png", np.full((8, 8, 3), 120, np.uint8))
    ds = import_dataset(src, "with-test", val_fraction=0)
    assert ds.classes == ["cat", "dog", "test"] and len(ds.labels) == 6
    assert ds.meta["source_shape"] == "class-tree"


def test_data_list_with_imgclf_home_a_file_is_one_error_line(tmp_path):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    proc = run_cli("data", "list", home=home)
    assert_one_error_line(proc, "home-file", "not a folder")
