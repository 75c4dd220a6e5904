"""``imgclf data import|info|list``: output, exit codes, one-line errors, offline CIFAR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from conftest import cache_entries, make_class_tree, save_image, write_cifar10
from imgclf.cli import main
from test_data_import import ERROR_CASES, make_bad_source, source_for


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_prints_one_summary_line(tmp_path, capsys, imgclf_home):
    make_class_tree(tmp_path / "src", {"cat": 10, "dog": 5})
    code, out, err = run(capsys, "data", "import", str(tmp_path / "src"), "--name", "pets")
    assert code == 0 and err == ""
    (line,) = out.splitlines()
    assert line.startswith(
        "imported 'pets': 15 images 8×8, 2 classes (train 13, val 2); 0 skipped;"
    )
    assert line.endswith(f"→ {imgclf_home / 'datasets' / 'pets'}")


def test_import_options(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"cat": 10, "dog": 10})
    argv = ["data", "import", str(tmp_path / "src"), "--name", "p", "--image-size", "12"]
    code, out, _ = run(capsys, *argv, "--val-fraction", "0.3", "--seed", "4")
    assert code == 0
    assert "20 images 12×12, 2 classes (train 14, val 6)" in out
    code, out, _ = run(capsys, "data", "info", "p", "--json")
    info = json.loads(out)
    assert info["val_split"] == {"from": "train", "fraction": 0.3, "seed": 4, "stratified": True}


def test_default_name_is_the_source_name(tmp_path, capsys):
    make_class_tree(tmp_path / "pets", {"cat": 2, "dog": 2})
    main(["data", "import", str(tmp_path / "pets")])
    capsys.readouterr()
    assert run(capsys, "data", "list")[1].startswith("pets\t")


def test_labels_option(tmp_path, capsys):
    for stem, colour in (("1", (255, 0, 0)), ("2", (0, 255, 0)), ("3", (255, 0, 0))):
        save_image(tmp_path / "train" / f"{stem}.png", colour)
    (tmp_path / "trainLabels.csv").write_text("id,label\n1,cat\n2,dog\n3,cat\n")
    argv = [
        "data",
        "import",
        str(tmp_path / "train"),
        "--labels",
        str(tmp_path / "trainLabels.csv"),
    ]
    code, out, _ = run(capsys, *argv, "--val-fraction", "0")
    assert code == 0
    assert "'train': 3 images 8×8, 2 classes (train 3)" in out


def test_bad_files_warn_one_line_each(tmp_path, capsys):
    decode_failures, listed = make_bad_source(tmp_path / "src")
    code, out, err = run(capsys, "data", "import", str(tmp_path / "src"), "--name", "bad")
    assert code == 0
    lines = err.splitlines()
    assert sorted(lines) == sorted(
        f"warning: {p}: skipped: {r}" for p, r in decode_failures.items()
    )
    assert f"; {len(decode_failures) + len(listed)} skipped;" in out


def test_info_text(tmp_path, capsys):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 10, "dog": 20})
    make_class_tree(src / "test", {"cat": 2, "dog": 3})
    (src / "train" / "cat" / "broken.png").write_bytes(b"")
    main(["data", "import", str(src), "--name", "pets", "--seed", "1"])
    capsys.readouterr()
    code, out, _ = run(capsys, "data", "info", "pets")
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == f"source: {src.resolve()} [split-tree]"
    assert lines[2].startswith("images: 35 at 8×8")
    table = [line.split() for line in lines[3:7]]
    assert table == [
        ["class", "train", "test", "val"],
        ["cat", "9", "2", "1"],
        ["dog", "18", "3", "2"],
        ["total", "27", "5", "3"],
    ]
    assert "'fraction': 0.1, 'seed': 1" in lines[7]
    assert lines[8:] == [
        "skipped files: 1",
        f"  {src / 'train' / 'cat' / 'broken.png'}: empty file (0 bytes)",
        # Every image of a class is one solid colour: one exact-copy group per class.
        "exact copies: 2 groups; within train 2, test 2, val 1; "
        "across train↔test 2, train↔val 2, test↔val 2",
        "near duplicates (≤4 bits): 0 groups; within train 0, test 0, val 0; "
        "across train↔test 0, train↔val 0, test↔val 0",
        "warning: class 'cat': 9 training images (fewer than 10): too few to learn or "
        "validate; add images, or merge it into a related class or drop it",
    ]


def test_info_json(tmp_path, capsys, imgclf_home):
    make_class_tree(tmp_path / "src", {"cat": 3, "dog": 2})
    (tmp_path / "src" / "notes.txt").write_text("x")
    main(["data", "import", str(tmp_path / "src"), "--name", "pets", "--val-fraction", "0"])
    capsys.readouterr()
    code, out, _ = run(capsys, "data", "info", "pets", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["name"] == "pets"
    assert info["root"] == str(imgclf_home / "datasets" / "pets")
    assert info["source"] == str((tmp_path / "src").resolve())
    assert info["source_shape"] == "class-tree"
    assert info["classes"] == ["cat", "dog"]
    assert info["num_samples"] == 5
    assert info["image_size"] == [8, 8]
    assert info["counts"] == {"train": {"cat": 3, "dog": 2}}
    assert info["skipped"] == [
        {"path": str(tmp_path / "src" / "notes.txt"), "reason": "not inside a class folder"}
    ]


def test_info_lists_at_most_twenty_skipped_files(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    for i in range(25):
        (tmp_path / "src" / "cat" / f"n{i:02d}.txt").write_text("x")
    main(["data", "import", str(tmp_path / "src"), "--name", "p"])
    capsys.readouterr()
    out = run(capsys, "data", "info", "p")[1].splitlines()
    assert "skipped files: 25" in out
    assert out[out.index("skipped files: 25") + 21].endswith("p/import-report.csv")
    assert sum(line.startswith("  ") for line in out) == 21


def test_list(tmp_path, capsys, imgclf_home):
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    assert out == f"no datasets in {imgclf_home / 'datasets'}; run `imgclf data import SRC`\n"
    make_class_tree(tmp_path / "a", {"cat": 2, "dog": 2})
    make_class_tree(tmp_path / "b", {"cat": 2, "dog": 2, "bird": 1}, size=(16, 16))
    main(["data", "import", str(tmp_path / "b"), "--name", "zoo"])
    main(["data", "import", str(tmp_path / "a"), "--name", "pets"])
    capsys.readouterr()
    code, out, _ = run(capsys, "data", "list")
    assert out.splitlines() == [
        "pets\t4 images\t8×8\t2 classes",
        "zoo\t5 images\t16×16\t3 classes",
    ]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.__name__)
def test_errors_exit_2_with_one_line(tmp_path, capsys, imgclf_home, case):
    src, want = source_for(case, tmp_path)
    code, out, err = run(capsys, "data", "import", str(src), "--name", "broken")
    assert code == 2
    assert out == ""
    error_lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(error_lines) == 1
    assert error_lines[0].startswith("error: ") and want in error_lines[0]
    assert "Traceback" not in err
    assert cache_entries(imgclf_home) == []


def test_unwritable_cache_exit_2(tmp_path, capsys, monkeypatch):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("IMGCLF_HOME", str(tmp_path / "file" / "home"))
    code, _, err = run(capsys, "data", "import", str(tmp_path / "src"))
    assert code == 2
    home = tmp_path / "file" / "home"
    assert err.startswith(f"error: IMGCLF_HOME {home / 'datasets'}: {tmp_path / 'file'} is a file")
    assert err.rstrip().endswith("move it, or choose another IMGCLF_HOME")
    assert err.count("\n") == 1


def test_info_unknown_dataset(capsys):
    code, _, err = run(capsys, "data", "info", "nope")
    assert code == 2
    assert err == (
        "error: no imported dataset 'nope' (cached: none yet); "
        "run `imgclf data import SRC --name NAME` first\n"
    )


def test_bad_option_values_exit_2(tmp_path, capsys):
    for argv in (["--val-fraction", "1.5"], ["--image-size", "0"], ["--image-size", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(["data", "import", str(tmp_path), *argv])
        assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "IMGCLF_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "imgclf", "data", "import", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: {tmp_path / 'missing'}: no such file or folder\n"


# ---------------------------------------------------------------- named datasets


class Offline:
    """Stands in for torchvision's CIFAR10/CIFAR100: every download fails."""

    def __init__(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize(
    "word, archive",
    [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")],
)
def test_named_import_offline_says_how_to_import_a_local_copy(
    tmp_path, capsys, monkeypatch, imgclf_home, word, archive
):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    monkeypatch.chdir(tmp_path)  # no folder named cifar10 here
    code, out, err = run(capsys, "data", "import", word)
    assert code == 2 and out == ""
    assert err == (
        f"error: cannot download {word} (URLError: offline?); fetch "
        f"https://www.cs.toronto.edu/~kriz/{archive} and run "
        f"`imgclf data import PATH/{archive} --name {word}`\n"
    )
    assert cache_entries(imgclf_home) == []


def test_named_import_uses_an_existing_download(tmp_path, capsys, monkeypatch, imgclf_home):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)  # must not be called
    monkeypatch.chdir(tmp_path)
    write_cifar10(imgclf_home / "downloads" / "cifar-10-batches-py", per_batch=4)
    code, out, _ = run(capsys, "data", "import", "cifar10", "--image-size", "16", "--seed", "2")
    assert code == 0
    assert out.startswith(
        "imported 'cifar10': 24 images 16×16, 3 classes (train 17, test 4, val 3)"
    )


def test_a_local_folder_named_cifar10_is_imported_as_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_class_tree(Path("cifar10"), {"cat": 2, "dog": 2})
    code, out, _ = run(capsys, "data", "import", "cifar10", "--val-fraction", "0")
    assert code == 0
    assert "'cifar10': 4 images 8×8, 2 classes (train 4)" in out
