"""One definition of "an image file becomes the model's input tensor".

Every path that feeds a model goes through the two steps here, with the same parameters:

1. :meth:`Preprocess.file_to_uint8` — decode (EXIF orientation applied, any colour mode to
   RGB), then scale to *cover* ``source_size`` keeping the aspect ratio and centre-crop
   (:func:`imgclf.data.decode.decode`: libjpeg's DCT scaling for large JPEGs, then Pillow
   bicubic, which is antialiased when shrinking). ``imgclf data import`` stores exactly
   this array in the cache; ``predict``, ``eval`` on a folder and the server call it on
   raw files. Pixels already in memory (a Pillow image, an H×W×3 uint8 array: the Python
   predictor's inputs) take the same path from the decoded image on
   (:func:`image_to_uint8`).
2. :func:`batch_to_input` — a uint8 NHWC batch → normalized float NCHW at the model's
   ``input_size``: bilinear interpolation, antialiased when shrinking (as Pillow and
   torchvision's ``antialias=True``), none when the sizes agree. The batch loader (training,
   validation, ``eval``) and ``predict`` call it.

``source_size`` is the image size of the cache the model was trained on, recorded in every
checkpoint (``source_size``), so a run folder alone turns a raw file into the very tensor
its validation images were: a photo imported at 224 for a 96-px model is cropped to 224
and then shrunk to 96 on both paths, never cropped straight to 96 on one and squashed on
the other (issue #9: 80.6% through the cache, 66.6% through ``eval`` on the folder).

Why two resizes rather than one: the cache is decoded once and serves models of any input
size (a 32-px scratch net and a 224-px backbone vote on the same import), and training
augments on the stored pixels. The second resize is done on whole batches with tensor ops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.decode import Size, decode, decode_pixels

FILE_RESIZE = "scale to cover, bicubic antialiased, centre crop"
BATCH_RESIZE = "bilinear, antialiased when shrinking"


@dataclass(frozen=True)
class Preprocess:
    """Parameters of the file → tensor transform; :meth:`to_dict` goes into checkpoints."""

    source_size: Size  # (height, width) files are cropped to: the training cache's size
    input_size: int  # the model's square input
    mean: tuple[float, float, float]  # 0..1 scale
    std: tuple[float, float, float]

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Preprocess:
        """From a checkpoint. Checkpoints written before ``source_size`` existed crop files
        straight to the input size, the closest thing to what they were trained on."""
        size = int(state["input_size"])
        source = state.get("source_size") or (size, size)
        return cls(
            source_size=(int(source[0]), int(source[1])),
            input_size=size,
            mean=tuple(float(v) for v in state["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in state["std"]),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_size": list(self.source_size),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "file_resize": FILE_RESIZE,
            "batch_resize": BATCH_RESIZE,
        }

    def file_to_uint8(
        self, data: bytes | None = None, path: str | None = None
    ) -> tuple[np.ndarray | None, str | None]:
        """One file (its bytes, or its path) → (H×W×3 uint8 at ``source_size``, None), or
        (None, why it could not be read)."""
        return file_to_uint8(data, path, self.source_size)

    def batch_to_input(
        self,
        pixels: torch.Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
    ) -> torch.Tensor:
        return batch_to_input(
            pixels,
            self.input_size,
            self.mean,
            self.std,
            dtype=dtype,
            channels_last=channels_last,
        )

    def __call__(self, data: bytes | None = None, path: str | None = None) -> torch.Tensor:
        """One file → its 1×3×S×S model input (raises ValueError when unreadable)."""
        arr, why = self.file_to_uint8(data, path)
        if arr is None:
            raise ValueError(f"{path or 'image'}: {why}")
        return self.batch_to_input(torch.from_numpy(np.array(arr))[None])


def file_to_uint8(
    data: bytes | None, path: str | None, source_size: Size
) -> tuple[np.ndarray | None, str | None]:
    """Step 1 for one file: (H×W×3 uint8 at ``source_size``, None) or (None, why)."""
    arr, _, why = decode(data, path, source_size)
    return arr, why


def image_to_uint8(image: Any, source_size: Size) -> tuple[np.ndarray | None, str | None]:
    """Step 1 for decoded pixels (a Pillow image or an H×W×3 uint8 array):
    (H×W×3 uint8 at ``source_size``, None) or (None, why)
    (:func:`imgclf.data.decode.decode_pixels`)."""
    arr, _, why = decode_pixels(image, source_size)
    return arr, why


def batch_to_input(
    pixels: torch.Tensor,
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> torch.Tensor:
    """B×H×W×3 uint8 → B×3×S×S normalized ``dtype``, resized to ``size``."""
    out_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    device = pixels.device
    shift = torch.tensor(mean, device=device, dtype=torch.float32) * 255.0
    scale = 1.0 / (torch.tensor(std, device=device, dtype=torch.float32) * 255.0)
    # Normalize while still NHWC-contiguous (channel = last dim broadcasts fast), then view
    # as NCHW: that view *is* channels_last, at no cost.
    x = pixels.to(dtype).sub_(shift).mul_(scale).permute(0, 3, 1, 2)
    if tuple(x.shape[2:]) != out_size:
        # A per-channel affine map commutes with interpolation, so resizing after
        # normalizing is exact. Antialias when shrinking, as Pillow does: without it a
        # 224 → 96 bilinear shrink samples 1 pixel in 5 and aliases fine texture.
        shrink = out_size[0] < x.shape[2] or out_size[1] < x.shape[3]
        # On NCHW memory: the CPU's antialiased bilinear kernel ran 2.3× faster there than
        # on channels_last (224 → 192, 2 cores; docs/benchmarks.md §11), same values.
        x = F.interpolate(x.contiguous(), size=out_size, mode="bilinear", antialias=shrink)
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()
