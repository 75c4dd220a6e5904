"""Where imgclf keeps things on disk.

``IMGCLF_HOME`` moves everything (default ``~/.cache/imgclf``); datasets live in
``$IMGCLF_HOME/datasets/NAME``. Read from the environment on each call, never cached, so
tests and users can change it at run time.
"""

from __future__ import annotations

import os
from pathlib import Path


def imgclf_home() -> Path:
    env = os.environ.get("IMGCLF_HOME")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/imgclf").expanduser()


def datasets_dir() -> Path:
    return imgclf_home() / "datasets"


def dataset_dir(name: str) -> Path:
    return datasets_dir() / name
