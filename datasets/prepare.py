"""Download CoOp's small per-dataset files and check a ``$DATA`` folder (behind ``prepare_data.py``).

``download_files`` fetches the split JSONs, Flowers' ``cat_to_name.json`` and ImageNet's
``classnames.txt`` from Google Drive (gdown) into the right folders: each file goes to a
temporary name, is verified (format, class count, SHA-256 once recorded in
``catalog.SHA256``) and only then renamed into place. A failed fetch (an offline machine,
Drive's quota page) is returned as a result that says which URL to fetch by hand and where
to put it; nothing raises.

``check_dataset`` reports per dataset ``ready`` / ``missing`` (what) / ``malformed`` (what).
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from selftpt.fsmode import atomic_path

from .catalog import CATALOG, SHA256, DatasetSpec, RemoteFile, get_spec
from .common import DatasetError, split_problems
from .fgvc_aircraft import read_aircraft_lists

__all__ = [
    "FileResult",
    "CheckResult",
    "Downloader",
    "gdown_download",
    "sha256_of",
    "file_problems",
    "download_files",
    "check_dataset",
    "select_specs",
]

Downloader = Callable[[str, str], None]  # (drive id, output path) -> None; raises on failure

FLOWER_CLASSES = 102
IMAGENET_CLASSES = 1000
_WNID = re.compile(r"^n\d{8}$")


@dataclass
class FileResult:
    """Outcome of one file of the download command.

    ``status``: ``present`` (already there and valid), ``downloaded``, ``copied`` (from
    another folder's verified copy), ``failed`` (could not fetch) or ``invalid`` (fetched
    but failed verification; not installed).
    """

    dataset: str
    remote: RemoteFile
    path: str
    status: str
    detail: str = ""
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("present", "downloaded", "copied")


@dataclass
class CheckResult:
    """Verdict of the checker for one dataset: ``ready``, ``missing`` or ``malformed``."""

    dataset: str
    folder: str
    missing: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "malformed" if self.malformed else "missing" if self.missing else "ready"

    @property
    def details(self) -> str:
        parts = [f"malformed: {m}" for m in self.malformed] + [f"missing: {m}" for m in self.missing]
        return "; ".join(parts)


def select_specs(names: Optional[Sequence[str]] = None) -> list[DatasetSpec]:
    """Specs for registry names or config stems (all 15 when ``names`` is empty)."""
    if not names:
        return list(CATALOG.values())
    return [get_spec(n) for n in names]


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gdown_download(drive_id: str, output: str) -> None:
    """Fetch a Google Drive file with gdown; raise on any failure (gdown sometimes returns
    None instead of raising, e.g. on Drive's quota page)."""
    import gdown  # imported here so that checking needs no network package

    result = gdown.download(id=drive_id, output=output, quiet=True)
    if result is None or not osp.isfile(output):
        raise RuntimeError("gdown returned no file (Drive quota or access page?)")


def _classnames_problems(path: str) -> list[str]:
    with open(path, "r", encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    wnids = [ln.split(" ", 1)[0] for ln in lines]
    problems = []
    if len(lines) != IMAGENET_CLASSES:
        problems.append(f"{len(lines)} lines, expected {IMAGENET_CLASSES} '<wnid> <class name>' lines")
    bad = [ln for ln in lines if not _WNID.match(ln.split(" ", 1)[0]) or " " not in ln]
    if bad:
        problems.append(f"line {bad[0]!r} is not '<wnid> <class name>'")
    if len(set(wnids)) != len(wnids):
        problems.append("repeated wnids")
    return problems


def _cat_to_name_problems(path: str) -> list[str]:
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    expected = {str(i) for i in range(1, FLOWER_CLASSES + 1)}
    if not isinstance(data, dict) or set(data) != expected:
        return [f"expected an object with keys '1'..'{FLOWER_CLASSES}'"]
    if not all(isinstance(v, str) and v for v in data.values()):
        return ["class names must be non-empty strings"]
    return []


def file_problems(remote: RemoteFile, path: str, num_classes: int) -> list[str]:
    """What is wrong with a local copy of ``remote`` (empty list if it verifies).

    Checks the SHA-256 when ``catalog.SHA256`` records one, and always the format: a split
    JSON with train/val/test and ``num_classes`` classes; 102 flower names; 1000 ImageNet
    class names.
    """
    expected = SHA256.get(remote.filename)
    if expected and sha256_of(path) != expected:
        return [f"SHA-256 differs from the recorded {expected[:12]}..."]
    try:
        if remote.kind == "split":
            with open(path, "r", encoding="utf-8") as f:
                return split_problems(json.load(f), num_classes)
        if remote.kind == "cat_to_name":
            return _cat_to_name_problems(path)
        if remote.kind == "classnames":
            return _classnames_problems(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    raise ValueError(f"unknown file kind {remote.kind!r}")


def _install_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically (temporary name in ``dst``'s folder + rename)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def download_files(
    root: str,
    specs: Iterable[DatasetSpec],
    downloader: Optional[Downloader] = None,
    force: bool = False,
) -> list[FileResult]:
    """Fetch every remote file of ``specs`` into ``root/<folder>/``.

    A present file that verifies is kept unless ``force``. ``classnames.txt`` is fetched once
    and copied into each ImageNet-family folder (as CoOp's DATASETS.md asks). Downloads go
    to ``<name>.part`` and are renamed only after verification, so a broken download never
    replaces a file. ``downloader`` defaults to :func:`gdown_download`.
    """
    downloader = downloader or gdown_download
    specs = list(specs)
    failed_ids: dict[str, str] = {}  # drive id -> reason: one failure per file is enough
    root = osp.abspath(osp.expanduser(root))
    verified: dict[str, str] = {}  # drive id -> a verified local copy, reused for duplicates
    if not force:
        for spec in CATALOG.values():
            for remote in spec.remote:
                path = osp.join(root, spec.folder, remote.filename)
                if (remote.drive_id not in verified and osp.isfile(path)
                        and not file_problems(remote, path, spec.num_classes)):
                    verified[remote.drive_id] = path
    results = []
    for spec in specs:
        folder = osp.join(root, spec.folder)
        for remote in spec.remote:
            dst = osp.join(folder, remote.filename)
            if not force and osp.isfile(dst) and not file_problems(remote, dst, spec.num_classes):
                results.append(FileResult(spec.name, remote, dst, "present", sha256=sha256_of(dst)))
                continue
            os.makedirs(folder, exist_ok=True)
            if remote.drive_id in verified and verified[remote.drive_id] != dst:
                _install_copy(verified[remote.drive_id], dst)
                results.append(FileResult(spec.name, remote, dst, "copied", f"from {verified[remote.drive_id]}",
                                          sha256_of(dst)))
                continue
            if remote.drive_id in failed_ids:
                results.append(FileResult(spec.name, remote, dst, "failed", failed_ids[remote.drive_id]))
                continue
            tmp = f"{dst}.part"
            try:
                downloader(remote.drive_id, tmp)
            except Exception as e:  # offline, blocked, quota: report, never a traceback
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                failed_ids[remote.drive_id] = f"{type(e).__name__}: {reason}"[:90]
                results.append(FileResult(spec.name, remote, dst, "failed", failed_ids[remote.drive_id]))
                if osp.exists(tmp):
                    os.remove(tmp)
                continue
            problems = file_problems(remote, tmp, spec.num_classes)
            if problems:
                os.remove(tmp)
                results.append(FileResult(spec.name, remote, dst, "invalid", "; ".join(problems)))
                continue
            digest = sha256_of(tmp)
            os.replace(tmp, dst)
            verified[remote.drive_id] = dst
            note = "" if SHA256.get(remote.filename) else "format verified; no SHA-256 recorded yet"
            results.append(FileResult(spec.name, remote, dst, "downloaded", note, digest))
    return results


# ----------------------------------------------------------------------------- checker


def _verify_images(paths: Iterable[str], result: CheckResult, limit: int = 3) -> None:
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception:  # PIL raises many types for a damaged file
            bad.append(path)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        result.malformed.append(f"corrupt image {bad[0]}{more}")


def _check_split_file(spec: DatasetSpec, dataset_dir: str, result: CheckResult, verify_images: bool) -> None:
    path = osp.join(dataset_dir, spec.split_file)
    if not osp.isfile(path):
        raw_missing = [f for f in spec.raw_files if not osp.exists(osp.join(dataset_dir, f))]
        hint = "" if raw_missing else " (a new split would be built from the raw files, not CoOp's)"
        result.missing.append(f"{spec.split_file}{hint}")
        return
    remote = next(r for r in spec.remote if r.filename == spec.split_file)
    problems = file_problems(remote, path, spec.num_classes)
    if problems:
        result.malformed.append(f"{spec.split_file} ({'; '.join(problems[:3])})")
        return
    with open(path, "r", encoding="utf-8") as f:
        split = json.load(f)
    if any(m.endswith("/") for m in result.missing):
        return  # an image folder is missing: listing each of its images would say nothing more
    prefix = osp.join(dataset_dir, spec.image_dir) if spec.image_dir else dataset_dir
    paths = [osp.join(prefix, rel) for key in ("train", "val", "test") for rel, _, _ in split[key]]
    absent = [p for p in paths if not osp.isfile(p)]
    if absent:
        result.missing.append(f"{len(absent)} of {len(paths)} images listed in {spec.split_file}, e.g. {absent[0]}")
    if verify_images:
        _verify_images((p for p in paths if osp.isfile(p)), result)


def _check_aircraft(spec: DatasetSpec, dataset_dir: str, result: CheckResult, verify_images: bool) -> None:
    if result.missing:
        return
    try:
        variants, splits = read_aircraft_lists(dataset_dir, spec.setup_fix())
    except DatasetError as err:
        result.malformed.append(err.problem)
        return
    if len(set(variants)) != spec.num_classes:
        result.malformed.append(f"variants.txt lists {len(set(variants))} variants, expected {spec.num_classes}")
    paths = [osp.join(dataset_dir, spec.image_dir, f"{image_id}.jpg")
             for pairs in splits.values() for image_id, _ in pairs]
    absent = [p for p in paths if not osp.isfile(p)]
    if absent:
        result.missing.append(f"{len(absent)} of {len(paths)} listed images, e.g. {absent[0]}")
    if verify_images:
        _verify_images((p for p in paths if osp.isfile(p)), result)


def _check_imagenet_family(spec: DatasetSpec, dataset_dir: str, result: CheckResult, verify_images: bool) -> None:
    names_path = osp.join(dataset_dir, "classnames.txt")
    if not osp.isfile(names_path) or any(m.endswith("/") for m in result.missing):
        return
    problems = _classnames_problems(names_path)
    if problems:
        result.malformed.append(f"classnames.txt ({'; '.join(problems)})")
        return
    with open(names_path) as f:
        wnids = [ln.split(" ", 1)[0] for ln in f if ln.strip()]
    for sub in spec.data_dirs:
        base = osp.join(dataset_dir, sub)
        found = sorted(f for f in os.listdir(base) if osp.isdir(osp.join(base, f)))
        if spec.name == "ImageNetV2":  # folders named by label
            absent = [str(i) for i in range(IMAGENET_CLASSES) if str(i) not in set(found)]
        elif spec.num_classes == IMAGENET_CLASSES:  # ImageNet, ImageNet-Sketch: every wnid
            absent = sorted(set(wnids) - set(found))
        else:  # ImageNet-A / -R: a subset of the wnids, of known size
            unknown = [f for f in found if f not in set(wnids)]
            if unknown:
                result.malformed.append(f"{sub}/{unknown[0]} is not a wnid of classnames.txt")
            absent = ["?"] * max(0, spec.num_classes - len(found))
        if absent:
            result.missing.append(
                f"{len(absent)} of {spec.num_classes} class folders in {sub}/ ({len(found)} found"
                + (f", e.g. {absent[0]} absent)" if absent[0] != "?" else ")")
            )
        empty = [f for f in found if not os.listdir(osp.join(base, f))]
        if empty:
            result.missing.append(f"images in {len(empty)} empty class folders of {sub}/, e.g. {empty[0]}")
        if verify_images:
            _verify_images((osp.join(base, d, n) for d in found for n in os.listdir(osp.join(base, d))), result)


def check_dataset(spec: DatasetSpec, root: str, verify_images: bool = False) -> CheckResult:
    """Check one dataset's folder under ``root``: folders, split/class-name files, listed
    images (and, with ``verify_images``, that each image decodes)."""
    dataset_dir = osp.join(osp.abspath(osp.expanduser(root)), spec.folder)
    result = CheckResult(spec.name, spec.folder)
    if not osp.isdir(dataset_dir):
        result.missing.append(f"dataset folder {spec.folder}/ ({spec.source})")
        return result
    result.missing += [f"{sub}/" for sub in spec.data_dirs if not osp.isdir(osp.join(dataset_dir, sub))]
    result.missing += [f for f in spec.required_files if not osp.isfile(osp.join(dataset_dir, f))]
    if not spec.split_file:
        result.missing += [f for f in spec.raw_files if not osp.isfile(osp.join(dataset_dir, f))]
    for remote in spec.remote:  # extra remote files (cat_to_name.json): malformed if present and bad
        path = osp.join(dataset_dir, remote.filename)
        if remote.kind == "cat_to_name" and osp.isfile(path):
            problems = file_problems(remote, path, spec.num_classes)
            if problems:
                result.malformed.append(f"{remote.filename} ({'; '.join(problems)})")
    if spec.split_file:
        _check_split_file(spec, dataset_dir, result, verify_images)
    if spec.name == "FGVCAircraft":
        _check_aircraft(spec, dataset_dir, result, verify_images)
    if "classnames.txt" in spec.required_files:
        _check_imagenet_family(spec, dataset_dir, result, verify_images)
    return result
