"""An ONNX file written by ``imgclf export`` (float or ``--int8``), loaded as a run.

``predict``, ``serve`` and ``eval`` take such a file wherever they take a run folder: its
metadata (:func:`imgclf.export.Graph.metadata`, the JSON under ``imgclf``) holds the class
names and the preprocessing, so the file alone turns an image into a label, by the very
preprocessing :mod:`imgclf.data.preprocess` defines for the run it came from. The graph
runs on ONNX Runtime's CPU provider, always: there is no PyTorch model behind it.

A file without that metadata, or whose graph does not take the input its metadata
describes, is one :class:`~imgclf.errors.CheckpointError` line: a model read with the
wrong classes or input size would label every image wrongly without a word.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from imgclf.errors import CheckpointError
from imgclf.runtime.onnx import OnnxNet, ort_session, unsupported_reason

SUFFIX = ".onnx"
METADATA_KEY = "imgclf"  # the key imgclf.export writes its JSON description under
OUTPUTS = ("logits", "probabilities")
MODEL_NAME = "onnx"  # what serve's /info shows as the model of such a run


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` names an ONNX file (by its suffix, as ``imgclf export`` names them)."""
    return Path(path).suffix.lower() == SUFFIX


class ExportedNet(OnnxNet):
    """An exported graph behind the interface of the model it was exported from: the
    normalized float batch in, logits out (a graph of a fixed batch of 1, the export's
    default, run image by image: :class:`~imgclf.runtime.onnx.OnnxNet`). A vote's graph
    outputs probabilities; their logarithm is returned, whose softmax is those
    probabilities again, so every caller that takes a softmax of logits (predict, serve,
    eval's loss) gets the vote's numbers."""

    def __init__(self, session: Any, output: str) -> None:
        super().__init__(session)
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = super().forward(x).float()
        if self.output == "probabilities":
            result = torch.log(result.clamp_min(torch.finfo(torch.float32).tiny))
        return result.to(x.device)


def read_description(path: Path) -> dict[str, Any]:
    """The JSON description ``imgclf export`` stores in the file's metadata."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise CheckpointError(
            f"{path}: not a readable ONNX file ({unsupported_reason(exc)})"
        ) from exc
    props = {p.key: p.value for p in model.metadata_props}
    try:
        info = json.loads(props[METADATA_KEY])
    except (KeyError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{path}: an ONNX file without imgclf's description (class names, "
            "preprocessing); give a file written by `imgclf export`, or the run folder"
        )
    return info


def _state(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint fields inference reads, from the description; one line if it is not
    what ``imgclf export`` writes."""
    try:
        classes = [str(c) for c in info["classes"]]
        size = int(info["input_size"])
        source = [int(v) for v in info["source_size"]]
        mean = [float(v) for v in info["mean"]]
        std = [float(v) for v in info["std"]]
        output = str(info["output"])
        ok = len(source) == 2 and len(mean) == len(std) == 3 and size > 0 and min(source) > 0
        ok = ok and len(set(classes)) == len(classes) > 0 and output in OUTPUTS
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: its imgclf description is damaged; export the run again")
    return {
        "model_name": MODEL_NAME,
        "class_names": classes,
        "input_size": size,
        "source_size": source,
        "mean": mean,
        "std": std,
        "path": str(path),
        "exported": info,
    }


def load_exported(path: str | Path) -> tuple[ExportedNet, dict[str, Any]]:
    """The graph in ``path`` as a module, and the checkpoint fields inference reads
    (``exported`` holds the whole description, quantization results included)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    state = _state(path, read_description(path))
    try:
        session = ort_session(path)
    except Exception as exc:  # ONNX Runtime raises its own types for a graph it cannot run
        raise CheckpointError(
            f"{path}: ONNX Runtime cannot run it ({unsupported_reason(exc)})"
        ) from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size, classes = state["input_size"], len(state["class_names"])
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    width = outputs[0].shape[-1] if len(outputs) == 1 and outputs[0].shape else None
    if shape[1:] != [3, size, size] or width != classes:
        raise CheckpointError(
            f"{path}: its graph takes {shape or len(inputs)} and gives {width} outputs, not "
            f"[N, 3, {size}, {size}] → {classes} classes as its description says"
        )
    return ExportedNet(session, state["exported"]["output"]), state
