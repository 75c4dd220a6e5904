"""The frozen-prefix feature cache gives the uncached path's results, and is used only
when a stage freezes a prefix with fixed views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_train import import_tiny, tiny_recipe
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train import train
from imgclf.train.recipe import validate as validate_recipe
from imgclf.train.rundir import read_metrics


def _staged(**changes) -> dict:
    recipe = tiny_recipe(
        model="complex",
        augment={"crop_padding": 0, "flip": False},
        stages=[{"epochs": 2, "train": ["block3", "head"]}, {"epochs": 1, "train": "all"}],
    )
    recipe.update(changes)
    return recipe


def _run(tmp_path: Path, name: str, ds, **changes):
    return train(_staged(**changes), ds, out=tmp_path / name, progress=False, threads=1)


def test_cached_stage_equals_uncached(tmp_path: Path) -> None:
    ds = import_tiny(tmp_path)
    cached = _run(tmp_path, "cached", ds)
    plain = _run(tmp_path, "plain", ds, feature_cache=False)
    a = load_checkpoint(cached.last)["model_state"]
    b = load_checkpoint(plain.last)["model_state"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-4), key
    rows_a, rows_b = (
        read_metrics(cached.path / "metrics.csv"),
        read_metrics(plain.path / "metrics.csv"),
    )
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for col in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert ra[col] == pytest.approx(rb[col], abs=1e-4), (ra["epoch"], col)


def test_cache_used_only_for_frozen_prefix(tmp_path: Path, capsys) -> None:
    from imgclf.data.loader import BatchLoader
    from imgclf.models import create
    from imgclf.train.feature_cache import FeatureCache
    from imgclf.train.recipe import validate

    ds = import_tiny(tmp_path)
    model = create("complex", num_classes=3, input_size=16)
    idx = ds.indices("train")
    loader = BatchLoader(ds.images[idx], ds.labels[idx], batch_size=8, size=16)
    recipe = validate(_staged())
    msgs: list[str] = []
    head_only = FeatureCache.build(model, recipe, recipe.stages[0], loader, None, None, msgs.append)
    assert head_only is not None and "feature cache" in msgs[0]
    # Everything trains: nothing to cache.
    assert (
        FeatureCache.build(model, recipe, recipe.stages[1], loader, None, None, msgs.append) is None
    )
    # Random crops change the prefix's input every epoch: not cacheable.
    cropped = validate(_staged(augment={"crop_padding": 2, "flip": False}))
    assert FeatureCache.build(model, cropped, cropped.stages[0], loader, None, None, print) is None
    # Flips are a fixed set of two views: cached, twice.
    flipped = validate(_staged(augment={"crop_padding": 0, "flip": True}))
    cache = FeatureCache.build(model, flipped, flipped.stages[0], loader, None, None, print)
    assert cache is not None and len(cache.features) == 2
    assert not torch.allclose(cache.features[0], cache.features[1])


def test_cache_over_both_limits_is_skipped_with_its_size(tmp_path: Path, monkeypatch) -> None:
    from imgclf.data.loader import BatchLoader
    from imgclf.models import create
    from imgclf.train.feature_cache import FeatureCache
    from imgclf.train.recipe import validate

    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_GB", "0.000001")
    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_DISK_GB", "0.000001")
    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_DIR", str(tmp_path / "spill"))
    ds = import_tiny(tmp_path)
    idx = ds.indices("train")
    loader = BatchLoader(ds.images[idx], ds.labels[idx], batch_size=8, size=16)
    recipe = validate(_staged())
    msgs: list[str] = []
    model = create("complex", num_classes=3, input_size=16)
    assert (
        FeatureCache.build(model, recipe, recipe.stages[0], loader, None, None, msgs.append) is None
    )
    assert msgs[0].startswith(
        "feature cache skipped: it needs 0.0 GB, over the limit of 0.0 GB in memory"
    )
    for setting in ("IMGCLF_FEATURE_CACHE_GB", "IMGCLF_FEATURE_CACHE_DISK_GB", "spill"):
        assert setting in msgs[0]
    assert not (tmp_path / "spill").exists()


def test_limits_are_half_the_free_memory_and_disk_at_most(tmp_path: Path, monkeypatch) -> None:
    from imgclf.train import cache_store

    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_GB", "1000")
    monkeypatch.setattr(cache_store, "free_memory", lambda: 2.0 * 2**30)
    assert cache_store.memory_limit_bytes() == 2**30
    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_DISK_GB", "1000")
    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_DIR", str(tmp_path / "not" / "yet"))
    monkeypatch.setattr(cache_store.shutil, "disk_usage", lambda p: type("U", (), {"free": 8.0}))
    assert cache_store.disk_limit_bytes() == 4.0
    # Over memory, under disk: memory-mapped, unless it cannot be.
    placed = cache_store.place(torch.float16, 3.0 * 2**30)
    assert isinstance(placed, str) and "over the limit of 0.0 GB on disk" in placed
    monkeypatch.setattr(cache_store.shutil, "disk_usage", lambda p: type("U", (), {"free": 1e12}))
    placed = cache_store.place(torch.float16, 3.0 * 2**30)
    assert isinstance(placed, cache_store.Placement)
    assert placed.directory == tmp_path / "not" / "yet"
    said = cache_store.place(torch.float16, 3.0 * 2**30, "data-parallel caches are not mapped")
    assert isinstance(said, str) and said.endswith("data-parallel caches are not mapped")


def test_memory_mapped_cache_trains_as_the_cache_in_memory(tmp_path: Path, monkeypatch) -> None:
    """Over the memory limit, the activations go to an unlinked file on disk: the run is
    the in-memory run, and nothing is left in the folder."""
    ds = import_tiny(tmp_path)
    in_memory = _run(tmp_path, "memory", ds)
    spill = tmp_path / "spill"
    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_GB", "0.000001")
    monkeypatch.setenv("IMGCLF_FEATURE_CACHE_DIR", str(spill))
    said: list[str] = []
    import imgclf.train.cache_store as cache_store

    real = cache_store.Placement.empty

    def watched(self, shape):
        out = real(self, shape)
        said.append(str(self.directory))
        assert list(spill.iterdir()) == []  # unlinked as soon as mapped
        return out

    monkeypatch.setattr(cache_store.Placement, "empty", watched)
    mapped = _run(tmp_path, "mapped", ds)
    assert said and all(d == str(spill) for d in said)
    a = load_checkpoint(in_memory.last)["model_state"]
    b = load_checkpoint(mapped.last)["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert list(spill.iterdir()) == []


def test_stage_augment_override_enables_cache(tmp_path: Path) -> None:
    """Crops for the recipe, flips only in the head stage: that stage is cached, and the
    next stage trains with the recipe's crops again."""
    ds = import_tiny(tmp_path)
    recipe = _staged(
        augment={"crop_padding": 2, "flip": True},
        stages=[
            {"epochs": 3, "train": ["head"], "augment": {"crop_padding": 0, "flip": True}},
            {"epochs": 1, "train": "all"},
        ],
    )
    msgs: list[str] = []
    from imgclf.train.recipe import validate
    from imgclf.train.trainer import Trainer

    trainer = Trainer(
        validate(recipe),
        ds,
        tmp_path / "run",
        progress=True,
        threads=1,
    )
    trainer._say = msgs.append
    trainer.run()
    assert any("feature cache: 2 view(s)" in m for m in msgs)
    assert trainer.train_loader.augment.crop_padding == 2  # stage 2 restored the crops


# ---------------------------------------------------------------- crop views, engines


def _loader_and_model(tmp_path: Path):
    from imgclf.data.loader import BatchLoader
    from imgclf.models import create

    ds = import_tiny(tmp_path)
    idx = ds.indices("train")
    loader = BatchLoader(ds.images[idx], ds.labels[idx], batch_size=8, size=16)
    return loader, create("complex", num_classes=3, input_size=16).eval()


def test_crop_views_are_fixed_per_sample_and_match_the_prefix_on_those_crops(tmp_path):
    """cache_views with random crops: view 0 is the image, 1 its mirror, 2.. crops (and
    mirrors) drawn once per sample, the same whichever batch computes them; the cached
    activations are the prefix's on exactly those pixels."""
    from imgclf.train.feature_cache import FeatureCache, View
    from imgclf.train.recipe import validate

    loader, model = _loader_and_model(tmp_path)
    aug = {"crop_padding": 3, "flip": True, "cache_views": 4}
    recipe = validate(_staged(augment=aug))
    cache = FeatureCache.build(model, recipe, recipe.stages[0], loader, None, None, print)
    assert cache is not None and cache.views == 4 and len(cache.features) == 4
    n, h, w = loader.images.shape[:3]
    crop = View(2, False, 3, loader.seed)
    draws = crop.draws(n)
    whole = View.indices(draws, torch.arange(n), h, w)
    part = View.indices(crop.draws(n), torch.tensor([5, 1]), h, w)
    assert torch.equal(part[0], whole[0][[5, 1]]) and torch.equal(part[1], whole[1][[5, 1]])
    moved = (whole[0][:, 0] - 0).abs().max()  # row 0's source: within the padding
    assert 0 < moved <= 3
    prefix, _ = model.split_at("block3")
    with torch.inference_mode():
        plain = prefix(loader.batch(torch.arange(n)))
        mirrored = prefix(loader.batch(torch.arange(n)).flip(-1))
        cropped = prefix(loader.batch(torch.arange(n), view=whole))
    assert torch.allclose(cache.features[0], plain, atol=1e-5)
    assert torch.allclose(cache.features[1], mirrored, atol=1e-5)
    assert torch.allclose(cache.features[2], cropped, atol=1e-5)
    assert not torch.allclose(cache.features[2], cache.features[3])  # two draws differ
    # Without cache_views, random crops stay uncached (a new crop every epoch).
    uncached = validate(_staged(augment={"crop_padding": 3, "flip": True}))
    assert FeatureCache.build(model, uncached, uncached.stages[0], loader, None, None) is None


def test_onnx_runtime_prefix_equals_eager_and_falls_back(tmp_path, monkeypatch):
    """When a pass is long enough to pay for an export, ONNX Runtime runs the prefix if it
    is faster, and its activations equal eager fp32's within the export tolerance; a
    prefix it cannot run, or IMGCLF_CACHE_ENGINE=torch, keeps PyTorch."""
    from imgclf.train import prefix_pass, probe_cache
    from imgclf.train.prefix_pass import same_activations

    loader, model = _loader_and_model(tmp_path)
    prefix, _ = model.split_at("block3")
    x = loader.batch(torch.arange(8))
    monkeypatch.setattr(prefix_pass, "WORTH_SECONDS", 0.0)

    # Eager (a plain function) timed slower than ONNX Runtime (a module): ORT is chosen.
    def seconds(run, x) -> float:
        return 0.1 if isinstance(run, torch.nn.Module) else 1.0

    monkeypatch.setattr(prefix_pass, "_seconds", seconds)
    chosen = prefix_pass.choose(prefix, x, 10_000, None)
    assert chosen.engine.startswith("ONNX Runtime") and chosen.batch_size == prefix_pass.ORT_BATCH
    with torch.inference_mode():
        assert prefix_pass.same_activations(chosen.run(x), prefix(x))
        assert torch.allclose(chosen.run(x), prefix(x), atol=1e-4, rtol=1e-3)
    # Within 1e-4 of the activations' scale, however small some of them are.
    want = torch.tensor([50.0, 0.001, -3.0])
    assert prefix_pass.same_activations(want + torch.tensor([0.0, 4e-3, 0.0]), want)
    assert not prefix_pass.same_activations(want + torch.tensor([0.0, 6e-3, 0.0]), want)
    small = torch.tensor([0.5, 0.0])
    assert prefix_pass.same_activations(small + 9e-5, small)
    assert not prefix_pass.same_activations(small + 2e-4, small)
    assert not prefix_pass.same_activations(small * 2, small)
    # Activations that differ fall back to PyTorch, and say so. Each case times afresh:
    # the timings and the check kept by the previous one would answer it.
    engine_file = probe_cache.cache_file("engine")
    engine_file.unlink()
    said: list[str] = []
    monkeypatch.setattr(prefix_pass, "same_activations", lambda got, want: False)
    assert prefix_pass.choose(prefix, x, 10_000, None, said.append).engine == "PyTorch"
    assert said == ["feature cache: PyTorch (ONNX Runtime's activations differ from PyTorch's)"]
    # Not monkeypatch.undo(): it would also undo the test's own IMGCLF_HOME, and the
    # timings kept below would land in the real one.
    monkeypatch.setattr(prefix_pass, "same_activations", same_activations)
    said = []

    def broken(*args):
        raise RuntimeError("Unsupported: aten::weird_op\nmore")

    monkeypatch.setattr(prefix_pass, "_onnx_runner", broken)
    engine_file.unlink()
    assert prefix_pass.choose(prefix, x, 10_000, None, said.append).engine == "PyTorch"
    assert said == [
        "feature cache: PyTorch (ONNX Runtime failed: Unsupported: aten::weird_op more)"
    ]
    monkeypatch.setenv(prefix_pass.ENGINE_ENV, "torch")
    assert prefix_pass.choose(prefix, x, 10_000, None).engine == "PyTorch"


def test_the_caches_graph_is_exported_once_per_module_and_kept(tmp_path, monkeypatch):
    """The cache's ONNX graph is kept under a hash of the prefix's layers, weights and
    input shape: the same prefix is not exported again, other weights or another size
    are, and a damaged file is replaced; every graph answers as the prefix does."""
    import numpy as np

    from imgclf.models import create
    from imgclf.runtime import onnx as onnx_mod

    loader, model = _loader_and_model(tmp_path)
    prefix, _ = model.split_at("block3")
    x = loader.batch(torch.arange(5))  # any batch: the graph's batch is dynamic
    exports: list[tuple] = []
    export = onnx_mod.onnx_bytes

    def counting(module, example, **kwargs):
        exports.append(tuple(example.shape))
        return export(module, example, **kwargs)

    monkeypatch.setattr(onnx_mod, "onnx_bytes", counting)

    def graph(inputs: torch.Tensor) -> np.ndarray:
        session = onnx_mod.kept_onnx_session(prefix, inputs[:2])
        return session.run(None, {"input": inputs.numpy()})[0]

    for _ in range(2):
        with torch.inference_mode():
            np.testing.assert_allclose(graph(x), prefix(x).numpy(), atol=1e-4, rtol=1e-3)
    assert len(exports) == 1
    kept = list((tmp_path / "imgclf-home" / "onnx").glob("module-*.onnx"))
    assert len(kept) == 1
    kept[0].write_bytes(b"damaged")
    graph(x)
    assert len(exports) == 2 and kept[0].read_bytes() != b"damaged"
    with torch.no_grad():
        next(prefix.parameters()).add_(0.5)  # other weights: another graph
    with torch.inference_mode():
        np.testing.assert_allclose(graph(x), prefix(x).numpy(), atol=1e-4, rtol=1e-3)
    small = torch.nn.functional.interpolate(x, size=12)
    graph(small)  # another input size
    assert len(exports) == 4 and len(list(kept[0].parent.glob("module-*.onnx"))) == 3
    # A pass too short to pay for an export stays eager, unless the graph is kept.
    from imgclf.train import prefix_pass

    def seconds(run, x) -> float:  # ONNX Runtime (a module) faster than eager
        return 0.1 if isinstance(run, torch.nn.Module) else 1.0

    monkeypatch.setattr(prefix_pass, "_seconds", seconds)
    other, _ = create("complex", num_classes=3, input_size=16).eval().split_at("block3")
    assert prefix_pass.choose(other, x, 10, None).engine == "PyTorch"
    assert prefix_pass.choose(prefix, x, 10, None).engine.startswith("ONNX Runtime")
    assert len(exports) == 4  # the kept graph, not a fifth export


def test_a_stage_trains_at_its_own_size_and_validates_at_the_models(tmp_path: Path) -> None:
    """FixRes (a stage's input_size): training batches at 12 px, validation at the
    model's 16, with and without the cache, and the two paths agree."""
    from imgclf.train.trainer import Trainer

    ds = import_tiny(tmp_path)
    stages = [
        {"epochs": 2, "train": ["block3", "head"], "input_size": 12},
        {"epochs": 1, "train": "all", "input_size": 12},
    ]
    runs = {}
    for cached in (True, False):
        recipe = validate_recipe(_staged(stages=stages, feature_cache=cached))
        out = tmp_path / f"fixres-{cached}"
        trainer = Trainer(recipe, ds, out, threads=1, progress=False)
        sizes: set[tuple[bool, int]] = set()
        for module in (trainer.model, trainer.model.block1):  # cached stages start later
            module.register_forward_pre_hook(
                lambda m, args, seen=sizes: seen.add((m.training, args[0].shape[-1]))
            )
        trainer.run()
        # block1 sees images: 12 px while training, 16 px in validation and evaluation.
        assert (True, 12) in sizes and (False, 16) in sizes and (True, 16) not in sizes
        runs[cached] = out
    rows = [read_metrics(runs[c] / "metrics.csv") for c in (True, False)]
    for ra, rb in zip(*rows, strict=True):
        for col in ("train_loss", "val_loss", "val_acc"):
            assert ra[col] == pytest.approx(rb[col], abs=1e-4), (ra["epoch"], col)


def test_fp16_storage_halves_the_cache_and_trains_like_fp32(tmp_path: Path) -> None:
    from imgclf.data.loader import BatchLoader
    from imgclf.models import create
    from imgclf.train.feature_cache import FP16_ABOVE_GB, FeatureCache, storage_dtype

    assert storage_dtype("auto", FP16_ABOVE_GB * 2**30) == torch.float32
    assert storage_dtype("auto", FP16_ABOVE_GB * 2**30 + 1) == torch.float16
    assert storage_dtype("fp32", 1e12) == torch.float32
    assert storage_dtype("fp16", 1) == torch.float16
    ds = import_tiny(tmp_path)
    idx = ds.indices("train")
    model = create("complex", num_classes=3, input_size=16)
    caches, said = {}, []
    for dtype in ("fp16", "fp32"):
        recipe = validate_recipe(_staged(feature_cache_dtype=dtype))
        loader = BatchLoader(ds.images[idx], ds.labels[idx], batch_size=8, size=16)
        caches[dtype] = FeatureCache.build(
            model, recipe, recipe.stages[0], loader, loader, None, said.append
        )
    half, full = caches["fp16"], caches["fp32"]
    assert half.features[0].dtype == torch.float16 and full.features[0].dtype == torch.float32
    assert half.features[0].nbytes * 2 == full.features[0].nbytes
    assert "in float16" in said[0] and "in float32" in said[1]
    x16, y16 = next(half.iter_from(0))
    x32, y32 = next(full.iter_from(0))
    assert x16.dtype == torch.float32 and torch.equal(y16, y32)  # the suffix trains in fp32
    torch.testing.assert_close(x16, x32, atol=1e-2, rtol=1e-3)
    cached_stage = [{"epochs": 2, "train": ["block3", "head"]}]
    runs = [
        train(
            _staged(feature_cache_dtype=d, stages=cached_stage),
            ds,
            out=tmp_path / d,
            threads=1,
            progress=False,
        )
        for d in ("fp16", "fp32")
    ]
    a, b = (read_metrics(r.path / "metrics.csv") for r in runs)
    for ra, rb in zip(a, b, strict=True):  # fp16's rounding of the inputs changes little
        for col in ("train_loss", "val_loss"):
            assert ra[col] == pytest.approx(rb[col], rel=2e-2, abs=2e-3), (ra["epoch"], col)


@pytest.mark.parametrize(
    ("epoch", "batch"), [(2, 1), (5, 2)], ids=["in-cached-stage", "in-uncached-stage"]
)
def test_ctrl_c_in_fixres_fp16_cached_stages_then_resume_is_exact(
    tmp_path: Path, monkeypatch, epoch: int, batch: int
) -> None:
    """A cached stage trained at its own size on fp16 activations, then an uncached one
    at that size: stopped anywhere, the resumed run equals the uninterrupted one."""
    from helpers_train import assert_same_run, interrupt_at, interrupt_cache_at
    from imgclf.train.trainer import Trainer

    ds = import_tiny(tmp_path)
    stages = [
        {"epochs": 4, "train": ["block3", "head"], "input_size": 12},
        {"epochs": 2, "train": "all", "input_size": 12, "lr": 0.01},
    ]
    recipe = validate_recipe(
        _staged(
            stages=stages,
            feature_cache_dtype="fp16",
            augment={"crop_padding": 2, "flip": True, "cache_views": 3},
        )
    )
    reference = train(recipe, ds, out=tmp_path / "reference", threads=1, progress=False)
    out = tmp_path / "run"
    trainer = Trainer(recipe, ds, out, threads=1, progress=False)
    interrupt_at(trainer, epoch, batch)  # the image loader: the uncached stage
    interrupt_cache_at(monkeypatch, trainer, epoch, batch)  # the cached stages
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    stopped = load_checkpoint(out / "last.pt")
    stage = 0 if epoch <= 4 else 1
    want = {"stage": stage, "epoch": epoch - 1 - 4 * stage, "batch": batch + 1}
    assert stopped["position"] == want
    assert stopped["progress"]["stage_cached"]["0"] is True  # 3 views, 4 epochs: it pays
    train(None, resume=out, threads=1, progress=False)
    assert_same_run(out, reference.path)


def test_a_cache_is_built_only_where_it_pays(tmp_path: Path, capsys) -> None:
    """4 views for a 1-epoch stage cost 4 passes where training without the cache runs
    the prefix once: not built, and said; 5 epochs on the same views: built. The
    decision is saved, so a resumed stage takes the same path."""
    from imgclf.train.feature_cache import pays
    from imgclf.train.prefix_pass import PrefixPass

    eager = PrefixPass(lambda x: x, 8, "PyTorch", 1.0, 1.0)
    assert not pays(eager, 4 * 100 + 20, 1 * 120)
    assert pays(eager, 4 * 100 + 20, 5 * 120)
    ort = PrefixPass(lambda x: x, 8, "ONNX Runtime", 0.2, 1.0)  # 5x eager's speed
    assert pays(ort, 4 * 100 + 20, 1 * 120)
    ds = import_tiny(tmp_path)
    crops = {"crop_padding": 2, "flip": True, "cache_views": 4}
    for epochs, built in ((1, False), (5, True)):
        stages = [{"epochs": epochs, "train": ["block3", "head"]}]
        out = tmp_path / f"e{epochs}"
        train(_staged(augment=crops, stages=stages), ds, out=out, threads=1, progress=True)
        said = "".join(capsys.readouterr())
        assert ("feature cache: 4 view(s)" in said) == built
        assert ("feature cache: not built (4 view(s) cost more" in said) == (not built)
        assert load_checkpoint(out / "last.pt")["progress"]["stage_cached"] == {"0": built}
