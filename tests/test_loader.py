"""BatchLoader: shapes, exact pixels, normalization, shuffling, augmentation, sharding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import make_class_tree
from imgclf.data import import_dataset
from imgclf.data.loader import Augment, BatchLoader

# mean 0, std 1/255: the loader's output is the raw 0..255 pixel value.
RAW = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}


def indexed_images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    """Random images; labels will be their indices so each output can be traced back."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def raw_pixels(x: torch.Tensor) -> np.ndarray:
    """B×3×H×W loader output (RAW normalization) → B×H×W×3 uint8."""
    return x.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def epoch(loader: BatchLoader, e: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    loader.set_epoch(e)
    xs, ys = zip(*loader, strict=True)
    return list(xs), list(ys)


def test_shapes_and_dtypes():
    loader = BatchLoader(indexed_images(10), np.arange(10), batch_size=4)
    xs, ys = epoch(loader)
    assert [tuple(x.shape) for x in xs] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert all(x.dtype == torch.float32 for x in xs)
    assert all(y.dtype == torch.int64 for y in ys)
    assert len(loader) == 3 and loader.num_samples == 10


def test_dtype_option():
    loader = BatchLoader(indexed_images(4), np.arange(4), batch_size=4, dtype=torch.bfloat16)
    assert next(iter(loader))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_flag(channels_last):
    loader = BatchLoader(indexed_images(4), np.arange(4), batch_size=4, channels_last=channels_last)
    x, _ = next(iter(loader))
    assert x.shape == (4, 3, 8, 8)
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    else:
        assert x.is_contiguous()
        assert not x.is_contiguous(memory_format=torch.channels_last)


def test_normalization_math():
    images = np.empty((2, 4, 4, 3), np.uint8)
    images[0] = (200, 100, 0)
    images[1] = 255
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm uses
    loader = BatchLoader(images, [0, 1], batch_size=2, mean=mean, std=std)
    x, _ = next(iter(loader))
    for b, pixel in enumerate(((200, 100, 0), (255, 255, 255))):
        for c in range(3):
            want = (pixel[c] / 255 - mean[c]) / std[c]
            torch.testing.assert_close(x[b, c], torch.full((4, 4), want), atol=1e-6, rtol=0)


def test_no_augmentation_gives_exact_pixels_in_order():
    images = indexed_images(7)
    loader = BatchLoader(images, np.arange(7), batch_size=3, **RAW)
    xs, ys = epoch(loader)
    np.testing.assert_array_equal(np.concatenate([raw_pixels(x) for x in xs]), images)
    assert torch.cat(ys).tolist() == list(range(7))
    # Without augmentation and shuffle every epoch is the same.
    xs2, _ = epoch(loader, 5)
    assert all(torch.equal(a, b) for a, b in zip(xs, xs2, strict=True))


def test_shuffle_is_a_permutation_each_epoch():
    images = indexed_images(23)
    loader = BatchLoader(images, np.arange(23), batch_size=5, shuffle=True, **RAW)
    orders = []
    for e in range(3):
        xs, ys = epoch(loader, e)
        order = torch.cat(ys).numpy()
        assert sorted(order.tolist()) == list(range(23))
        np.testing.assert_array_equal(np.concatenate([raw_pixels(x) for x in xs]), images[order])
        orders.append(order.tolist())
    assert orders[0] != list(range(23))
    assert orders[0] != orders[1] != orders[2]


def make_augmenting(seed: int = 0, **kw) -> BatchLoader:
    return BatchLoader(
        indexed_images(32),
        np.arange(32),
        batch_size=8,
        shuffle=True,
        augment=Augment(crop_padding=2, flip=True),
        seed=seed,
        **kw,
    )


def test_same_seed_and_epoch_give_identical_batches():
    a, b = make_augmenting(), make_augmenting()
    xa, ya = epoch(a, 3)
    xb, yb = epoch(b, 3)
    assert all(torch.equal(p, q) for p, q in zip(xa + ya, xb + yb, strict=True))
    # Iterating twice in the same epoch replays it (a resumed run sees the same batches).
    xa2, _ = epoch(a, 3)
    assert all(torch.equal(p, q) for p, q in zip(xa, xa2, strict=True))


def test_different_epoch_or_seed_gives_different_batches():
    _, y0 = epoch(make_augmenting(), 0)
    _, y1 = epoch(make_augmenting(), 1)
    _, ys = epoch(make_augmenting(seed=1), 0)
    assert torch.cat(y0).tolist() != torch.cat(y1).tolist()
    assert torch.cat(y0).tolist() != torch.cat(ys).tolist()
    # Same order, other epoch: the augmentation differs too.
    a, b = make_augmenting(), make_augmenting()
    a.shuffle = b.shuffle = False
    xa, _ = epoch(a, 0)
    xb, _ = epoch(b, 1)
    assert not torch.equal(torch.cat(xa), torch.cat(xb))


def matching_crops(out: np.ndarray, image: np.ndarray, p: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) with |dy|, |dx| ≤ p whose reflect-padded crop equals ``out``."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode="reflect")
    found = []
    for dy in range(-p, p + 1):
        for dx in range(-p, p + 1):
            crop = padded[p + dy : p + dy + h, p + dx : p + dx + w]
            for flipped in (False, True):
                if np.array_equal(out, crop[:, ::-1] if flipped else crop):
                    found.append((dy, dx, flipped))
    return found


def test_random_crop_is_a_reflect_padded_shift_of_at_most_p():
    p = 3
    images = indexed_images(64, 10, 10)
    loader = BatchLoader(
        images,
        np.arange(64),
        batch_size=16,
        shuffle=True,
        augment=Augment(crop_padding=p, flip=True),
        **RAW,
    )
    shifts, flips = set(), []
    for e in range(2):
        for x, y in zip(*epoch(loader, e), strict=True):
            for out, i in zip(raw_pixels(x), y.tolist(), strict=True):
                found = matching_crops(out, images[i], p)
                assert len(found) == 1, (i, found)  # random images: exactly one explanation
                dy, dx, flipped = found[0]
                shifts.add((dy, dx))
                flips.append(flipped)
    assert {dy for dy, _ in shifts} == set(range(-p, p + 1))
    assert {dx for _, dx in shifts} == set(range(-p, p + 1))
    assert 0.3 < np.mean(flips) < 0.7


def test_crop_without_flip_never_flips():
    images = indexed_images(16)
    loader = BatchLoader(
        images, np.arange(16), batch_size=16, augment=Augment(crop_padding=1), **RAW
    )
    x, y = next(iter(loader))
    for out, i in zip(raw_pixels(x), y.tolist(), strict=True):
        assert [f for *_, f in matching_crops(out, images[i], 1)] == [False]


def test_flip_happens_about_half_the_time():
    images = indexed_images(400, 4, 4)
    loader = BatchLoader(images, np.arange(400), batch_size=100, augment=Augment(flip=True), **RAW)
    flipped = 0
    for x, y in loader:
        out, src = raw_pixels(x), images[y.numpy()]
        same = (out == src).all(axis=(1, 2, 3))
        mirrored = (out == src[:, :, ::-1]).all(axis=(1, 2, 3))
        assert (same ^ mirrored).all()
        flipped += int(mirrored.sum())
    assert 160 <= flipped <= 240  # Binomial(400, ½): ±4 standard deviations


def test_evaluation_batch_without_generator_is_not_augmented():
    images = indexed_images(4)
    loader = BatchLoader(images, np.arange(4), batch_size=4, augment=Augment(2, True), **RAW)
    np.testing.assert_array_equal(raw_pixels(loader.batch(torch.arange(4))), images)


@pytest.mark.parametrize("size, want", [(64, (64, 64)), (16, (16, 16)), ((48, 40), (48, 40))])
def test_resize_to_the_model_input_size(size, want):
    images = np.full((3, 32, 32, 3), 77, np.uint8)
    loader = BatchLoader(images, [0, 1, 2], batch_size=3, size=size, **RAW)
    x, _ = next(iter(loader))
    assert tuple(x.shape) == (3, 3, *want)
    torch.testing.assert_close(x, torch.full_like(x, 77.0), atol=1e-3, rtol=0)


def test_resize_matches_bilinear_interpolation():
    images = indexed_images(2, 32, 32)
    loader = BatchLoader(images, [0, 1], batch_size=2, size=64, channels_last=False, **RAW)
    x, _ = next(iter(loader))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(64, 64), mode="bilinear"
    )
    torch.testing.assert_close(x, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("drop_last, batches", [(True, [4, 4]), (False, [4, 4, 2])])
def test_drop_last(drop_last, batches):
    loader = BatchLoader(
        indexed_images(10), np.arange(10), batch_size=4, shuffle=True, drop_last=drop_last
    )
    _, ys = epoch(loader)
    assert [len(y) for y in ys] == batches
    assert len(loader) == len(batches)


@pytest.mark.parametrize("n, world_size, batch_size", [(10, 3, 2), (9, 2, 1), (17, 4, 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_are_disjoint_and_cover_everything(n, world_size, batch_size, shuffle):
    seen = []
    for rank in range(world_size):
        loader = BatchLoader(
            indexed_images(n),
            np.arange(n),
            batch_size=batch_size,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            seed=5,
        )
        _, ys = epoch(loader, 2)
        assert len(loader) == len(ys)  # each rank knows its own batch count
        seen.append(torch.cat(ys).tolist())
    flat = [i for part in seen for i in part]
    assert sorted(flat) == list(range(n))  # disjoint and complete
    assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_loader_over_a_memory_mapped_dataset(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 3, "dog": 2})
    ds = import_dataset(tmp_path / "src", "pets", val_fraction=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable NumPy array" warning
        loader = BatchLoader(ds.images, ds.labels, batch_size=5, **RAW)
    x, y = next(iter(loader))
    assert y.tolist() == [0, 0, 0, 1, 1]
    assert raw_pixels(x)[:, 0, 0].tolist() == [[255, 0, 0]] * 3 + [[0, 255, 0]] * 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        BatchLoader(indexed_images(2), [0, 1], batch_size=0)
    with pytest.raises(ValueError, match=r"images must be N×H×W×3 uint8, got \(2, 8, 8\)"):
        BatchLoader(np.zeros((2, 8, 8), np.uint8), [0, 1], batch_size=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_same_batches_as_cpu():
    kw = {"batch_size": 8, "shuffle": True, "augment": Augment(2, True), "size": 16, "seed": 3}
    cpu = BatchLoader(indexed_images(32), np.arange(32), **kw)
    gpu = BatchLoader(indexed_images(32), np.arange(32), device="cuda", **kw)
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), atol=1e-4, rtol=0)
