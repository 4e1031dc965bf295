"""Helpers shared by the datasets: CoOp's split files, class halves, the few-shot cache, errors.

Formats are CoOp's, so a ``$DATA`` folder prepared for CoOp works unchanged:

* split file ``split_zhou_<Name>.json``: ``{"train": [[relpath, label, classname], ...],
  "val": [...], "test": [...]}``, ``relpath`` relative to the dataset's image folder;
* few-shot cache ``<dataset>/split_fewshot/shot_{K}-seed_{S}.pkl``. Unlike CoOp's (pickled
  ``Datum`` objects with absolute paths, useless once ``$DATA`` moves), ours stores paths
  relative to the dataset folder. CoOp's old caches are still read (re-rooted if ``$DATA``
  moved).

Every problem with the user's data is raised as :class:`DatasetError`: one line naming the
dataset, the path and the fix, which ``train.py`` prints without a traceback.
"""
from __future__ import annotations

import io
import json
import math
import os
import os.path as osp
import pickle
import random
import tempfile
import warnings
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

from selftpt.errors import DatasetError  # noqa: F401  (re-exported for the datasets)
from selftpt.toolbox import Datum, DatasetBase, listdir_nohidden

__all__ = [
    "DatasetError",
    "CACHE_FORMAT",
    "atomic_write_bytes",
    "atomic_write_json",
    "fewshot_cache_path",
    "load_or_create_fewshot",
    "make_datums",
    "read_entry_pickle",
    "read_split",
    "require_dir",
    "require_train_classes",
    "resolve_root",
    "save_split",
    "split_class_folders",
    "split_problems",
    "split_trainval",
    "subsample_classes",
    "write_entry_pickle",
]

SubsampleChoice = str  # "all" | "base" | "new"
CACHE_FORMAT = "selftpt-cache-v1"  # marks our relative-path caches (vs CoOp's pickled Datums)


# ----------------------------------------------------------------------------- files


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``,
    so an interrupted run never leaves a truncated file that later looks valid."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{osp.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON (Dassl's ``write_json`` layout), atomically."""
    text = json.dumps(obj, indent=4, separators=(",", ": "))
    atomic_write_bytes(text.encode("utf-8"), path)


def resolve_root(cfg: Any, dataset: str) -> str:
    """Return ``abspath(expanduser(cfg.DATASET.ROOT))``; an empty root is an error, not ``cwd``."""
    root = str(cfg.DATASET.ROOT or "").strip()
    if not root:
        raise DatasetError(
            dataset, "DATASET.ROOT is empty", "(no --root given)",
            "pass --root /path/to/your/datasets (the folder holding one sub-folder per dataset)",
        )
    return osp.abspath(osp.expanduser(root))


def require_dir(dataset: str, path: str, what: str, fix: str) -> None:
    """Raise :class:`DatasetError` if the folder ``path`` does not exist."""
    if not osp.isdir(path):
        raise DatasetError(dataset, f"{what} not found", path, fix)


def make_datums(
    entries: Iterable[Sequence[Any]],
    path_prefix: str,
    dataset: str,
    source: str,
    fix: str,
) -> list:
    """Build ``Datum`` objects from ``(relpath, label, classname)`` entries.

    A missing image is reported (with how many others are missing) as one
    :class:`DatasetError` instead of ``Datum``'s bare assertion.

    Args:
        entries: ``(relpath, label, classname)`` triples; relpath joined to ``path_prefix``.
        path_prefix: folder the relative paths start from.
        dataset: dataset name for messages.
        source: the file that listed the images (named in the message).
        fix: how to repair missing images.
    """
    items, missing = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dassl's check_isfile warns once per missing file
        for rel, label, cname in entries:
            impath = osp.join(path_prefix, rel)
            try:  # Datum checks the file (one stat per image matters for ImageNet's 1.3M)
                items.append(Datum(impath=impath, label=int(label), classname=str(cname)))
            except AssertionError:  # Dassl asserts; the engine raises a subclass of it
                missing.append(impath)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(
            dataset, f"image listed in {osp.basename(source)} not found on disk{more}", missing[0], fix
        )
    return items


# ----------------------------------------------------------------------------- split files


def split_problems(split: Any, num_classes: Optional[int] = None) -> list[str]:
    """Return what is wrong with a loaded split JSON (empty list if it is well formed).

    Checks CoOp's format (``train``/``val``/``test`` lists of ``[relpath, int label,
    classname]``), labels ``0..n-1`` with one class name each, and, if given, the class count.
    """
    if not isinstance(split, dict):
        return [f"top level is {type(split).__name__}, expected an object with train/val/test"]
    problems = [f"key '{k}' missing" for k in ("train", "val", "test") if k not in split]
    if problems:
        return problems
    names: dict[int, str] = {}
    for key in ("train", "val", "test"):
        items = split[key]
        if not isinstance(items, list):
            return [f"'{key}' is {type(items).__name__}, expected a list"]
        for i, item in enumerate(items):
            ok = (
                isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and isinstance(item[2], str)
            )
            if not ok:
                return [f"'{key}'[{i}] is {item!r}, expected [relpath, label, classname]"]
            if names.setdefault(item[1], item[2]) != item[2]:
                return [f"label {item[1]} has two class names ({names[item[1]]!r}, {item[2]!r})"]
    if not split["train"]:
        problems.append("'train' is empty")
    labels = sorted(names)
    if labels and labels != list(range(len(labels))):
        problems.append(f"labels are not 0..{len(labels) - 1}")
    if num_classes is not None and len(labels) != num_classes:
        problems.append(f"{len(labels)} classes, expected {num_classes}")
    return problems


def read_split(
    filepath: str,
    path_prefix: str,
    dataset: str = "dataset",
    fix: str = "re-extract the dataset's images (see DATASETS.md)",
) -> tuple[list, list, list]:
    """Read a CoOp split JSON into ``(train, val, test)`` lists of ``Datum``.

    Args:
        filepath: the ``split_zhou_*.json`` file.
        path_prefix: folder its relative paths start from (the image folder; the dataset
            folder for StanfordCars).
        dataset: dataset name for messages.
        fix: how to repair images that the split lists but the disk lacks.
    """
    print(f"Reading split from {filepath}")
    try:
        with open(filepath, "r") as f:
            split = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(
            dataset, f"split file is unreadable ({type(e).__name__}: {e})", filepath,
            f"delete it and run `python prepare_data.py download --datasets {dataset} --root <DATA>`",
        ) from None
    problems = split_problems(split)
    if problems:
        raise DatasetError(
            dataset, f"split file is malformed ({'; '.join(problems[:3])})", filepath,
            f"delete it and run `python prepare_data.py download --datasets {dataset} --root <DATA>`",
        )
    return tuple(make_datums(split[k], path_prefix, dataset, filepath, fix) for k in ("train", "val", "test"))


def _relative(impath: str, prefix: str) -> str:
    rel = osp.relpath(impath, prefix) if osp.isabs(impath) else impath
    return rel.replace(os.sep, "/")


def save_split(train: Sequence, val: Sequence, test: Sequence, filepath: str, path_prefix: str) -> None:
    """Write ``(train, val, test)`` as a CoOp split JSON with paths relative to ``path_prefix``."""
    split = {
        key: [[_relative(item.impath, path_prefix), int(item.label), item.classname] for item in items]
        for key, items in (("train", train), ("val", val), ("test", test))
    }
    atomic_write_json(split, filepath)
    print(f"Saved split to {filepath}")


def split_trainval(trainval: Sequence, p_val: float = 0.2) -> tuple[list, list]:
    """Split ``trainval`` per class: ``round(n * p_val)`` shuffled items of each class go to
    val, the rest to train (CoOp's rule; uses the global ``random``)."""
    print(f"Splitting trainval into {1 - p_val:.0%} train and {p_val:.0%} val")
    by_label: dict[int, list[int]] = defaultdict(list)
    for idx, item in enumerate(trainval):
        by_label[item.label].append(idx)
    train, val = [], []
    for label, idxs in by_label.items():
        n_val = round(len(idxs) * p_val)
        if n_val <= 0:
            raise ValueError(f"class {label} has {len(idxs)} trainval items: too few for a val split")
        random.shuffle(idxs)
        val.extend(trainval[i] for i in idxs[:n_val])
        train.extend(trainval[i] for i in idxs[n_val:])
    return train, val


def split_class_folders(
    image_dir: str,
    p_trn: float = 0.5,
    p_val: float = 0.2,
    ignored: Sequence[str] = (),
    new_cnames: Optional[dict[str, str]] = None,
    dataset: str = "dataset",
) -> tuple[list, list, list]:
    """Split a folder-per-class image tree into train/val/test per class (CoOp's
    ``read_and_split_data``): sorted class folders (minus ``ignored``) give labels
    ``0..n-1``; each class is shuffled and cut ``p_trn`` / ``p_val`` / rest; ``new_cnames``
    renames folders to class names."""
    categories = sorted(c for c in listdir_nohidden(image_dir) if c not in ignored)
    print(f"Splitting into {p_trn:.0%} train, {p_val:.0%} val, and {1 - p_trn - p_val:.0%} test")
    train, val, test = [], [], []
    for label, category in enumerate(categories):
        folder = osp.join(image_dir, category)
        # sorted: os.listdir order is file-system dependent, which made CoOp's splits so too
        images = [osp.join(folder, f) for f in sorted(listdir_nohidden(folder))]
        random.shuffle(images)
        n_train, n_val = round(len(images) * p_trn), round(len(images) * p_val)
        if min(n_train, n_val, len(images) - n_train - n_val) <= 0:
            raise DatasetError(
                dataset, f"class folder has {len(images)} images, too few to split into train/val/test",
                folder, "restore the folder's images from the dataset archive",
            )
        cname = (new_cnames or {}).get(category, category)
        parts = (images[:n_train], images[n_train:n_train + n_val], images[n_train + n_val:])
        for out, part in zip((train, val, test), parts):
            out.extend(Datum(impath=p, label=label, classname=cname) for p in part)
    return train, val, test


# ----------------------------------------------------------------------------- classes


def subsample_classes(*args: Sequence, subsample: SubsampleChoice = "all") -> Any:
    """Keep the base or new half of the classes, relabelled from 0 (CoOp's base-to-new rule).

    The sorted labels of the **first** argument are cut at ``ceil(n / 2)``: ``base`` keeps
    the first part, ``new`` the rest; ``all`` returns the inputs unchanged.

    Returns:
        The filtered lists, in argument order (a tuple for ``all``, else a list).
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"DATASET.SUBSAMPLE_CLASSES must be all, base or new, got {subsample!r}")
    if subsample == "all":
        return args
    labels = sorted({item.label for item in args[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}
    print(f"SUBSAMPLE {subsample.upper()} CLASSES!")
    return [
        [
            Datum(impath=item.impath, label=relabel[item.label], domain=item.domain, classname=item.classname)
            for item in items
            if item.label in relabel
        ]
        for items in args
    ]


def require_train_classes(dataset: str, train: Sequence, reference: Iterable[Sequence], where: str, fix: str) -> None:
    """Raise if a class present in ``reference`` lists (e.g. the full train and test) has no
    item in ``train``: Dassl derives the class count and names from ``train_x`` only, so an
    empty class would silently shift or drop class names."""
    have = {item.label for item in train}
    for items in reference:
        for item in items:
            if item.label not in have:
                raise DatasetError(
                    dataset, f"class {item.label} ({item.classname!r}) has no training image {where}",
                    item.impath, fix,
                )


# ----------------------------------------------------------------------------- few-shot cache


def fewshot_cache_path(dataset_dir: str, num_shots: int, seed: int) -> str:
    """``<dataset_dir>/split_fewshot/shot_{K}-seed_{S}.pkl`` (CoOp's name)."""
    return osp.join(dataset_dir, "split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl")


class _LegacyDatum:
    """Stand-in for a pickled Dassl ``Datum``: unpickling CoOp's caches needs no ``dassl``."""


class _CacheUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "Datum":
            return _LegacyDatum
        return super().find_class(module, name)


def _entries_from_cache(items: Any, dataset_dir: str) -> list[tuple[str, int, str]]:
    """Turn cached items into ``(relpath, label, classname)``. CoOp's legacy ``Datum`` items
    carry absolute paths: kept relative to ``dataset_dir`` when they lie under it, or, after
    a move of ``$DATA``, re-rooted at the dataset folder's name."""
    if not isinstance(items, list):
        raise ValueError(f"a list was expected, found {type(items).__name__}")
    out = []
    name = osp.basename(osp.normpath(dataset_dir))
    for item in items:
        if isinstance(item, (list, tuple)) and len(item) == 3:
            out.append((str(item[0]), int(item[1]), str(item[2])))
            continue
        state = getattr(item, "__dict__", None) or {}
        impath = state.get("_impath")
        if not isinstance(impath, str):
            raise ValueError(f"unrecognised cache item {item!r}")
        rel = osp.relpath(impath, dataset_dir)
        marker = f"{os.sep}{name}{os.sep}"
        if rel.startswith("..") and not osp.isfile(impath) and marker in impath:
            rel = impath.rsplit(marker, 1)[1]  # written under another $DATA: re-root at "<name>/"
        elif rel.startswith(".."):
            rel = impath  # absolute; joining it to dataset_dir leaves it unchanged
        out.append((rel, int(state.get("_label", 0)), str(state.get("_classname", ""))))
    return out


def read_entry_pickle(path: str, dataset_dir: str, keys: Sequence[str]) -> dict[str, list]:
    """Read a cache pickle (ours, or CoOp's pickled ``Datum`` lists) as
    ``{key: [(relpath, label, classname), ...]}`` with paths relative to ``dataset_dir``.

    Raises:
        ValueError: with the reason, if the file cannot be unpickled or lacks a key.
    """
    try:
        with open(path, "rb") as f:
            data = _CacheUnpickler(io.BytesIO(f.read())).load()
    except Exception as e:  # any unpickling failure means a corrupt file
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"missing keys (expected {', '.join(keys)})")
    try:
        return {k: _entries_from_cache(data[k], dataset_dir) for k in keys}
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed ({e})") from None


def write_entry_pickle(path: str, dataset_dir: str, splits: dict[str, Sequence], **meta: Any) -> None:
    """Atomically pickle ``splits`` (lists of ``Datum``) with paths relative to
    ``dataset_dir``, plus the ``meta`` fields and our format marker."""
    data: dict[str, Any] = {"format": CACHE_FORMAT, **meta}
    for key, items in splits.items():
        data[key] = [[_relative(item.impath, dataset_dir), int(item.label), item.classname] for item in items]
    atomic_write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL), path)


def _read_fewshot_cache(path: str, dataset_dir: str, full_train: Sequence, with_val: bool) -> dict[str, list]:
    """Load a few-shot cache as entry lists; raise ``ValueError(reason)`` if corrupt or stale."""
    cached = read_entry_pickle(path, dataset_dir, ("train", "val") if with_val else ("train",))
    names = {item.label: item.classname for item in full_train}
    cached_labels = {label for _, label, _ in cached["train"]}
    if cached_labels != set(names):
        raise ValueError(f"stale ({len(cached_labels)} classes, the split has {len(names)})")
    for rel, label, cname in (entry for entries in cached.values() for entry in entries):
        if names.get(label) != cname:
            raise ValueError(f"stale (label {label} is {cname!r}, the split says {names.get(label)!r})")
        if not osp.isfile(osp.join(dataset_dir, rel)):
            raise ValueError(f"stale (image {osp.join(dataset_dir, rel)} no longer exists)")
    return cached


def load_or_create_fewshot(
    sampler: DatasetBase,
    dataset: str,
    dataset_dir: str,
    train: Sequence,
    val: Optional[Sequence],
    num_shots: int,
    seed: int,
    with_val: bool = True,
) -> tuple[list, Optional[list]]:
    """Return the ``num_shots``-per-class train (and val) subsets, from the cache or drawn anew.

    Drawing follows ``DatasetBase.generate_fewshot_dataset`` (Python's global ``random``):
    train gets ``num_shots`` per class, val ``min(num_shots, 4)`` (CoOp). With ``seed >= 0``
    the generator is seeded with it just before drawing, so the subset depends on the seed
    only — for a run seeded as CoOp's ``train.py`` does, the same subset CoOp draws — and the
    previous ``random`` state is restored afterwards, so a cache hit and a miss leave the run
    identical. A corrupt or stale cache is rebuilt with a message.

    Args:
        sampler: the dataset object whose ``generate_fewshot_dataset`` draws the subset.
        dataset: dataset name for messages.
        dataset_dir: the dataset folder; cached paths are relative to it.
        train, val: the full splits (``val`` unused when ``with_val`` is False).
        num_shots: shots per class (>= 1).
        seed: ``cfg.SEED`` (part of the cache name, as in CoOp).
        with_val: also draw val (False for ImageNet, whose val stays the full val set).
    """
    path = fewshot_cache_path(dataset_dir, num_shots, seed)
    if osp.exists(path):
        try:
            cached = _read_fewshot_cache(path, dataset_dir, train, with_val)
        except ValueError as reason:
            print(f"{dataset}: few-shot cache {path} is {reason}; rebuilding it")
        else:
            print(f"Loading preprocessed few-shot data from {path}")
            fix = f"delete {path} to redraw the few-shot subset"
            new_train = make_datums(cached["train"], dataset_dir, dataset, path, fix)
            new_val = make_datums(cached["val"], dataset_dir, dataset, path, fix) if with_val else val
            return new_train, new_val

    state = random.getstate()
    if seed >= 0:
        random.seed(seed)
    try:
        new_train = sampler.generate_fewshot_dataset(list(train), num_shots=num_shots)
        new_val = sampler.generate_fewshot_dataset(list(val or []), num_shots=min(num_shots, 4)) if with_val else val
    finally:
        if seed >= 0:
            random.setstate(state)

    splits = {"train": new_train, "val": new_val} if with_val else {"train": new_train}
    print(f"Saving preprocessed few-shot data to {path}")
    write_entry_pickle(
        path, dataset_dir, splits, dataset=dataset, num_shots=num_shots, seed=seed,
        num_classes=len({item.label for item in train}),
    )
    return list(new_train), (list(new_val) if with_val else val)
