"""Batches from cached uint8 images, augmented as whole batches with tensor ops.

No per-image PIL work and no DataLoader workers: the split's uint8 images sit in one
tensor (on the training device when it is a GPU), and each batch is one gather that
applies the random crop and the flip at once, then a float conversion, an optional
resize and a normalization. On 2 CPU cores this serves well over 50,000 32×32 images/s
(``benchmarks/bench_data.py``), far more than any model here consumes.

Randomness comes from a CPU ``torch.Generator`` seeded by (seed, epoch): the same batches
on CPU and CUDA, and after a resume. In data-parallel training (``rank``/``world_size``,
imgclf.runtime.distributed) every rank takes its slice of one epoch permutation and draws its
augmentation from its own stream, seeded by (seed, epoch, rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from imgclf.data.preprocess import batch_to_input


@dataclass(frozen=True)
class Augment:
    """Batch augmentation. ``crop_padding``: random translation by up to that many pixels
    with reflect padding (the standard CIFAR crop, as in airbench94 ``translate``);
    ``flip``: horizontal flip with probability 1/2 (True), or ``"alternate"``: a fixed random
    half of the images mirrored in odd epochs, the other half in even epochs, so every
    image is seen both ways in any two epochs in a row (airbench94, arXiv 2404.00498 §3.6:
    the same accuracy in fewer epochs than random flips); ``cutout``: a square of that
    many pixels, centred at a uniform random pixel and clipped at the edges, filled with
    the mean colour (DeVries & Taylor 2017, arXiv 1708.04552), after the crop and flip."""

    crop_padding: int = 0
    flip: bool | str = False
    cutout: int = 0
    cache_views: int = 0  # read by the feature cache (imgclf.train.feature_cache), not here

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or bool(self.flip) or self.cutout > 0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Distinct, reproducible streams per epoch; a resumed run replays the same ones.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The augmentation stream of one rank in one epoch. Rank 0 keeps the single-process
    stream (so one process draws exactly what it always drew); other ranks get streams
    mixed from (seed, epoch, rank) by numpy's SeedSequence, which is made to give
    independent streams for distinct entropy tuples (NumPy docs, "Parallel random number
    generation"): two ranks never crop and flip in lockstep."""
    if rank == 0:
        return epoch_generator(seed + 1, epoch)
    mixed = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)


def epoch_order(
    n: int,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample order for one epoch; the seam for data-parallel training (each rank a slice).

    ``weights`` (one per sample): draw the epoch's ``n`` samples with replacement in
    proportion to them instead of a permutation, as torch's ``WeightedRandomSampler`` does
    (``class_balance: sampler``).
    """
    if not shuffle:
        order = torch.arange(n)
    elif weights is not None:
        order = torch.multinomial(
            weights.double(), n, replacement=True, generator=epoch_generator(seed, epoch)
        )
    else:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch))
    return order[rank::world_size]


def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad index arithmetic (…2 1 | 0 1 2 … n-1 | n-2 …): padding without a copy."""
    idx = idx.abs()
    return torch.where(idx >= size, 2 * (size - 1) - idx, idx)


def alternate_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of ``n`` samples are mirrored in ``epoch`` under ``flip: alternate``: a fixed
    random half (from the seed) in odd epochs, its complement in even ones."""
    half = torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7)) < 0.5
    return half if epoch % 2 == 1 else ~half


def augment_indices(
    batch: int,
    height: int,
    width: int,
    aug: Augment,
    gen: torch.Generator,
    flips: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All of one batch's random draws, in a fixed order (a resume replays them for the
    batches it skips): row and column source indices (B×H, B×W) for a random crop + flip
    of each image, then the cutout masks (B×H×W, None without cutout). ``flips`` (B
    bools): which images to mirror, for ``flip: alternate``."""
    rows = torch.arange(height).expand(batch, height)
    cols = torch.arange(width).expand(batch, width)
    p = aug.crop_padding
    if p > 0:
        dy = torch.randint(-p, p + 1, (batch, 1), generator=gen)
        dx = torch.randint(-p, p + 1, (batch, 1), generator=gen)
        rows, cols = shifted(height, width, dy, dx)
    if aug.flip == "alternate":
        if flips is None:
            raise ValueError("flip: alternate needs the batch's flips (alternate_flips)")
        cols = torch.where(flips.view(-1, 1), cols.flip(1), cols)
    elif aug.flip:
        flip = torch.rand(batch, 1, generator=gen) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    masks = cutout_masks(batch, height, width, aug.cutout, gen) if aug.cutout > 0 else None
    return rows, cols, masks


def shifted(
    height: int, width: int, dy: torch.Tensor, dx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows and columns (B×H, B×W) of images moved by (``dy``, ``dx``) pixels (B×1
    each), reflected at the edges: the random crop's geometry."""
    rows = _reflect(torch.arange(height) + dy, height)
    return rows, _reflect(torch.arange(width) + dx, width)


def cutout_masks(
    batch: int, height: int, width: int, size: int, gen: torch.Generator
) -> torch.Tensor:
    """B×H×W bools: each image's cutout square of side ``size`` around a uniform random
    centre, clipped where it crosses an edge (as the paper's code does: a centre anywhere,
    so the cut area varies and pixels near the edges are covered less often)."""
    cy = torch.randint(0, height, (batch, 1, 1), generator=gen)
    cx = torch.randint(0, width, (batch, 1, 1), generator=gen)
    y = torch.arange(height).view(1, -1, 1)
    x = torch.arange(width).view(1, 1, -1)
    top, left = cy - size // 2, cx - size // 2
    # Rows and columns apart (B×H×1, B×1×W), one B×H×W AND at the end.
    return ((y >= top) & (y < top + size)) & ((x >= left) & (x < left + size))


class BatchLoader:
    """Iterate (images, labels) batches of a dataset split.

    ``images``: N×H×W×3 uint8 (numpy, memmap or tensor). Yields float batches
    B×3×S×S normalized by ``mean``/``std`` (0..1 scale), in channels_last memory format when
    asked (free here: the cache is already NHWC), and int64 labels.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = False,
        augment: Augment | None = None,
        size: int | Sequence[int] | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        channels_last: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        sample_weights: torch.Tensor | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        # One copy of the split in RAM (or on the GPU): 45,000 CIFAR images are 138 MB.
        self.images = _as_tensor(images).to(self.device)
        self.labels = _as_tensor(labels).to(self.device, torch.int64)
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be N×H×W×3 uint8, got {tuple(self.images.shape)}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment or Augment()
        self.size = _pair(size) if size is not None else tuple(self.images.shape[1:3])
        self.mean, self.std = tuple(mean), tuple(std)
        # Cutout's fill: the normalization mean as uint8 pixels, so 0 once normalized.
        self._fill = (
            torch.tensor(self.mean).mul(255).round().clamp(0, 255).to(self.device, torch.uint8)
        )
        self.channels_last = channels_last
        self.dtype = dtype
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.sample_weights = sample_weights  # class-balanced sampling, when set
        self.epoch = 0
        self._alternate: tuple[int, torch.Tensor] | None = None  # (epoch, flips) cache

    def __len__(self) -> int:
        return num_batches(
            len(self.labels), self.batch_size, self.rank, self.world_size, self.drop_last
        )

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from batch ``start`` on, exactly as a full pass yields them
        (skipped batches still draw their random numbers): how a resume continues."""
        gen = augment_generator(self.seed, self.epoch, self.rank)
        order = epoch_order(
            len(self.labels),
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            weights=self.sample_weights,
        )
        _, h, w, _ = self.images.shape
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            if i < start:
                if self.augment.enabled:
                    augment_indices(len(idx), h, w, self.augment, gen, self._flips(idx))
                continue
            yield self.batch(idx, gen), self.labels[idx.to(self.device)]

    def _flips(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.augment.flip != "alternate":
            return None
        if self._alternate is None or self._alternate[0] != self.epoch:
            self._alternate = (self.epoch, alternate_flips(len(self.labels), self.seed, self.epoch))
        return self._alternate[1][idx.cpu()]

    def batch(
        self,
        idx: torch.Tensor,
        gen: torch.Generator | None = None,
        view: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images ``idx`` as a normalized float batch: augmented when a generator is given,
        or seen through ``view`` (source rows B×H and columns B×W, e.g. :func:`shifted`)."""
        n, h, w, _ = self.images.shape
        masks = None
        if view is None and gen is not None and self.augment.enabled:
            flips = self._flips(idx)
            rows, cols, masks = augment_indices(len(idx), h, w, self.augment, gen, flips)
            view = rows, cols
        idx = idx.to(self.device)
        if view is not None:
            rows, cols = view[0].to(self.device), view[1].to(self.device)
            # One index_select of whole pixels over a flat view: ~5× faster than 3-tensor
            # advanced indexing here (benchmarks/bench_data.py).
            pixel = (idx.view(-1, 1, 1) * h + rows[:, :, None]) * w + cols[:, None, :]
            x = self.images.view(n * h * w, 3).index_select(0, pixel.reshape(-1))
            x = x.view(len(idx), h, w, 3)
            if masks is not None:
                # In place (x is the gather's own copy): 3× faster than torch.where here.
                x[masks.to(self.device)] = self._fill
        else:
            x = self.images.index_select(0, idx)
        # The one preprocessing definition shared with predict and serve.
        return batch_to_input(
            x,
            self.size,
            self.mean,
            self.std,
            dtype=self.dtype,
            channels_last=self.channels_last,
        )


def num_batches(n: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> int:
    """Batches of one rank in an epoch of ``n`` samples, ``order[rank::world_size]`` cut
    into ``batch_size`` pieces. With ``drop_last`` only full *global* batches count
    (``batch_size × world_size``): every rank takes the same number of steps (DDP hangs
    when one rank steps more often than another), and step i of all ranks together sees
    exactly the samples of a single process's step i with the global batch."""
    if drop_last:
        return n // (batch_size * world_size)
    share = len(range(rank, n, world_size))
    return -(-share // batch_size)


def _as_tensor(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.contiguous()  # batch() takes flat views of it
    arr = np.ascontiguousarray(values)
    if not arr.flags.writeable:  # a read-only memmap: torch wants memory it may write
        arr = arr.copy()
    return torch.from_numpy(arr)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))
