"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): the benchmark's real image dataset.

Read from the IDX files of, in this order:

1. the folder named by ``$SELFTPT_FASHION_MNIST`` (when set it must hold the files: a wrong
   path is an error naming it, never silently passed over for another copy);
2. Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``),
   which puts them in ``/usr/share/datasets/fashion-mnist`` (``$SELFTPT_FASHION_MNIST_SYSTEM_DIR``
   names another folder to look in instead, e.g. an empty one, to try how the project behaves on
   a machine without the package);
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
# Where Debian's package is looked for, instead of DEBIAN_DIR (tests: a machine without the package).
SYSTEM_DIR_ENV = "SELFTPT_FASHION_MNIST_SYSTEM_DIR"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The official label order; the benchmark's class names (catalog.FashionDataset) follow it.
OFFICIAL_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


_IDX_NAMES = ", ".join(stem for pair in _FILES.values() for stem in pair)
# The fix of every "not found": the three sources locate() reads, in its order of preference.
INSTALL_HINT = (f"apt-get install dataset-fashion-mnist (Debian's package: the files in {DEBIAN_DIR}), "
                f"or set ${ENV_VAR} to a folder holding the four IDX files ({_IDX_NAMES}; .gz or not), "
                "or on a machine with internet let torchvision download them "
                "(python -m selftpt.benchmark.materialize --download --datasets FashionMNIST)")


class FashionMNISTUnavailable(FileNotFoundError):
    """No Fashion-MNIST files found (and downloading was not allowed or failed), or
    ``$SELFTPT_FASHION_MNIST`` names a folder without them.

    Args:
        problem: what is wrong.
        path: the folder concerned (the one ``$SELFTPT_FASHION_MNIST`` names, else the folders searched).
        fix: what to do.
    """

    def __init__(self, problem: str, path: str, fix: str = INSTALL_HINT):
        self.problem, self.path, self.fix = problem, path, fix
        super().__init__(f"{problem}: {path}. Fix: {fix}")

    def __reduce__(self):  # picklable despite the custom __init__
        return (type(self), (self.problem, self.path, self.fix))


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


def _missing(folder: Path) -> list[str]:
    """The IDX files (stems) that ``folder`` lacks."""
    return [s for pair in _FILES.values() for s in pair if _find(folder, s) is None]


def system_dir() -> Path:
    """Where Debian's package is looked for: ``$SELFTPT_FASHION_MNIST_SYSTEM_DIR`` or ``DEBIAN_DIR``."""
    return Path(os.environ[SYSTEM_DIR_ENV]).expanduser() if os.environ.get(SYSTEM_DIR_ENV) else DEBIAN_DIR


def candidate_dirs(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the IDX files, in order."""
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(system_dir())
    if cache_dir is not None:
        dirs.append(Path(cache_dir) / "FashionMNIST" / "raw")
    return dirs


def locate(cache_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder holding the four IDX files; downloads into ``cache_dir`` if allowed.

    Args:
        cache_dir: where torchvision's downloader puts (or put) its copy.
        download: allow torchvision's downloader when no local copy exists.
    """
    chosen = os.environ.get(ENV_VAR)
    if chosen:  # the user's explicit choice: use it or say why not, never another copy instead
        folder = Path(chosen).expanduser()
        missing = _missing(folder) if folder.is_dir() else []
        if not folder.is_dir() or missing:
            what = ("no such folder" if not folder.is_dir()
                    else f"that folder lacks {', '.join(missing)} (with or without .gz)")
            raise FashionMNISTUnavailable(
                f"${ENV_VAR} is set, but {what}", str(folder),
                f"point ${ENV_VAR} at the folder holding the four Fashion-MNIST IDX files, or unset it to "
                f"use Debian's package (apt-get install dataset-fashion-mnist, files in {DEBIAN_DIR})")
        return folder
    for folder in candidate_dirs(cache_dir):
        if not _missing(folder):
            return folder
    searched = ", ".join(str(d) for d in candidate_dirs(cache_dir))
    if download and cache_dir is not None:
        import torchvision

        print(f"Downloading Fashion-MNIST with torchvision into {cache_dir}")
        try:
            torchvision.datasets.FashionMNIST(str(cache_dir), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(cache_dir), train=False, download=True)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            reason = " ".join(str(exc).split())[:200]
            raise FashionMNISTUnavailable(
                f"Fashion-MNIST not found (${ENV_VAR} is not set) and downloading it failed ({reason})",
                searched) from exc
        return locate(cache_dir, download=False)
    raise FashionMNISTUnavailable(f"Fashion-MNIST not found (${ENV_VAR} is not set); searched", searched)


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
