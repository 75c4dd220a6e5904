"""``imgclf export RUN --int8``: a statically quantized ONNX model, verified before it is
written.

The float graph is :mod:`imgclf.export`'s (same input, same metadata). ONNX Runtime's
quantization tool turns it into int8, as its documentation advises
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html and
``help(onnxruntime.quantization.quantize_static)`` in 1.32):

- ``quant_pre_process`` first (symbolic shape inference, graph optimization, ONNX shape
  inference: "a tensor with unknown shape can not be quantized");
- ``quantize_static`` in the QDQ format ("strongly preferred over QOperator for CPU
  inference since ORT 1.11"), uint8 activations and int8 weights per output channel,
  min/max calibration on the run's own training images (:data:`CALIBRATION_IMAGES`
  drawn with a fixed seed, preprocessed by :mod:`imgclf.data.preprocess` as every
  other path);
- ``reduce_range=True`` (7-bit weights) by default: on an x86 CPU without VNNI (this
  project's AVX2 EPYC among them) the u8×s8 kernels add pairs of products in 16 bits and
  saturate on full-range per-channel weights, which the tool's guidance answers with
  ``reduce_range=True``; a file may be copied to such a CPU, so the portable choice is the
  default and ``reduce_range=False`` is the library's option for a VNNI-only deployment.

Verified before writing: the float and int8 models label the validation images (up to
:data:`VERIFY_IMAGES`, else the test split, else every image) and the share of top-1
labels they agree on, with both accuracies and the drop, is printed and stored in the
file's metadata under ``quantization``. Below ``min_agreement`` (90% by default) nothing is
written: an int8 model that changes one label in ten is not the run's model any more;
``min_agreement=0`` (``--min-agreement 0``) writes it all the same, numbers in the
metadata. The file is written atomically, so a failure leaves none.

Calibration needs the run's data set in the cache (its checkpoint names it): without its
images the activation ranges would be guesses, so that is one error line, not random pixels.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from imgclf.data.cache import Dataset, load_dataset
from imgclf.data.preprocess import Preprocess
from imgclf.errors import ExportError, UserError
from imgclf.export import METADATA_KEY, build_graph
from imgclf.inference.engine import label_map
from imgclf.inference.runs import LoadedRun, load_runs
from imgclf.io_utils import atomic_path, check_output_file
from imgclf.runtime.final_fit import trained_splits
from imgclf.runtime.onnx import (
    DEFAULT_OPSET,
    ort_session,
    set_metadata,
    unsupported_reason,
)

CALIBRATION_IMAGES = 256
CALIBRATION_SEED = 0
VERIFY_IMAGES = 2000  # at most, drawn with a fixed seed from a larger split
VERIFY_SPLITS = ("val", "test", "all")  # the first that has images
MIN_AGREEMENT = 0.90
# Per-channel QDQ (QuantizeLinear's ``axis``) is opset 13's.
MIN_OPSET = 13
# Images per calibration batch. ONNX Runtime's min/max calibrator adds a ReduceMin and a
# ReduceMax after every tensor and keeps only those per batch (calibrate.py,
# MinMaxCalibrater.augment_graph), so a batch costs one forward pass of memory.
# (Its CalibMaxIntermediateOutputs option is not used: in 1.32 it drops the batches it
# should merge, and calibration then fails with "No data is collected".)
CALIBRATION_BATCH = 16
VERIFY_BATCH = 32


@dataclass
class Int8Result:
    path: Path
    run: str
    calibrated_on: str
    verified_on: str
    agreement: float
    float_accuracy: float
    int8_accuracy: float
    float_bytes: int
    int8_bytes: int
    seconds: float
    metadata: dict[str, str]

    @property
    def drop(self) -> float:
        """Accuracy points lost to int8 (negative: gained)."""
        return 100 * (self.float_accuracy - self.int8_accuracy)

    def summary(self) -> str:
        size = self.int8_bytes / 2**20
        smaller = self.float_bytes / max(self.int8_bytes, 1)
        return (
            f"wrote {self.path} (int8 ONNX of {self.run}, {size:.1f} MiB, {smaller:.1f}× "
            f"smaller); on {self.verified_on}: top-1 agrees with the float model on "
            f"{100 * self.agreement:.1f}%, accuracy {100 * self.float_accuracy:.2f}% float → "
            f"{100 * self.int8_accuracy:.2f}% int8 ({points(-self.drop)}); "
            f"calibrated on {self.calibrated_on} ({self.seconds:.1f} s)"
        )


def points(change: float) -> str:
    """An accuracy change in points, as a reader says it ("0.40 points lower")."""
    if abs(change) < 0.005:
        return "unchanged"
    return f"{abs(change):.2f} points {'higher' if change > 0 else 'lower'}"


def default_int8_out(run: str | os.PathLike[str]) -> Path:
    """Beside the run: ``RUN/model.int8.onnx``."""
    path = Path(run)
    return (path if path.is_dir() else path.parent) / "model.int8.onnx"


# ---------------------------------------------------------------------------- data


def run_dataset(lr: LoadedRun, pre: Preprocess) -> Dataset:
    """The data set the run was trained on, from the cache; one line where it is gone."""
    where = lr.state.get("dataset")
    fix = "import it again under the same name (imgclf data import), then export"
    if not where:
        raise ExportError(f"--int8: {lr.path} names no data set to calibrate on; {fix}")
    try:
        ds = load_dataset(where)
    except (UserError, OSError, ValueError, KeyError):
        raise ExportError(
            f"--int8 calibrates on the run's training images, but its data set {where} "
            f"is not in the cache; {fix}"
        ) from None
    if ds.image_size != tuple(pre.source_size):
        raise ExportError(
            f"--int8: data set {ds.name!r} now holds {ds.image_size} images, the run was "
            f"trained on {tuple(pre.source_size)}; {fix}"
        )
    return ds


def pick(
    ds: Dataset, splits: tuple[str, ...], count: int, seed: int, trained: tuple[str, ...] = ()
) -> tuple[np.ndarray, str]:
    """Up to ``count`` indices of the first non-empty split of ``splits`` (a fixed-seed
    sample where it holds more), sorted so a memory-mapped cache is read in order, and
    what they are: marked when the run trained on them (``trained``: its splits)."""
    for split in splits:
        idx = ds.indices(split) if ds.has_split(split) else np.empty(0, dtype=np.int64)
        if len(idx):
            if len(idx) > count:
                idx = np.sort(np.random.default_rng(seed).choice(idx, count, replace=False))
            seen = split in trained or (split == "all" and bool(trained))
            mark = " (trained on: not a held-out accuracy)" if seen else ""
            return idx, f"{len(idx)} {split} images of {ds.name!r}{mark}"
    raise ExportError(f"--int8: data set {ds.name!r} holds no images")


def batches(ds: Dataset, idx: np.ndarray, pre: Preprocess, size: int) -> Iterator[np.ndarray]:
    """The model's input for ``idx``, ``size`` images at a time (read lazily)."""
    for start in range(0, len(idx), size):
        pixels = torch.from_numpy(np.array(ds.images[idx[start : start + size]]))
        yield pre.batch_to_input(pixels, channels_last=False).numpy()


class _Calibration(CalibrationDataReader):
    """The calibration images, one batch per ``get_next`` as ONNX Runtime asks for them."""

    def __init__(self, inputs: Iterator[np.ndarray]) -> None:
        self.inputs = inputs

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.inputs, None)
        return None if x is None else {"input": x}


# ---------------------------------------------------------------------------- quantize


def quantize(float_model: bytes, calibration: Iterator[np.ndarray], reduce_range: bool) -> bytes:
    """``float_model`` quantized to int8 (QDQ, per-channel weights), calibrated on the
    ``calibration`` batches. One :class:`ExportError` line where the tool fails."""
    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        src, prepared, out = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(float_model)
        try:
            quant_pre_process(str(src), str(prepared))
            quantize_static(
                str(prepared),
                str(out),
                _Calibration(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:  # the tool raises many types; all mean "cannot quantize"
            raise ExportError(f"--int8: cannot quantize: {unsupported_reason(exc)}") from exc
        return out.read_bytes()


def labels_of(model: bytes, inputs: Iterator[np.ndarray], fixed_batch: bool) -> np.ndarray:
    """Top-1 class of every input, by ONNX Runtime."""
    session = ort_session(model)
    out = []
    for x in inputs:
        parts = [x[i : i + 1] for i in range(len(x))] if fixed_batch else [x]
        out.extend(session.run(None, {"input": p})[0].argmax(1) for p in parts)
    return np.concatenate(out)


def _quantized_nodes(model: bytes) -> int:
    import onnx

    graph = onnx.load_from_string(model).graph
    return sum(node.op_type == "QuantizeLinear" for node in graph.node)


# ---------------------------------------------------------------------------- export


def _check_options(opset: int, calibration_images: int, min_agreement: float) -> None:
    if not MIN_OPSET <= opset <= 23:
        raise ExportError(f"--opset {opset}: --int8 needs an ONNX opset between {MIN_OPSET} and 23")
    if calibration_images < 1:
        raise ExportError(f"--calibration-images {calibration_images}: give at least 1")
    if not 0 <= min_agreement <= 1:
        raise ExportError(f"--min-agreement {100 * min_agreement:g}: give a percentage, 0 to 100")


def export_int8(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    calibration_images: int = CALIBRATION_IMAGES,
    verify_images: int = VERIFY_IMAGES,
    min_agreement: float = MIN_AGREEMENT,
    reduce_range: bool = True,
) -> Int8Result:
    """Quantize one run to an int8 ONNX file at ``out`` (default ``RUN/model.int8.onnx``).

    Calibrated on ``calibration_images`` of the run's training images; written only when
    its top-1 labels agree with the float model's on at least ``min_agreement`` (a
    fraction) of up to ``verify_images`` validation images. ``dynamic_batch`` as in
    :func:`imgclf.export.export`. Raises :class:`ExportError` (one line) otherwise.
    """
    started = time.perf_counter()
    _check_options(opset, calibration_images, min_agreement)
    path = Path(out) if out is not None else default_int8_out(run)
    check_output_file(path)  # before anything is loaded, traced or calibrated
    rs = load_runs([run])
    if len(rs.runs) > 1:
        raise ExportError(
            f"--int8 quantizes one run; {run} is an ensemble of {len(rs.runs)}: export each "
            "member folder inside it with --int8, or the whole ensemble without it"
        )
    lr = rs.runs[0]
    if lr.exported:
        raise ExportError(
            f"--int8: {lr.path} is already an exported ONNX model; give its run folder"
        )
    graph = build_graph(rs)
    pre = graph.preprocess
    ds = run_dataset(lr, pre)
    calib_idx, calibrated_on = pick(ds, ("train", "all"), calibration_images, CALIBRATION_SEED)
    example = torch.zeros(2 if dynamic_batch else 1, 3, pre.input_size, pre.input_size)
    metadata = graph.metadata()
    float_model = graph.onnx(example, opset, dynamic_batch)
    calib_batch = CALIBRATION_BATCH if dynamic_batch else 1
    int8_model = quantize(float_model, batches(ds, calib_idx, pre, calib_batch), reduce_range)
    if _quantized_nodes(int8_model) == 0:
        raise ExportError(f"--int8: nothing in {lr.name}'s graph could be quantized")
    models = (float_model, int8_model)
    # A final fit trained on its val images (imgclf.runtime.final_fit): its accuracies come
    # from the test split where there is one, and say so where they are not held out.
    trained = trained_splits(lr.state)
    splits = ("test", "val", "all") if "val" in trained else VERIFY_SPLITS
    mapping = label_map(rs.classes, ds)
    checked = (verify_images, dynamic_batch, splits, trained)
    result = verify(models, ds, mapping, pre, *checked)
    result.path, result.run, result.calibrated_on = path, lr.name, calibrated_on
    result.metadata = {**metadata, **_described(result, metadata, reduce_range)}
    data = set_metadata(int8_model, result.metadata)
    _refuse_below(result, min_agreement)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    result.int8_bytes, result.seconds = len(data), time.perf_counter() - started
    return result


def verify(
    models: tuple[bytes, bytes],
    ds: Dataset,
    mapping: np.ndarray,
    pre: Preprocess,
    count: int,
    dynamic_batch: bool,
    splits: tuple[str, ...] = VERIFY_SPLITS,
    trained: tuple[str, ...] = (),
) -> Int8Result:
    """The float and int8 models' labels on up to ``count`` images of the first split of
    ``splits`` that has some (validation, else test, else every image): their agreement
    and both accuracies. ``mapping``: data label → the models' class index; ``trained``:
    the splits the run trained on, marked in ``verified_on``."""
    idx, verified_on = pick(ds, splits, count, CALIBRATION_SEED, trained)
    truth = mapping[ds.labels[idx]]
    fixed = not dynamic_batch
    expected, got = (labels_of(m, batches(ds, idx, pre, VERIFY_BATCH), fixed) for m in models)
    return Int8Result(
        path=Path(),
        run="",
        calibrated_on="",
        verified_on=verified_on,
        agreement=float((got == expected).mean()),
        float_accuracy=float((expected == truth).mean()),
        int8_accuracy=float((got == truth).mean()),
        float_bytes=len(models[0]),
        int8_bytes=0,
        seconds=0.0,
        metadata={},
    )


def _refuse_below(result: Int8Result, min_agreement: float) -> None:
    if result.agreement < min_agreement:
        raise ExportError(
            f"--int8: the int8 model agrees with the float one on only "
            f"{100 * result.agreement:.1f}% of {result.verified_on} (accuracy "
            f"{100 * result.float_accuracy:.2f}% → {100 * result.int8_accuracy:.2f}%), below "
            f"--min-agreement {100 * min_agreement:g}; nothing written (use the float export, "
            "or --min-agreement 0 to write it anyway)"
        )


def _described(result: Int8Result, metadata: dict[str, str], reduce_range: bool) -> dict[str, str]:
    """The metadata of the int8 file: the float export's, with ``quantization`` added to
    the JSON description and as a flat key (same conventions as :mod:`imgclf.export`)."""
    quantization: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "uint8, per tensor, min/max calibration",
        "weights": "int8, per output channel" + (", 7-bit (reduce_range)" if reduce_range else ""),
        "calibrated_on": result.calibrated_on,
        "calibration_seed": CALIBRATION_SEED,
        "verified_on": result.verified_on,
        "agreement": result.agreement,
        "float_accuracy": result.float_accuracy,
        "int8_accuracy": result.int8_accuracy,
        "accuracy_drop_points": result.drop,
    }
    info = json.loads(metadata[METADATA_KEY])
    info["quantization"] = quantization
    return {"quantization": json.dumps(quantization), METADATA_KEY: json.dumps(info)}
