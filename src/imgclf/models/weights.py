"""Where a pretrained backbone's weights come from, and how a file of them is read.

Shared by every pretrained model (backbones.py: torchvision; lite0.py): the order in
which a file, torchvision's cache, a pip-shipped file and a download are tried
(:func:`resolve_weights`), the one safe way to read a weights file
(:func:`load_state_file`) and the strict load that leaves out the classifier being
replaced (:func:`load_backbone_state`).
"""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf.errors import CheckpointError, WeightsMissing, one_line
from imgclf.runtime.checkpoint import safe_load

# Seconds a download may wait on the network: offline, name resolution fails at once, but
# a silently dropped connection would otherwise hang until the OS gives up (minutes).
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class WeightsSource:
    """Where the ImageNet weights of one architecture can come from."""

    model: str  # the name used in messages
    filename: str  # the file name in torchvision's cache folder
    url: str | None = None  # download URL (torchvision's ``Weights.url``)
    shipped: Callable[[], Path | None] | None = None  # a file a pip package ships (Lite0)
    install_hint: str = ""  # how to get the shipped file, for the error message


def cache_dir() -> Path:
    """torchvision's weights cache: ``$TORCH_HOME/hub/checkpoints`` (~/.cache/torch/…)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    source: WeightsSource, *, pretrained: bool, weights: str | Path | None
) -> dict[str, torch.Tensor] | None:
    """The state dict a backbone starts from, or None for random initialisation.

    In this order:

    1. ``weights``: a state-dict file (``--set weights=PATH``), used even when
       ``pretrained`` is false (an explicit file wins);
    2. ``pretrained: false``: None, random initialisation; nothing is read or fetched;
    3. torchvision's cache, ``cache_dir() / source.filename``;
    4. the file a pip package ships (``source.shipped``: Lite0's weights);
    5. a download of ``source.url`` into the cache, with a short socket timeout.

    Anything else raises :class:`WeightsMissing`, one line naming the file and the folder.
    """
    if weights is not None:
        return load_state_file(weights)
    if not pretrained:
        return None
    cached = cache_dir() / source.filename
    if cached.is_file():
        return load_state_file(cached)
    shipped = source.shipped() if source.shipped else None
    if shipped is not None and shipped.is_file():
        return load_state_file(shipped)
    reason = source.install_hint or "no download URL"
    if source.url:
        try:
            _download(source.url, cached)
        except (OSError, http.client.HTTPException, RuntimeError) as exc:
            # OSError covers URLError, socket timeouts and an unwritable cache folder;
            # RuntimeError is torch.hub's hash mismatch.
            reason = f"download failed: {one_line(str(exc) or type(exc).__name__)}"
        else:
            return load_state_file(cached)
    where = f" (download URL {source.url})" if source.url else ""
    raise WeightsMissing(
        f"{source.model} ImageNet weights not found: place {source.filename} in "
        f"{cache_dir()}/{where} or set pretrained: false / --set weights=PATH ({reason})"
    )


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # torchvision file names end in the first hex digits of the file's SHA-256.
    match = re.search(r"-([a-f0-9]{6,})\.", dest.name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # Writes a temporary file and renames it: an interrupted download leaves no
        # half file in the cache.
        torch.hub.download_url_to_file(
            url, str(dest), hash_prefix=match.group(1) if match else None, progress=True
        )
    finally:
        socket.setdefaulttimeout(previous)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file (``weights_only``: a file from elsewhere cannot run code).

    Accepts a plain state dict, one wrapped as ``{"state_dict": ...}``, or an imgclf
    checkpoint (its ``model_state``, with the wrapper's ``net.`` prefix removed).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    obj = safe_load(path, "weights file")
    if isinstance(obj, dict) and isinstance(obj.get("model_state"), dict):
        obj = {k.removeprefix("net."): v for k, v in obj["model_state"].items()}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (parameter names → tensors)")
    return obj


def load_backbone_state(
    net: nn.Module,
    state: Mapping[str, torch.Tensor],
    head_path: str,
    *,
    model: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``net``, all of it except the classifier at ``head_path`` (about
    to be replaced, and free to have another number of classes).

    Every other parameter and buffer must be in ``state`` with the same shape, and every
    key of ``state`` must be used (``ignore_prefixes``: auxiliary heads imgclf drops).
    """
    prefix = head_path + "."
    kept = {
        k: v
        for k, v in state.items()
        if not k.startswith(prefix) and not k.startswith(ignore_prefixes)
    }
    try:
        result = net.load_state_dict(kept, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise CheckpointError(f"weights do not fit {model}: {one_line(str(exc))[:300]}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(prefix)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"weights do not fit {model}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}"
        )
