"""Where a pretrained backbone's weights come from, and how a file of them is read.

Shared by every pretrained model (backbones.py: torchvision; lite0.py): the order in
which a file, torchvision's cache, a pip-shipped file and a download are tried
(:func:`resolve_weights`), the one safe way to read a weights file
(:func:`load_state_file`) and the strict load that leaves out the classifier being
replaced (:func:`load_backbone_state`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.errors import CheckpointError, WeightsMissing, one_line
from imgclf.io_utils import make_folder
from imgclf.runtime.checkpoint import safe_load
from imgclf.runtime.finite import describe, nonfinite

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

    def local(self) -> Path | None:
        """The weights file on this machine (torchvision's cache, then the shipped file), or
        None: what a build reads without a download, and what ``imgclf models`` reports."""
        cached = cache_dir() / self.filename
        if cached.is_file():
            return cached
        shipped = self.shipped() if self.shipped else None
        return shipped if shipped is not None and shipped.is_file() else None


def cache_dir() -> Path:
    """torchvision's weights cache: ``$TORCH_HOME/hub/checkpoints`` (~/.cache/torch/…)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    source: WeightsSource, *, pretrained: bool, weights: str | Path | None
) -> dict[str, torch.Tensor] | None:
    """The state dict a backbone starts from, or None for random initialisation.

    In this order:

    1. ``weights``: a state-dict file (``imgclf train --weights FILE``), used even when
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
    local = source.local()
    if local is not None:
        return load_state_file(local)
    cached = cache_dir() / source.filename
    reason = source.install_hint or "no download URL"
    if source.url:
        try:
            _download(source.url, cached)
        except Exception as exc:
            if not is_download_error(exc):
                raise
            reason = download_failure(exc)
        else:
            return load_state_file(cached)
    where = f" (download URL {source.url})" if source.url else ""
    raise WeightsMissing(
        f"{source.model} ImageNet weights not found: place {source.filename} in "
        f"{cache_dir()}/{where} or set pretrained: false / --weights FILE / "
        f"--set weights=PATH ({reason})"
    )


# The HTTP clients downloads go through, by top-level module: urllib (torch.hub), and
# requests, httpx or httpx2 under huggingface_hub (before 1.0, 1.x, 2.x: its connection
# errors become LocalEntryNotFoundError, an OSError, but one lost mid-file surfaces as the
# client's own). requests' errors are OSErrors too.
_HTTP_CLIENTS = frozenset({"httpx", "httpx2", "requests", "urllib3", "huggingface_hub"})


def is_download_error(exc: BaseException) -> bool:
    """Whether ``exc`` means "could not download" rather than a bug: OSError (URLError,
    socket timeouts, an unwritable cache folder, huggingface_hub's errors), an HTTP
    protocol error, RuntimeError (torch.hub's hash mismatch) or an HTTP client's error."""
    if isinstance(exc, OSError | http.client.HTTPException | RuntimeError):
        return True
    return type(exc).__module__.partition(".")[0] in _HTTP_CLIENTS


def download_failure(exc: BaseException) -> str:
    """Why a download failed, on one line, for a :class:`WeightsMissing` message."""
    return f"download failed: {one_line(str(exc) or type(exc).__name__)}"


@contextlib.contextmanager
def download_timeout() -> Iterator[None]:
    """Sockets opened inside wait at most DOWNLOAD_TIMEOUT_S for the network."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(url: str, dest: Path) -> None:
    make_folder(dest.parent)
    # torchvision file names end in the first hex digits of the file's SHA-256.
    match = re.search(r"-([a-f0-9]{6,})\.", dest.name)
    with download_timeout():
        # Writes a temporary file and renames it: an interrupted download leaves no
        # half file in the cache.
        torch.hub.download_url_to_file(
            url, str(dest), hash_prefix=match.group(1) if match else None, progress=True
        )


# Where training scripts keep the weights in a checkpoint, in the order timm's own loader
# looks (timm/models/_helpers.py, load_state_dict with use_ema=True): the EMA copy first,
# then the trained weights. imgclf's checkpoints keep them under "model_state".
_STATE_KEYS = ("model_state", "state_dict_ema", "model_ema", "state_dict", "model")
# Wrappers that prefix every key: DistributedDataParallel and torch.compile (timm's
# clean_state_dict removes the same two).
_KEY_PREFIXES = ("module.", "_orig_mod.")


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file (``weights_only``: a file from elsewhere cannot run code).

    Accepts a plain state dict or one under any key of ``_STATE_KEYS`` (timm's and most
    training scripts' checkpoint layouts; an imgclf checkpoint's ``model_state``, whose
    wrapper prefix ``net.`` goes), with ``module.``/``_orig_mod.`` prefixes removed; and a
    ``.safetensors`` file (tensors only, nothing to execute: the Hugging Face hub's format).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        obj: Any = _load_safetensors(path)
    else:
        # timm's training checkpoints hold their arguments as an argparse.Namespace, a
        # plain attribute holder; timm's own _torch_load allows it the same way.
        obj = safe_load(path, "weights file", allow=(argparse.Namespace,))
    if isinstance(obj, dict):
        key = next((k for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
        obj = _strip(obj[key] if key else obj, ("net.",) if key == "model_state" else ())
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (parameter names → tensors)")
    bad = nonfinite(obj)
    if bad:
        raise CheckpointError(
            f"{path}: its weights hold NaN or infinite values ({describe(bad)}); use "
            "another weights file"
        )
    return obj


def _strip(state: Mapping[Any, Any], wrapper: tuple[str, ...]) -> dict[Any, Any]:
    prefixes = (*wrapper, *_KEY_PREFIXES)
    out = {}
    for key, value in state.items():
        while isinstance(key, str) and key.startswith(prefixes):
            key = key.removeprefix(next(p for p in prefixes if key.startswith(p)))
        out[key] = value
    return out


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable weights file ({one_line(str(exc))})") from exc


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
