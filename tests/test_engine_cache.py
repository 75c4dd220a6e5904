"""The feature cache's engine choice, kept per machine and prefix (issue #30, small sets):
a later run takes the kept timings and check instead of timing eager PyTorch and ONNX
Runtime again, and gets the same features; a damaged, malformed or mismatched file or
entry is ignored and rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers_train import import_tiny, metric_rows, tiny_recipe, write_recipe
from imgclf.cli import main
from imgclf.train import prefix_pass, probe_cache
from imgclf.train.feature_cache import FeatureCache
from imgclf.train.recipe import validate


def _head_stage_and_loader(tmp_path: Path):
    """A `complex` net whose first stage trains block3 and the head on a flipped tiny set
    (two cached views), and the training images' loader."""
    from imgclf.data.loader import BatchLoader
    from imgclf.models import create

    ds = import_tiny(tmp_path)
    idx = ds.indices("train")
    loader = BatchLoader(ds.images[idx], ds.labels[idx], batch_size=8, size=16)
    recipe = validate(
        tiny_recipe(
            model="complex",
            augment={"crop_padding": 0, "flip": True},
            stages=[{"epochs": 2, "train": ["block3", "head"]}, {"epochs": 1, "train": "all"}],
        )
    )
    return create("complex", num_classes=3, input_size=16).eval(), recipe, loader


def _timings(monkeypatch, eager_s: float, ort_s: float) -> list[str]:
    """``_seconds`` answers ``eager_s`` for eager PyTorch (a function) and ``ort_s`` for
    ONNX Runtime (a module), and records which it timed."""
    timed: list[str] = []

    def seconds(run, x) -> float:
        ort = isinstance(run, torch.nn.Module)
        timed.append("ort" if ort else "eager")
        return ort_s if ort else eager_s

    monkeypatch.setattr(prefix_pass, "_seconds", seconds)
    monkeypatch.setattr(prefix_pass, "WORTH_SECONDS", 0.0)  # a pass long enough for ORT
    return timed


def _build(model, recipe, loader, said: list[str]) -> FeatureCache:
    cache = FeatureCache.build(model, recipe, recipe.stages[0], loader, None, None, said.append)
    assert cache is not None
    return cache


@pytest.mark.parametrize(("eager_s", "ort_s", "engine"), [(1.0, 0.1, "ONNX"), (0.1, 1.0, "PyT")])
def test_a_kept_choice_gives_the_same_features_without_timing_again(
    tmp_path, monkeypatch, eager_s, ort_s, engine
):
    model, recipe, loader = _head_stage_and_loader(tmp_path)
    timed = _timings(monkeypatch, eager_s, ort_s)
    said: list[str] = []
    first = _build(model, recipe, loader, said)
    assert timed == ["eager", "ort"]  # both engines timed, once each
    assert f"; {engine}" in said[0] and "timed" not in said[0]
    entry = next(iter(json.loads(probe_cache.cache_file("engine").read_text()).values()))
    assert entry["eager"] == eager_s / 8 and entry["ort"] == ort_s / 8 and entry["same"] is True

    timed.clear()
    said.clear()
    monkeypatch.setattr(prefix_pass, "same_activations", _never)
    second = _build(model, recipe, loader, said)
    assert timed == []  # neither engine timed, nor checked, again
    assert f"; {engine}" in said[0]
    if engine == "ONNX":
        assert f"PyTorch's speed, timed {entry['when']})" in said[0]
    assert len(first.features) == len(second.features) == 2
    for a, b in zip(first.features, second.features, strict=True):
        assert torch.equal(a, b)


def _never(got, want) -> bool:
    raise AssertionError("the kept check should have answered")


def test_a_damaged_malformed_or_mismatched_engine_file_is_ignored_and_rewritten(
    tmp_path, monkeypatch
):
    model, recipe, loader = _head_stage_and_loader(tmp_path)
    timed = _timings(monkeypatch, 1.0, 0.1)
    path = probe_cache.cache_file("engine")
    path.parent.mkdir(parents=True)
    said: list[str] = []
    _build(model, recipe, loader, said)
    ((key, good),) = json.loads(path.read_text()).items()
    other = key.replace("graph ", "graph 0")  # another prefix's (or machine's) entry
    damaged = [
        "not json {",
        "[1, 2]",
        json.dumps({key: {"eager": -1.0}}),
        json.dumps({key: {"eager": True}}),
        json.dumps({key: {"eager": 0.1, "ort": 0.01}}),  # ORT timed but no check
        json.dumps({key: {**good, "same": "yes"}}),
        json.dumps({other: good}),
        json.dumps({key: good}) + " " * probe_cache.MAX_BYTES,  # past the size limit
    ]
    for text in damaged:
        path.write_text(text)
        timed.clear()
        said.clear()
        _build(model, recipe, loader, said)
        assert timed == ["eager", "ort"], text  # timed again
        assert "ONNX Runtime" in said[0] and "timed" not in said[0]
        kept = json.loads(path.read_text())  # rewritten, readable, with this prefix's entry
        assert kept[key]["same"] is True and kept[key]["ort"] == 0.1 / 8, text
        if other in text:
            assert kept[other] == good  # another prefix's entry stays


def test_a_kept_disagreement_keeps_pytorch_without_opening_onnx_runtime(tmp_path, monkeypatch):
    model, recipe, loader = _head_stage_and_loader(tmp_path)
    timed = _timings(monkeypatch, 1.0, 0.1)
    monkeypatch.setattr(prefix_pass, "same_activations", lambda got, want: False)
    said: list[str] = []
    _build(model, recipe, loader, said)
    assert said[0] == "feature cache: PyTorch (ONNX Runtime's activations differ from PyTorch's)"
    monkeypatch.setattr(prefix_pass, "same_activations", _never)
    timed.clear()

    def unopened(*args):
        raise AssertionError("the kept check said ONNX Runtime disagrees")

    monkeypatch.setattr(prefix_pass, "_onnx_runner", unopened)
    said.clear()
    _build(model, recipe, loader, said)
    assert timed == []
    assert said[0] == "feature cache: PyTorch (ONNX Runtime's activations differ from PyTorch's)"
    assert "; PyTorch)" in said[1]


def test_a_second_training_run_times_no_engine_and_trains_the_same(tmp_path, monkeypatch, capsys):
    """`imgclf train` twice on one machine: the second run's caches take the kept engine
    choice (no timing), and its metrics are the first run's."""
    import_tiny(tmp_path)
    recipe = tiny_recipe(
        model="complex",
        augment={"crop_padding": 0, "flip": True},
        stages=[{"epochs": 2, "train": ["block3", "head"]}, {"epochs": 1, "train": "all"}],
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    seconds = prefix_pass._seconds
    timed: list[object] = []

    def counting(run, x) -> float:
        timed.append(run)
        return seconds(run, x)

    monkeypatch.setattr(prefix_pass, "_seconds", counting)
    for name in ("first", "second"):
        timed.clear()
        argv = ["train", str(path), "--data", "tiny", "--out", str(tmp_path / name)]
        assert main([*argv, "--quiet"]) == 0
        assert len(timed) == (1 if name == "first" else 0)  # eager (too short for ORT)
    assert metric_rows(tmp_path / "first") == metric_rows(tmp_path / "second")
    assert len(json.loads(probe_cache.cache_file("engine").read_text())) == 1
