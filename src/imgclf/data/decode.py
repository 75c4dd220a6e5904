"""Decode image bytes to RGB uint8 arrays, in worker threads.

Policy, stated once:
* modes L, LA, P, RGBA, CMYK, I;16, I, F become RGB; alpha is dropped as torchvision's
  ``pil_loader`` does (``convert("RGB")``), 16-bit images keep their top 8 bits;
* EXIF orientation is applied (phone photos are stored sideways);
* an image of another size than the target is scaled to cover it, preserving aspect
  ratio (bicubic, antialiased), then centre-cropped — the eval transform of timm and
  torchvision references, so nothing is stretched;
* anything Pillow cannot decode, a truncated file, and an image over Pillow's
  decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is skipped with the reason.

Baseline JPEGs without EXIF go through simplejpeg (libjpeg-turbo, ~25 µs for a 32×32
image against ~200 µs through ``Image.open``, measured here; bit-identical output), which
also releases the GIL, so a thread pool decodes in parallel. Everything else, and any JPEG
simplejpeg rejects, goes through Pillow, whose error is the reason reported.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

Size = tuple[int, int]  # (height, width)


def default_workers() -> int:
    """Decoding threads to use: the CPUs this process may run on (import and predict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"over Pillow's decompression-bomb limit ({exc})"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():  # "Truncated File Read"
        return "truncated image"
    if isinstance(exc, ValueError) and str(exc).startswith(("empty file", "not an H×W×3")):
        return str(exc)
    return f"corrupt image ({type(exc).__name__}: {exc})"


def _read(data: bytes | None, path: str | None) -> bytes:
    if data is None:
        assert path is not None
        with open(path, "rb") as f:
            data = f.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    return data


# warnings.catch_warnings swaps process-wide state: two decoding threads inside it at once
# can leave the "error" filter installed for good, or drop it while another thread opens.
_OPEN_LOCK = threading.Lock()


def _open(data: bytes) -> Image.Image:
    """``Image.open`` (header only) with Pillow's decompression-bomb warning as an error."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _check_pixels(h: int, w: int) -> None:
    """Pillow's decompression-bomb limit, for images that do not go through ``Image.open``."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and h * w > limit:
        raise Image.DecompressionBombError(
            f"Image size ({h * w} pixels) exceeds limit of {limit} pixels, "
            "could be decompression bomb DOS attack."
        )


def _fast_jpeg_ok(data: bytes) -> bool:
    """A JPEG simplejpeg may decode: one without EXIF (which may rotate it; Pillow applies
    that). CMYK/YCCK are left to Pillow by the colour-space check of the header."""
    return data[:2] == b"\xff\xd8" and not _has_exif(data)


# Markers without a length field: TEM and RST0-7 (ITU T.81 table B.1).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _has_exif(data: bytes) -> bool:
    """Whether an APP1 Exif segment comes before the scan, wherever it is: a large ICC
    profile or comment can push it past any fixed window. Malformed segments count as
    EXIF, so Pillow decides and names the problem."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: no more header segments
            return False
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return True
        if marker == 0xE1 and data[pos + 4 : pos + 9] == b"Exif\x00":
            return True
        pos += 2 + length
    return True  # no scan found: not a JPEG simplejpeg should see


def _decode_fast(data: bytes, size: Size | None) -> tuple[np.ndarray, Size] | None:
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):
            return None
    except ValueError:
        return None  # Pillow decides, and names the problem
    _check_pixels(h, w)
    try:
        if size is not None and size[0] < h and size[1] < w:
            # libjpeg scales by n/8 while decoding: far faster for photos.
            arr = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=size[0], min_width=size[1]
            )
        else:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        return arr, (h, w)
    except ValueError:
        return None  # Pillow decides, and names the problem


def _decode_pil(data: bytes, size: Size | None) -> tuple[Image.Image, Size]:
    """The RGB image, kept as Pillow's (no full-size numpy copy: ``cover_crop`` resizes it
    where it is), and its native size."""
    im = _open(data)
    w, h = im.size
    rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF rotation by 90°
    if rotated:
        w, h = h, w
    if size is not None and im.format == "JPEG":
        # DCT scaling, as above; draft() sees the stored image, before any rotation.
        im.draft("RGB", (size[0], size[1]) if rotated else (size[1], size[0]))
    im.load()  # truncation raises here
    # In place: the default returns a copy of every unrotated image (twice the memory).
    ImageOps.exif_transpose(im, in_place=True)
    return _to_rgb(im), (h, w)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode.startswith("I;16"):
            arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        else:  # 32-bit int or float: scale the observed range to 0..255
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr8 = ((arr - lo) * (255.0 / (hi - lo or 1.0))).round().astype(np.uint8)
        return Image.fromarray(np.stack([arr8] * 3, axis=-1), "RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow warns when P with transparency goes straight to RGB
    return im.convert("RGB")


# Scaling whole then cropping costs the scaled image's pixels; past this many times the
# target's pixels (aspect ratios beyond 4:1) only the kept box is resampled, so a 1×300000
# strip costs the target's size, not 67 million columns (issue #10: 1.7 GB for 954 bytes).
_COVER_WASTE = 4


def cover_crop(arr: np.ndarray | Image.Image, size: Size) -> np.ndarray:
    """Scale to cover ``size`` keeping aspect ratio (bicubic, antialiased), centre-crop.

    ``arr`` may be an RGB Pillow image: the same pixels, resized without a full-size copy
    (a 36-megapixel PNG peaked at 10 bytes a pixel through numpy and back, 4 without)."""
    th, tw = size
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    w, h = im.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    left, top = (nw - tw) // 2, (nh - th) // 2
    if nw * nh > _COVER_WASTE * tw * th:
        # The same centre box in source coordinates: Pillow resamples only that region.
        sx, sy = nw / w, nh / h
        box = (left / sx, top / sy, (left + tw) / sx, (top + th) / sy)
        return np.asarray(im.resize((tw, th), Image.Resampling.BICUBIC, box=box))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    return np.asarray(im.crop((left, top, left + tw, top + th)))


def decode(
    data: bytes | None, path: str | None, size: Size | None
) -> tuple[np.ndarray | None, Size | None, str | None]:
    """One image → (array at ``size`` or native, native size, None) or (None, None, why)."""
    try:
        data = _read(data, path)
        got = _decode_fast(data, size) if _fast_jpeg_ok(data) else None
        pixels, native = got if got is not None else _decode_pil(data, size)
        if isinstance(pixels, Image.Image):
            here = (pixels.height, pixels.width)
        else:
            here = pixels.shape[:2]
        if size is not None and here != size:
            return cover_crop(pixels, size), native, None
        return np.asarray(pixels, dtype=np.uint8), native, None
    except Exception as exc:  # every failure becomes a report row, never a crash
        return None, None, _reason(exc)


def decode_pixels(
    image: np.ndarray | Image.Image, size: Size | None
) -> tuple[np.ndarray | None, Size | None, str | None]:
    """Pixels already decoded (a Pillow image, or an H×W×3 uint8 array) → what :func:`decode`
    gives for a file of them: EXIF orientation applied (a Pillow image's), any colour mode
    to RGB, scaled to cover ``size`` and centre-cropped. The same pixels as a file's where
    the file's decoder saw them whole: a PNG, or a JPEG no larger than ``size`` (a larger
    JPEG file is decoded at a reduced DCT scale first, which pixels given whole skip)."""
    try:
        if isinstance(image, Image.Image):
            if image.getexif().get(0x0112, 1) != 1:
                image = ImageOps.exif_transpose(image)  # a copy: the caller's stays as it is
            image.load()  # a lazily opened file that is truncated raises here
            pixels: np.ndarray | Image.Image = _to_rgb(image)
            native = (pixels.height, pixels.width)
        else:
            pixels = _rgb_array(image)
            native = pixels.shape[:2]
        here = (pixels.height, pixels.width) if isinstance(pixels, Image.Image) else native
        if size is not None and here != size:
            return cover_crop(pixels, size), native, None
        return np.asarray(pixels, dtype=np.uint8), native, None
    except Exception as exc:  # every failure becomes a reason, never a crash
        return None, None, _reason(exc)


def _rgb_array(arr: np.ndarray) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(
            f"not an H×W×3 uint8 array (got {getattr(arr, 'shape', '?')} "
            f"{getattr(arr, 'dtype', type(arr).__name__)})"
        )
    if arr.shape[2] != 3 or 0 in arr.shape:
        raise ValueError(f"not an H×W×3 uint8 array (got {arr.shape} uint8)")
    return np.ascontiguousarray(arr)


def probe(data: bytes | None, path: str | None) -> Size | None:
    """Native size from the header alone, or None when unreadable (decoding says why)."""
    try:
        data = _read(data, path)
        if _fast_jpeg_ok(data):
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return (h, w)
        im = _open(data)
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90°
            w, h = h, w
        return (h, w)
    except Exception:  # decoding will report the reason
        return None


def stored_size(data: bytes) -> Size | None:
    """(height, width) as stored, from the header alone (None when unreadable). Unlike
    :func:`probe` it ignores EXIF rotation: Pillow finds a PNG's EXIF by decoding the whole
    image (the chunk may follow the pixels), which is what a size check must not do."""
    try:
        if _fast_jpeg_ok(data):
            with contextlib.suppress(ValueError):  # Pillow may still read it
                h, w, _, _ = simplejpeg.decode_jpeg_header(data)
                return (h, w)
        w, h = _open(data).size
        return (h, w)
    except Exception:  # decoding will report the reason
        return None


def decode_chunk(
    items: Sequence[tuple[bytes | None, str | None]], size: Size
) -> tuple[np.ndarray, list[Size | None], list[str | None]]:
    """Decode a chunk to ``size``: the stacked good images, native sizes and reasons."""
    out = np.empty((len(items), size[0], size[1], 3), dtype=np.uint8)
    natives: list[Size | None] = []
    reasons: list[str | None] = []
    n = 0
    for data, path in items:
        arr, native, reason = decode(data, path, size)
        natives.append(native)
        reasons.append(reason)
        if arr is not None:
            out[n] = arr
            n += 1
    return out[:n], natives, reasons
