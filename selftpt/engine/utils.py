"""Small helpers Dassl exposes from ``dassl.utils``: files, JSON, images, seeding, env info."""
from __future__ import annotations

import json
import os
import os.path as osp
import random
import urllib.request
import warnings
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image, UnidentifiedImageError

from .registry import check_availability, get_most_similar_str_to_a_from_b

__all__ = [
    "mkdir_if_missing",
    "check_isfile",
    "read_json",
    "write_json",
    "set_random_seed",
    "download_url",
    "read_image",
    "collect_env_info",
    "listdir_nohidden",
    "get_most_similar_str_to_a_from_b",
    "check_availability",
    "tolist_if_not",
]


def mkdir_if_missing(dirname: str) -> None:
    """Create ``dirname`` (and parents) if missing; no-op for ``""``."""
    if dirname:
        os.makedirs(dirname, exist_ok=True)


def check_isfile(fpath: str) -> bool:
    """Return whether ``fpath`` is a file; warn (do not raise) when it is not."""
    isfile = osp.isfile(fpath)
    if not isfile:
        warnings.warn(f'No file found at "{fpath}"')
    return isfile


def read_json(fpath: str) -> Any:
    """Load a JSON file."""
    with open(fpath, "r") as f:
        return json.load(f)


def write_json(obj: Any, fpath: str) -> None:
    """Write ``obj`` as indented JSON, creating the parent folder."""
    mkdir_if_missing(osp.dirname(fpath))
    with open(fpath, "w") as f:
        json.dump(obj, f, indent=4, separators=(",", ": "))


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and all CUDA devices).

    Like Dassl, nothing about cuDNN determinism is set.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def download_url(url: str, dst: str) -> None:
    """Download ``url`` to the file ``dst``."""
    print(f'* url="{url}"')
    print(f'* destination="{dst}"')
    mkdir_if_missing(osp.dirname(dst))
    urllib.request.urlretrieve(url, dst)


def read_image(path: str) -> Image.Image:
    """Read an image file as an RGB ``PIL.Image``.

    Raises:
        FileNotFoundError: no file at ``path``.
        OSError: the file exists but cannot be decoded as an image.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"Cannot read image {path}: {e}") from e


def collect_env_info() -> str:
    """torch's environment report plus the Pillow version."""
    from torch.utils.collect_env import get_pretty_env_info

    return get_pretty_env_info() + f"\n        Pillow ({PIL.__version__})"


def listdir_nohidden(path: str, sort: bool = False) -> list[str]:
    """List the entries of ``path`` that do not start with a dot."""
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    if sort:
        items.sort()
    return items


def tolist_if_not(x: Any) -> list:
    """Wrap ``x`` in a list unless it already is one."""
    return x if isinstance(x, list) else [x]
