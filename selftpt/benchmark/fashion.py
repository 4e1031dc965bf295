"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): the benchmark's real image dataset.

Read from the IDX files of, in this order:

1. the folder named by ``$SELFTPT_FASHION_MNIST``;
2. Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``),
   which puts them in ``/usr/share/datasets/fashion-mnist``;
3. torchvision's copy under ``<cache>/FashionMNIST/raw``, downloaded with
   ``torchvision.datasets.FashionMNIST(download=True)`` when ``download=True`` (a user's
   machine with internet; the project's build machines have the Debian package instead).

Images are 28x28 grayscale; ``to_rgb32`` pads them to the benchmark's 32x32 RGB.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "SELFTPT_FASHION_MNIST"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The official label order; the benchmark's class names (catalog.FashionDataset) follow it.
OFFICIAL_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class FashionMNISTUnavailable(FileNotFoundError):
    """No Fashion-MNIST files found (and downloading was not allowed or failed)."""


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def candidate_dirs(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the IDX files, in order."""
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(DEBIAN_DIR)
    if cache_dir is not None:
        dirs.append(Path(cache_dir) / "FashionMNIST" / "raw")
    return dirs


def locate(cache_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder holding the four IDX files; downloads into ``cache_dir`` if allowed.

    Args:
        cache_dir: where torchvision's downloader puts (or put) its copy.
        download: allow torchvision's downloader when no local copy exists.
    """
    for folder in candidate_dirs(cache_dir):
        if all(_find(folder, s) for pair in _FILES.values() for s in pair):
            return folder
    if download and cache_dir is not None:
        import torchvision

        print(f"Downloading Fashion-MNIST with torchvision into {cache_dir}")
        try:
            torchvision.datasets.FashionMNIST(str(cache_dir), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(cache_dir), train=False, download=True)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise FashionMNISTUnavailable(f"Downloading Fashion-MNIST failed ({exc})") from exc
        return locate(cache_dir, download=False)
    searched = ", ".join(str(d) for d in candidate_dirs(cache_dir))
    raise FashionMNISTUnavailable(
        f"Fashion-MNIST not found (searched {searched}). Install Debian's package "
        f"(apt-get install dataset-fashion-mnist), set ${ENV_VAR} to a folder with the four "
        "IDX files, or allow the download with torchvision on a machine with internet"
    )


def load_split(split: str, cache_dir: str | os.PathLike | None = None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) int64 of the official ``train`` or ``test`` split."""
    folder = locate(cache_dir, download)
    images_stem, labels_stem = _FILES[split]
    images = _read_idx(_find(folder, images_stem))
    labels = _read_idx(_find(folder, labels_stem)).astype(np.int64)
    if images.shape != (len(labels), 28, 28):
        raise ValueError(f"Unexpected Fashion-MNIST {split} files in {folder}: images {images.shape}")
    return images, labels


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """Pad 28x28 grayscale images (n, 28, 28) with 2 black pixels a side to (n, 32, 32, 3) RGB."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)
