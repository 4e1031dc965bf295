"""Write the benchmark datasets to disk in CoOp's layout, once, atomically.

Each dataset becomes ``<root>/<dataset_dir>/`` holding ``images/<class>/<split>_<n>.png``,
the CoOp split file ``split_<Name>.json`` (``{"train"|"val"|"test": [[relpath, label,
classname], ...]}``, paths relative to ``images/``) and ``benchmark.json`` (what was generated,
from which world version and seed). A dataset is written into a temporary folder beside its
final place and renamed into place when complete, so an interrupted generation never leaves a
half dataset; a folder from another world version is replaced. Temporary folders are named
``.<folder>.tmp-<host>-<pid>-<random>``: one left by a generation that was killed (SIGKILL, a
power cut) is removed by the next generation into the same root once its process is gone.
Folders and files get the user's umask (a shared root stays readable to the group).

Where: ``DATASET.ROOT`` when given; otherwise ``default_data_root()``, that is
``$SELFTPT_DATA`` or ``~/.cache/selftpt/data``.

Command line::

    python -m selftpt.benchmark.materialize [--root DIR] [--datasets ShapeWorld ...] [--force]

``--force`` regenerates datasets already on disk (e.g. after images were deleted: a copy
counts as present from its ``benchmark.json`` and split file; the images are not listed at
each load).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from selftpt.benchmark import fashion
from selftpt.benchmark.catalog import DATASETS, FashionDataset, WorldDataset, get_dataset
from selftpt.benchmark.world import WORLD_VERSION, SceneBatch, SceneSampler, concat_batches, render_scenes
from selftpt.fsmode import chmod_folder

ENV_ROOT = "SELFTPT_DATA"
RESOLUTION = 32
SPLITS = ("train", "val", "test")
META_FILE = "benchmark.json"


# ``.<folder>.<tmp|stale>-<host>-<pid>-<mkdtemp's random part, no "-">``: the owner is in the
# name itself, since a marker file written after mkdtemp could be missing after a SIGKILL
TEMP_NAME = re.compile(r"\.(?P<folder>.+)\.(?P<kind>tmp|stale)-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[^-]+)")
# Temporary folders this process is using now (a dead process may have had our pid before us).
_OWN_TEMPS: set[str] = set()
_TEMPS_LOCK = threading.Lock()


def _host() -> str:
    """This machine's name as it goes into temp folder names (a shared root may be on NFS:
    only this host's processes can be checked)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _make_temp(root: Path, folder: str, kind: str) -> Path:
    """A new temporary folder ``.<folder>.<kind>-<host>-<pid>-XXXX`` in ``root``, recorded as ours."""
    with _TEMPS_LOCK:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.{kind}-{_host()}-{os.getpid()}-", dir=root))
        _OWN_TEMPS.add(str(tmp))
    return tmp


def _drop_temp(tmp: Path) -> None:
    """Remove a temporary folder of ours (if still there) and forget it."""
    shutil.rmtree(tmp, ignore_errors=True)
    with _TEMPS_LOCK:
        _OWN_TEMPS.discard(str(tmp))


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (a zombie counts as gone: it never writes again)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: another user's live process
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def remove_dead_temps(root: str | os.PathLike, verbose: bool = True) -> list[Path]:
    """Remove the temporary folders in ``root`` left by generations whose process is gone.

    Only folders named by this module for this host are considered; one whose process still
    runs (or runs on another host, or is this process's own current one) is kept. A folder with
    this process's pid that this process is not using was left by an earlier process that had
    the same pid (containers restart with the same pids).

    Returns:
        The folders removed.
    """
    root = Path(root)
    removed = []
    host, me = _host(), os.getpid()
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    with _TEMPS_LOCK:
        for entry in entries:
            match = TEMP_NAME.fullmatch(entry.name)
            if not match or match["host"] != host or not entry.is_dir() or entry.is_symlink():
                continue
            pid = int(match["pid"])
            dead = str(entry) not in _OWN_TEMPS if pid == me else _process_gone(pid)
            if dead:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if verbose and removed:
        print(f"[selftpt.benchmark] removed {len(removed)} temporary folder(s) of interrupted generations "
              f"in {root}", flush=True)
    return removed


def default_data_root() -> Path:
    """Where benchmark datasets go when no root is given: ``$SELFTPT_DATA`` or ``~/.cache/selftpt/data``."""
    return Path(os.environ.get(ENV_ROOT) or "~/.cache/selftpt/data").expanduser().resolve()


def split_filename(name: str) -> str:
    """The split file of a benchmark dataset (CoOp's naming, without CoOp's author tag)."""
    return f"split_{name}.json"


def class_folder(classname: str) -> str:
    return classname.replace(" ", "_").replace("/", "_")


def sample_world_class(spec: WorldDataset, label: int, split: str, n: int) -> SceneBatch:
    """The ``n`` scenes of class ``label`` in ``split``: a pure function of the dataset's
    seed, the split and the label (adding classes never changes other classes)."""
    cls = spec.classes[label]
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), label, WORLD_VERSION])
    return SceneSampler().sample(
        rng, n, colors=[cls.color] * n, shapes=[cls.shape] * n, patterns=[cls.pattern] * n,
        styles=spec.style, min_size=spec.min_size,
    )


def render_world_class(spec: WorldDataset, label: int, split: str, n: int) -> np.ndarray:
    """The ``n`` images (n, 32, 32, 3) uint8 of class ``label`` in ``split``."""
    return render_scenes(sample_world_class(spec, label, split, n), resolution=RESOLUTION)


def world_split_arrays(spec: WorldDataset, chunk: int = 512) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per split, ``(label, images)`` for every class; splits with 0 images are left out.

    Classes are sampled one by one (their own seeds) and rendered together in chunks of about
    ``chunk`` scenes, which is several times faster than class by class and gives the same pixels.
    """
    counts = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for split in SPLITS:
        n = counts[split]
        if n == 0:
            continue
        labels = list(range(len(spec.classes)))
        per = max(1, chunk // n)
        images = []
        for i in range(0, len(labels), per):
            group = labels[i:i + per]
            images.append(render_scenes(concat_batches([sample_world_class(spec, lab, split, n) for lab in group]),
                                        resolution=RESOLUTION))
        images = np.concatenate(images)
        out[split] = [(lab, images[lab * n:(lab + 1) * n]) for lab in labels]
    return out


def fashion_split_arrays(spec: FashionDataset, cache_dir: Path | None,
                         download: bool) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Fashion-MNIST's benchmark splits: train/val from the official training images that
    pretraining does not use (index >= ``pretrain_pool``), test from the official test set;
    the first images of each class in file order (no randomness)."""
    tr_x, tr_y = fashion.load_split("train", cache_dir, download)
    te_x, te_y = fashion.load_split("test", cache_dir, download)
    pool_x, pool_y = tr_x[spec.pretrain_pool:], tr_y[spec.pretrain_pool:]
    out: dict[str, list] = {s: [] for s in SPLITS}
    for lab in range(len(spec.classnames)):
        idx = np.flatnonzero(pool_y == lab)
        if len(idx) < spec.n_train + spec.n_val:
            raise ValueError(f"Fashion-MNIST class {lab} has only {len(idx)} images outside the pretraining pool")
        out["train"].append((lab, fashion.to_rgb32(pool_x[idx[:spec.n_train]])))
        out["val"].append((lab, fashion.to_rgb32(pool_x[idx[spec.n_train:spec.n_train + spec.n_val]])))
        out["test"].append((lab, fashion.to_rgb32(te_x[np.flatnonzero(te_y == lab)[:spec.n_test]])))
    return out


def _write(folder: Path, spec, arrays: dict[str, list[tuple[int, np.ndarray]]]) -> dict[str, int]:
    names = list(spec.classnames)
    split: dict[str, list] = {s: [] for s in SPLITS}
    for s, per_class in arrays.items():
        for lab, images in per_class:
            sub = folder / "images" / class_folder(names[lab])
            sub.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                rel = f"{class_folder(names[lab])}/{s}_{i:04d}.png"
                Image.fromarray(img).save(folder / "images" / rel)
                split[s].append([rel, lab, names[lab]])
    if not split["train"]:  # test-only: train lists the test images (CoOp's ImageNet variants)
        split["train"] = list(split["test"])
    with open(folder / split_filename(spec.name), "w") as f:
        json.dump(split, f, indent=4, separators=(",", ": "))
    return {s: len(v) for s, v in split.items()}


def _meta(spec) -> dict:
    kind = "world" if isinstance(spec, WorldDataset) else "fashion"
    meta = {"name": spec.name, "kind": kind, "world_version": WORLD_VERSION, "resolution": RESOLUTION,
            "classnames": list(spec.classnames), "template": spec.template}
    if isinstance(spec, WorldDataset):
        meta.update(seed=spec.seed, style=spec.style,
                    per_class={"train": spec.n_train, "val": spec.n_val, "test": spec.n_test})
    else:
        meta.update(per_class={"train": spec.n_train, "val": spec.n_val, "test": spec.n_test},
                    pretrain_pool=spec.pretrain_pool)
    return meta


def is_materialized(name: str, root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a complete copy of dataset ``name`` from this world version."""
    spec = get_dataset(name)
    folder = Path(root) / spec.dataset_dir
    try:
        with open(folder / META_FILE) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    expected = _meta(spec)
    return all(meta.get(k) == v for k, v in expected.items()) and (folder / split_filename(name)).is_file()


def unavailable(name: str, root: str | os.PathLike | None = None,
                download: bool = True) -> fashion.FashionMNISTUnavailable | None:
    """Why benchmark dataset ``name`` cannot be generated under ``root`` here, or None when it can.

    Only Fashion-MNIST needs files from outside the repository: it can be generated when a
    complete copy is already under ``root`` or its IDX files are found (see ``fashion.locate``),
    after downloading them into ``root``'s download cache (where ``materialize`` looks) when
    ``download`` allows.
    """
    spec = get_dataset(name)
    if not isinstance(spec, FashionDataset):
        return None
    root = Path(root).expanduser().resolve() if root else default_data_root()
    if is_materialized(name, root):
        return None
    try:
        fashion.locate(root / "_downloads", download)
    except fashion.FashionMNISTUnavailable as exc:
        return exc
    return None


def materialize(name: str, root: str | os.PathLike | None = None, download: bool = False,
                verbose: bool = True, force: bool = False) -> Path:
    """Make sure benchmark dataset ``name`` is on disk under ``root``; return its folder.

    Args:
        name: a benchmark dataset (``catalog.DATASETS``).
        root: dataset root; ``None`` or "" = ``default_data_root()``.
        download: allow torchvision to download Fashion-MNIST when no local copy exists.
        verbose: print where it writes and how long it took.
        force: generate it again even if a complete-looking copy is there (images deleted or
            damaged since: the check reads ``benchmark.json`` and the split file only).
    """
    spec = get_dataset(name)
    root = Path(root).expanduser().resolve() if root else default_data_root()
    target = root / spec.dataset_dir
    if not force and is_materialized(name, root):
        return target
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(root, verbose)
    start = time.time()
    if verbose:
        print(f"[selftpt.benchmark] generating {name} into {target} (once; cached afterwards)", flush=True)
    if isinstance(spec, WorldDataset):
        arrays = world_split_arrays(spec)
    else:
        arrays = fashion_split_arrays(spec, root / "_downloads", download)  # the cache unavailable() fills
    tmp = _make_temp(root, spec.dataset_dir, "tmp")
    chmod_folder(tmp)  # mkdtemp's 0700 -> the umask's mode: it becomes the dataset folder
    try:
        counts = _write(tmp, spec, arrays)
        meta = _meta(spec) | {"counts": counts}
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2)
        if target.exists():  # a stale or partial copy (or, with force, a complete one): move it aside, remove it
            if not force and is_materialized(name, root):  # another process finished first
                _drop_temp(tmp)
                return target
            stale = _make_temp(root, spec.dataset_dir, "stale")
            os.replace(target, stale / "old")
            _drop_temp(stale)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_materialized(name, root):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race to an identical copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with _TEMPS_LOCK:
            _OWN_TEMPS.discard(str(tmp))
    if verbose:
        total = sum(v for k, v in counts.items() if k != "train" or spec_has_train(spec))
        print(f"[selftpt.benchmark] wrote {name}: {len(spec.classnames)} classes, {total} images, "
              f"{time.time() - start:.1f}s", flush=True)
    return target


def spec_has_train(spec) -> bool:
    return not (isinstance(spec, WorldDataset) and spec.n_train == 0)


def materialize_all(root: str | os.PathLike | None = None, names=None, download: bool = False,
                    force: bool = False) -> dict[str, Path]:
    """Materialise several benchmark datasets (all by default); returns name -> folder."""
    return {n: materialize(n, root, download=download, force=force) for n in (names or list(DATASETS))}


def main(argv=None) -> int:
    """The command line; returns the exit code (2 with one ``error:`` line for a missing
    Fashion-MNIST or an unknown dataset name, 130 on Ctrl-C)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="", help=f"dataset root (default ${ENV_ROOT} or ~/.cache/selftpt/data)")
    parser.add_argument("--datasets", nargs="*", default=None, help=f"default: all of {', '.join(DATASETS)}")
    parser.add_argument("--download", action="store_true", help="allow downloading Fashion-MNIST with torchvision")
    parser.add_argument("--force", action="store_true",
                        help="generate again even if present (e.g. after images were deleted)")
    args = parser.parse_args(argv)
    try:
        for name in args.datasets or []:
            get_dataset(name)
    except KeyError as exc:  # "Unknown benchmark dataset 'X'; did you mean ...? Known: ..."
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    try:
        folders = materialize_all(args.root or None, args.datasets, args.download, args.force)
    except fashion.FashionMNISTUnavailable as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the temporary folder is already removed: nothing half-written
        print("interrupted; nothing half-written is left: run the same command again", file=sys.stderr)
        return 130
    for name, path in folders.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
