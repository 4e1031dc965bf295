"""Helpers shared by the datasets: CoOp's split files, class halves, the few-shot cache, errors.

Formats are CoOp's, so a ``$DATA`` folder prepared for CoOp works unchanged:

* split file ``split_zhou_<Name>.json``: ``{"train": [[relpath, label, classname], ...],
  "val": [...], "test": [...]}``, ``relpath`` relative to the dataset's image folder; read
  as is, written only when absent (CoOp does the same);
* caches: CoOp's (``split_fewshot/shot_{K}-seed_{S}.pkl``, ImageNet's ``preprocessed.pkl``:
  pickled Dassl ``Datum`` objects with absolute paths) are read, without ``dassl``, and never
  written; the project's own go to ``*.selftpt.pkl`` next to them, with paths relative to the
  dataset folder (valid after ``$DATA`` moves) and, for few-shot subsets, a fingerprint of
  the split they were drawn from. See "caches shared with CoOp" below.

Every problem with the user's data is raised as :class:`DatasetError`: one line naming the
dataset, the path and the fix, which ``train.py`` prints without a traceback.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import os.path as osp
import pickle
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from selftpt.errors import DatasetError  # noqa: F401  (re-exported for the datasets)
from selftpt.fsmode import atomic_write
from selftpt.toolbox import DatasetBase, Datum, listdir_nohidden

__all__ = [
    "DatasetError",
    "CACHE_FORMAT",
    "COOP_IMAGENET_LISTING",
    "OWN_IMAGENET_LISTING",
    "CacheContent",
    "SplitIndex",
    "atomic_write_bytes",
    "atomic_write_json",
    "coop_fewshot_path",
    "fewshot_cache_path",
    "load_or_create_fewshot",
    "load_shared_cache",
    "make_datums",
    "read_cache",
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
    "to_entries",
    "write_entry_pickle",
]

SubsampleChoice = str  # "all" | "base" | "new"


# ----------------------------------------------------------------------------- files


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``,
    so an interrupted run never leaves a truncated file that later looks valid."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb", fsync=True) as f:  # fsync: a split file must survive a power cut
        f.write(data)


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


def read_lines(path: str) -> list[str]:
    """Non-empty, non-comment lines of a text file, stripped."""
    with open(path, "r") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


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
    """``impath`` relative to ``prefix`` with "/" separators (fast path for paths under it:
    ImageNet's 1.3M entries go through here)."""
    head = prefix.rstrip(os.sep) + os.sep
    if impath.startswith(head):
        rel = impath[len(head):]
    else:
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


# ----------------------------------------------------------------------------- caches shared with CoOp
#
# CoOp opens ``split_fewshot/shot_{K}-seed_{S}.pkl`` and ImageNet's ``preprocessed.pkl`` with a
# plain ``pickle.load`` and uses the items as Dassl ``Datum`` objects (``.label``,
# ``.impath``). Any other content under those names crashes CoOp, CoCoOp, PromptSRC ... run on
# the same ``$DATA``. So the project's caches have their own names (``*.selftpt.pkl``), and
# CoOp's files are only ever read, never written or changed. The one exception: a file that an
# earlier version of this project wrote in its own format under CoOp's name (recognised by its
# format marker) is moved out of CoOp's way.

Entry = tuple[str, int, str]  # (path relative to the dataset folder, label, classname)

CACHE_FORMAT = "selftpt-cache-v2"  # marks our caches (relative paths; few-shot: split fingerprint)
_OLD_FORMATS = ("selftpt-cache-v1",)  # earlier versions, written under CoOp's file names
OWN_SUFFIX = ".selftpt.pkl"
COOP_IMAGENET_LISTING = "preprocessed.pkl"  # CoOp's ImageNet file listing
OWN_IMAGENET_LISTING = "preprocessed" + OWN_SUFFIX

ORIGIN_OWN, ORIGIN_OLD_OWN, ORIGIN_COOP = "selftpt", "selftpt-old", "coop"


def coop_fewshot_path(dataset_dir: str, num_shots: int, seed: int) -> str:
    """``<dataset_dir>/split_fewshot/shot_{K}-seed_{S}.pkl``: CoOp's few-shot cache (read only)."""
    return osp.join(dataset_dir, "split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl")


def fewshot_cache_path(dataset_dir: str, num_shots: int, seed: int) -> str:
    """``<dataset_dir>/split_fewshot/shot_{K}-seed_{S}.selftpt.pkl``: the project's few-shot cache."""
    return osp.join(dataset_dir, "split_fewshot", f"shot_{num_shots}-seed_{seed}{OWN_SUFFIX}")


class _LegacyDatum:
    """Stand-in for a pickled Dassl ``Datum``: unpickling CoOp's caches needs no ``dassl``
    (the pickle names ``dassl.data.datasets.base_dataset.Datum``; the state is its
    ``_impath``/``_label``/``_domain``/``_classname`` attributes)."""


class _CacheUnpickler(pickle.Unpickler):
    """Unpickles what the caches hold: containers, strings, numbers and ``Datum`` objects.

    ``Datum`` of any module (Dassl's, the engine's) maps to :class:`_LegacyDatum`. Any other
    class is refused: a pickle in a shared ``$DATA`` folder could otherwise run code on load.
    """

    # protocol 0/1 pickles of plain objects go through these two
    _ALLOWED = frozenset({("copyreg", "_reconstructor"), ("builtins", "object")})

    def find_class(self, module: str, name: str) -> Any:
        if name == "Datum":
            return _LegacyDatum
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a cache file")


def _reroot(impath: str, dataset_dir: str) -> str:
    """The path, relative to ``dataset_dir``, of an absolute path cached by CoOp.

    A path under ``dataset_dir`` is made relative. One written under another root (``$DATA``
    moved, re-mounted, or reached through a symbolic link) is cut after the dataset folder's
    name, trying each occurrence of ``/<name>/`` from the left and keeping the first that
    exists here; when none does, the last, which the callers' checks then reject.
    """
    if not osp.isabs(impath):
        return impath.replace(os.sep, "/")
    head = dataset_dir.rstrip(os.sep) + os.sep
    if impath.startswith(head):
        return impath[len(head):].replace(os.sep, "/")
    marker = f"{os.sep}{osp.basename(osp.normpath(dataset_dir))}{os.sep}"
    parts = impath.split(marker)
    if len(parts) < 2:
        return impath  # foreign absolute path: joining it to dataset_dir leaves it unchanged
    candidates = [marker.join(parts[i:]) for i in range(1, len(parts))]
    for rel in candidates:
        if osp.isfile(osp.join(dataset_dir, rel)):
            return rel.replace(os.sep, "/")
    return candidates[-1].replace(os.sep, "/")


@dataclass
class CacheContent:
    """A cache file's content as entry lists.

    Attributes:
        origin: ``"selftpt"`` (this version's format), ``"selftpt-old"`` (an earlier
            version's, found under CoOp's name) or ``"coop"`` (pickled ``Datum`` objects).
        meta: the non-list fields (ours only: format, dataset, seed, split fingerprint, ...).
        entries: ``{key: [(relpath, label, classname), ...]}`` relative to the dataset folder.
    """

    origin: str
    meta: dict[str, Any]
    entries: dict[str, list[Entry]]


def _entries_from_cache(items: Any, dataset_dir: str, datums: bool) -> list[Entry]:
    """Turn cached items into entries: our ``[relpath, label, classname]`` lists, or CoOp's
    ``Datum`` objects (absolute paths, re-rooted at ``dataset_dir``)."""
    if not isinstance(items, list):
        raise ValueError(f"a list was expected, found {type(items).__name__}")
    out: list[Entry] = []
    for item in items:
        if not datums:
            if not (isinstance(item, (list, tuple)) and len(item) == 3):
                raise ValueError(f"unrecognised cache item {item!r}")
            out.append((str(item[0]), int(item[1]), str(item[2])))
            continue
        state = getattr(item, "__dict__", None) if isinstance(item, _LegacyDatum) else None
        impath = (state or {}).get("_impath")
        if not isinstance(impath, str):
            raise ValueError(f"unrecognised cache item {item!r}")
        out.append((_reroot(impath, dataset_dir), int(state.get("_label", 0)), str(state.get("_classname", ""))))
    return out


def read_cache(path: str, dataset_dir: str, keys: Sequence[str]) -> CacheContent:
    """Read a cache pickle: ours (any version) or CoOp's pickled ``Datum`` lists.

    Raises:
        ValueError: with the reason, if the file cannot be unpickled, lacks a key or holds
            items of neither format.
    """
    try:
        with open(path, "rb") as f:
            data = _CacheUnpickler(io.BytesIO(f.read())).load()
    except Exception as e:  # any unpickling failure means a corrupt (or foreign) file
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"missing keys (expected {', '.join(keys)})")
    fmt = data.get("format")
    if fmt == CACHE_FORMAT:
        origin = ORIGIN_OWN
    elif fmt in _OLD_FORMATS:
        origin = ORIGIN_OLD_OWN
    elif fmt is None:
        origin = ORIGIN_COOP
    else:
        raise ValueError(f"in an unknown format {fmt!r}")
    try:
        entries = {k: _entries_from_cache(data[k], dataset_dir, datums=origin == ORIGIN_COOP) for k in keys}
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed ({e})") from None
    meta = {k: v for k, v in data.items() if k not in keys and not isinstance(v, list)}
    return CacheContent(origin, meta, entries)


def read_entry_pickle(path: str, dataset_dir: str, keys: Sequence[str]) -> dict[str, list[Entry]]:
    """The entry lists of a cache pickle (see :func:`read_cache`)."""
    return read_cache(path, dataset_dir, keys).entries


def _write_entries(path: str, entries: dict[str, Sequence[Entry]], **meta: Any) -> None:
    """Atomically pickle entry lists with our format marker and ``meta``."""
    data: dict[str, Any] = {"format": CACHE_FORMAT, **meta}
    for key, items in entries.items():
        data[key] = [[rel, int(label), cname] for rel, label, cname in items]
    atomic_write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL), path)


def to_entries(items: Iterable[Any], dataset_dir: str) -> list[Entry]:
    """``Datum`` objects as entries relative to ``dataset_dir``."""
    head = dataset_dir.rstrip(os.sep) + os.sep
    cut = len(head)
    out: list[Entry] = []
    for item in items:  # inlined fast path of _relative: ImageNet has 1.3M items
        impath = item.impath
        rel = impath[cut:] if impath.startswith(head) else _relative(impath, dataset_dir)
        out.append((rel.replace(os.sep, "/") if os.sep != "/" else rel, int(item.label), item.classname))
    return out


def write_entry_pickle(path: str, dataset_dir: str, splits: dict[str, Sequence], **meta: Any) -> None:
    """Atomically pickle ``splits`` (lists of ``Datum``) with paths relative to
    ``dataset_dir``, plus the ``meta`` fields and our format marker. ``path`` must not be
    one of CoOp's file names (see the section comment)."""
    _write_entries(path, {key: to_entries(items, dataset_dir) for key, items in splits.items()}, **meta)


def _move_out_of_coops_way(dataset: str, path: str, kept: str) -> None:
    """Remove a file an earlier version of the project wrote in its own format under CoOp's
    file name (CoOp fails on it with ``'list' object has no attribute 'label'``)."""
    try:
        os.remove(path)
    except FileNotFoundError:  # a concurrent run removed it first
        return
    except OSError as e:
        print(f"WARNING: {dataset}: {path} was written by an earlier Self-TPT version in its own format "
              f"under CoOp's file name, where CoOp fails on it, and cannot be removed ({e}); delete it by hand")
        return
    print(f"{dataset}: removed {path}: an earlier Self-TPT version wrote it in its own format under "
          f"CoOp's file name, where CoOp fails on it ('list' object has no attribute 'label'); {kept}")


def load_shared_cache(
    dataset: str,
    dataset_dir: str,
    coop_path: str,
    own_path: str,
    keys: Sequence[str],
    what: str,
    problem_of: Callable[[CacheContent], Optional[str]],
    own_meta: dict[str, Any],
) -> Optional[dict[str, list]]:
    """Load a cache that CoOp and the project may both keep for the same data.

    Order: CoOp's file, if present and valid (so the project uses what CoOp-family runs on
    this ``$DATA`` use) → the project's own file → ``None`` (the caller builds it and writes
    ``own_path``). CoOp's file is never changed; a file of an earlier project version under
    CoOp's name is migrated to ``own_path`` (when valid and ``own_path`` is absent) and removed.

    Args:
        dataset: dataset name for messages.
        dataset_dir: the dataset folder; cached paths are relative to it.
        coop_path, own_path: CoOp's and the project's file for this cache.
        keys: the lists the file must hold.
        what: the cache's name in messages ("few-shot data", "file listing").
        problem_of: why a cache's content may not be used (stale, ...), or None if it may.
        own_meta: fields written with a migrated cache.

    Returns:
        ``{key: [Datum, ...]}``, or None if nothing usable was found.
    """
    if osp.exists(coop_path):
        try:
            content: Optional[CacheContent] = read_cache(coop_path, dataset_dir, keys)
        except ValueError as reason:
            print(f"{dataset}: not using {coop_path} (CoOp's {what} file name): it is {reason}; "
                  f"leaving it as it is")
            content = None
        if content is not None and content.origin == ORIGIN_OLD_OWN:
            problem = problem_of(content)
            migrated = problem is None and not osp.exists(own_path)
            if migrated:
                _write_entries(own_path, content.entries, **own_meta)
            _move_out_of_coops_way(dataset, coop_path, f"its content moved to {own_path}" if migrated else
                                   f"the project's own file is {own_path}")
        elif content is not None:  # CoOp's own file: used as is, or left alone
            problem = problem_of(content)
            datums, problem = (None, problem) if problem else _as_datums(content, dataset_dir, dataset, coop_path)
            if datums is not None:
                print(f"Loading CoOp's {what} from {coop_path}")
                return datums
            print(f"{dataset}: not using CoOp's {what} {coop_path}: it is {problem}; leaving it as it is "
                  f"(CoOp itself would still use it: delete it so that CoOp rebuilds it too)")
    if osp.exists(own_path):
        try:
            content = read_cache(own_path, dataset_dir, keys)
            if content.origin != ORIGIN_OWN:
                raise ValueError(f"not in this version's format ({content.origin})")
            problem = problem_of(content)
            datums, problem = (None, problem) if problem else _as_datums(content, dataset_dir, dataset, own_path)
            if datums is None:
                raise ValueError(problem)
        except ValueError as reason:
            print(f"{dataset}: {what} cache {own_path} is {reason}; rebuilding it")
        else:
            print(f"Loading preprocessed {what} from {own_path}")
            return datums
    return None


def _as_datums(content: CacheContent, dataset_dir: str, dataset: str,
               path: str) -> tuple[Optional[dict[str, list]], str]:
    """``({key: [Datum, ...]}, "")``, or ``(None, "stale (...)")`` if an image the cache lists
    is not on disk (``Datum`` checks each file: one stat per image, done once)."""
    try:
        return {k: make_datums(v, dataset_dir, dataset, path, "") for k, v in content.entries.items()}, ""
    except DatasetError as e:
        return None, f"stale ({e.problem.replace(f' listed in {osp.basename(path)}', '')}: {e.path})"


# ----------------------------------------------------------------------------- few-shot subsets


class SplitIndex:
    """The full train (and val) lists a few-shot subset is drawn from, as entries.

    ``fingerprint`` (SHA-256 over the ordered entries) identifies the draw's input: the draw
    depends on the lists' content *and* order, so a rebuilt or edited split gives another
    fingerprint, while a re-formatted split file or a moved ``$DATA`` (paths are relative)
    keeps it.
    """

    def __init__(self, dataset_dir: str, train: Sequence, val: Optional[Sequence]):
        self.entries: dict[str, list[Entry]] = {"train": to_entries(train, dataset_dir)}
        if val is not None:
            self.entries["val"] = to_entries(val, dataset_dir)
        digest = hashlib.sha256()
        for key, entries in self.entries.items():
            digest.update(f"[{key}]\n".encode())
            for start in range(0, len(entries), 65536):  # chunks: fast, and bounded memory
                chunk = entries[start:start + 65536]
                digest.update("".join(f"{rel}\t{label}\t{cname}\n" for rel, label, cname in chunk).encode())
        self.fingerprint = digest.hexdigest()
        self.classes = {label: cname for _, label, cname in self.entries["train"]}

    def subset_problem(self, cached: dict[str, list[Entry]], num_shots: int, membership: bool = True) -> Optional[str]:
        """Why ``cached`` is not a ``num_shots``-shot subset of these lists, or None.

        Every class must be present in train with the split's class name, no class may have
        more than ``num_shots`` train / ``min(num_shots, 4)`` val items, and, with
        ``membership``, every cached item must be an item of the same list (path, label and
        class name). Membership is what ties a cache without a fingerprint (CoOp's) to the
        current split; it costs a lookup table of the full lists (ImageNet: 1.3M entries).
        """
        names = self.classes
        for key, entries in cached.items():
            lookup = {rel: (label, cname) for rel, label, cname in self.entries[key]} if membership else {}
            counts: dict[int, int] = defaultdict(int)
            limit = num_shots if key == "train" else min(num_shots, 4)
            for rel, label, cname in entries:
                if names.get(label) != cname:
                    return f"stale (label {label} is {cname!r}, the split says {names.get(label)!r})"
                if membership and rel not in lookup:
                    return f"stale ({key} image {rel} is not in the split's {key} list)"
                if membership and lookup[rel] != (label, cname):
                    return f"stale ({rel} is labelled {label}, the split says {lookup[rel][0]})"
                counts[label] += 1
                if counts[label] > limit:
                    return f"stale (class {label} has more than {limit} {key} images)"
        cached_labels = {label for _, label, _ in cached["train"]}
        if cached_labels != set(names):
            return f"stale ({len(cached_labels)} classes, the split has {len(names)})"
        return None


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
    """Return the ``num_shots``-per-class train (and val) subsets, from a cache or drawn anew.

    Drawing follows ``DatasetBase.generate_fewshot_dataset`` (Python's global ``random``):
    train gets ``num_shots`` per class, val ``min(num_shots, 4)`` (CoOp). With ``seed >= 0``
    the generator is seeded with it just before drawing, so the subset depends on the seed
    only — for a run seeded as CoOp's ``train.py`` does, the same subset CoOp draws — and the
    previous ``random`` state is restored afterwards, so a cache hit and a miss leave the run
    identical.

    Caches (see :func:`load_shared_cache`): CoOp's ``shot_{K}-seed_{S}.pkl``, if it is a
    subset of the current split, is used as is (the subset CoOp-family runs on this
    ``$DATA`` use); else the project's ``shot_{K}-seed_{S}.selftpt.pkl``, if drawn from the
    current split (same fingerprint of the full train/val lists); else a new draw, saved
    there. A corrupt or stale cache is rebuilt (ours) or left alone (CoOp's), with a message.

    Args:
        sampler: the dataset object whose ``generate_fewshot_dataset`` draws the subset.
        dataset: dataset name for messages.
        dataset_dir: the dataset folder; cached paths are relative to it.
        train, val: the full splits (``val`` unused when ``with_val`` is False).
        num_shots: shots per class (>= 1).
        seed: ``cfg.SEED`` (part of the cache names, as in CoOp).
        with_val: also draw val (False for ImageNet, whose val stays the full val set).
    """
    index = SplitIndex(dataset_dir, train, val if with_val else None)
    keys = tuple(index.entries)

    def problem_of(content: CacheContent) -> Optional[str]:
        # ours records the split it was drawn from; CoOp's (and the project's v1 files) do not,
        # so for them membership in the current split is the test
        if content.origin == ORIGIN_OWN:
            if content.meta.get("split_sha256") != index.fingerprint:
                return ("stale (drawn from another version of the split: its train/val lists "
                        "changed since, e.g. the split file was rebuilt)")
            return index.subset_problem(content.entries, num_shots, membership=False)
        return index.subset_problem(content.entries, num_shots)

    meta = {"dataset": dataset, "num_shots": num_shots, "seed": seed, "num_classes": len(index.classes),
            "split_sha256": index.fingerprint}
    own_path = fewshot_cache_path(dataset_dir, num_shots, seed)
    cached = load_shared_cache(
        dataset, dataset_dir, coop_fewshot_path(dataset_dir, num_shots, seed), own_path, keys,
        "few-shot data", problem_of, meta,
    )
    if cached is not None:
        return cached["train"], (cached["val"] if with_val else val)

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
    print(f"Saving preprocessed few-shot data to {own_path}")
    write_entry_pickle(own_path, dataset_dir, splits, **meta)
    return list(new_train), (list(new_val) if with_val else val)
