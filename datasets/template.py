"""The two shapes CoOp's datasets take, written once: a dataset with a train/val/test split
(:class:`SplitDataset`) and an evaluation-only ImageNet variant (:class:`ImageNetVariant`).

A concrete dataset sets ``spec`` (its :class:`~datasets.catalog.DatasetSpec`) and, where the
split is built from raw files, ``build_split``. Attribute names (``dataset_dir``,
``image_dir``, ``split_path``, ``split_fewshot_dir``) and the CoOp helpers reachable as
static methods (``OxfordPets.read_split``, ``DescribableTextures.read_and_split_data``, ...)
match CoOp, so custom datasets written against CoOp keep working.
"""
from __future__ import annotations

import os.path as osp
from collections import OrderedDict
from typing import Any, Optional

from selftpt.toolbox import DatasetBase, Datum, listdir_nohidden

from .catalog import DatasetSpec
from .common import (
    DatasetError,
    load_or_create_fewshot,
    read_lines,
    read_split,
    require_dir,
    require_train_classes,
    resolve_root,
    save_split,
    split_class_folders,
    split_trainval,
    subsample_classes,
)

__all__ = ["SplitDataset", "ImageNetVariant", "folder_datums", "read_classnames", "read_imagenet_classnames"]

Splits = tuple[list, list, list]


def _check_layout(spec: DatasetSpec, root: str, dataset_dir: str) -> None:
    """Raise one-line errors for a missing dataset folder, image folder or required file."""
    require_dir(spec.name, dataset_dir, "dataset folder", spec.setup_fix(root))
    for sub in spec.data_dirs:
        require_dir(spec.name, osp.join(dataset_dir, sub), "image folder", spec.setup_fix(root))
    for name in spec.required_files:
        path = osp.join(dataset_dir, name)
        if not osp.isfile(path):
            raise DatasetError(spec.name, f"{name} not found", path, spec.download_fix(root))


class _SpecDataset(DatasetBase):
    spec: DatasetSpec  # set by each concrete dataset

    def _locate(self, cfg: Any) -> str:
        """Set CoOp's path attributes, check the layout, return the resolved root."""
        spec = self.spec
        root = resolve_root(cfg, spec.name)
        self.dataset_dir = osp.join(root, spec.folder)
        self.image_dir = osp.join(self.dataset_dir, spec.image_dir) if spec.image_dir else self.dataset_dir
        _check_layout(spec, root, self.dataset_dir)
        return root


class SplitDataset(_SpecDataset):
    """A dataset with train/val/test splits, read as CoOp does.

    Flow: read ``split_file`` (or, if absent, build the split from the raw files and save it
    there; a dataset without a split file builds it on every load) → with
    ``DATASET.NUM_SHOTS >= 1`` take the cached or newly drawn few-shot subset → keep the
    ``DATASET.SUBSAMPLE_CLASSES`` half → ``DatasetBase(train_x, val, test)``.
    """

    val_is_test = False  # ImageNet: the val set is the test set, and stays whole in few-shot

    # CoOp's helpers, where CoOp users expect them (``OxfordPets.read_split(...)`` etc.)
    read_split = staticmethod(read_split)
    save_split = staticmethod(save_split)
    split_trainval = staticmethod(split_trainval)
    subsample_classes = staticmethod(subsample_classes)
    read_and_split_data = staticmethod(split_class_folders)

    def __init__(self, cfg: Any):
        spec = self.spec
        self.root = self._locate(cfg)
        self.split_path = osp.join(self.dataset_dir, spec.split_file) if spec.split_file else ""
        self.split_fewshot_dir = osp.join(self.dataset_dir, "split_fewshot")

        train, val, test = self.read_full_split()
        full_train = train
        num_shots = int(cfg.DATASET.NUM_SHOTS)
        where = f"in {self.split_path or self.dataset_dir}"
        if num_shots >= 1:
            train, val = load_or_create_fewshot(
                self, spec.name, self.dataset_dir, train, None if self.val_is_test else val,
                num_shots, int(cfg.SEED), with_val=not self.val_is_test,
            )
            where = f"after {num_shots}-shot sampling of {self.split_path or self.dataset_dir}"
        require_train_classes(
            spec.name, train, (full_train, test), where,
            f"the split lists no training image for this class: {spec.download_fix(self.root)}",
        )
        subsample = getattr(cfg.DATASET, "SUBSAMPLE_CLASSES", "all")
        if self.val_is_test:
            train, test = subsample_classes(train, test, subsample=subsample)
            val = test
        else:
            train, val, test = subsample_classes(train, val, test, subsample=subsample)
        super().__init__(train_x=list(train), val=list(val), test=list(test))

    def read_full_split(self) -> Splits:
        """The full train/val/test lists: from the split file, else built from raw files."""
        spec = self.spec
        fix = spec.setup_fix(self.root)
        if self.split_path and osp.isfile(self.split_path):
            return read_split(self.split_path, self.image_dir, spec.name, f"re-extract the images: {fix}")
        missing = [f for f in spec.raw_files if not osp.exists(osp.join(self.dataset_dir, f))]
        if missing and self.split_path:
            raise DatasetError(
                spec.name,
                f"split file {spec.split_file} not found in the dataset folder (nor the raw "
                f"{', '.join(missing)} to rebuild it from)", self.split_path, spec.download_fix(self.root),
            )
        if missing:
            raise DatasetError(spec.name, f"{missing[0]} not found", osp.join(self.dataset_dir, missing[0]), fix)
        if not self.split_path:
            return self.build_split()
        print(
            f"WARNING: {spec.name}: {self.split_path} not found; building a new random split from the "
            f"raw files and saving it there. Published CoOp numbers use CoOp's split: "
            f"{spec.download_fix(self.root)}"
        )
        train, val, test = self.build_split()
        save_split(train, val, test, self.split_path, self.image_dir)
        return train, val, test

    def build_split(self) -> Splits:
        """Build ``(train, val, test)`` from the dataset's raw files (CoOp's rule)."""
        raise NotImplementedError(f"{type(self).__name__} has no rule to build a split")

    def read_lines(self, relpath: str) -> list[str]:
        """Non-empty, non-comment lines of a text file under the dataset folder."""
        return read_lines(osp.join(self.dataset_dir, relpath))

    def datum(self, relpath: str, label: int, classname: str) -> Datum:
        """A ``Datum`` for an image under ``image_dir``; one-line error if the file is absent."""
        impath = osp.join(self.image_dir, relpath)
        if not osp.isfile(impath):
            raise DatasetError(self.spec.name, "image listed in the raw split files not found", impath,
                               f"re-extract the images: {self.spec.setup_fix(self.root)}")
        return Datum(impath=impath, label=label, classname=classname)


IMAGENET_NUM_CLASSES = 1000


def read_classnames(text_file: str) -> "OrderedDict[str, str]":
    """Read ImageNet's ``classnames.txt`` (lines ``<wnid> <class name>``) as wnid -> name,
    in file order (sorted by wnid, i.e. ImageNet's label order)."""
    names: "OrderedDict[str, str]" = OrderedDict()
    with open(text_file, "r") as f:
        for line in f:
            parts = line.strip().split(" ", 1)
            if parts[0]:
                names[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return names


def read_imagenet_classnames(spec: DatasetSpec, dataset_dir: str, root: str) -> "OrderedDict[str, str]":
    """``classnames.txt`` of an ImageNet-family dataset, checked to hold the 1000 classes."""
    path = osp.join(dataset_dir, "classnames.txt")
    names = read_classnames(path)
    if len(names) != IMAGENET_NUM_CLASSES:
        raise DatasetError(
            spec.name, f"classnames.txt lists {len(names)} classes, expected ImageNet's {IMAGENET_NUM_CLASSES}",
            path, f"replace it with CoOp's: {spec.download_fix(root)}",
        )
    return names


def folder_datums(
    spec: DatasetSpec,
    base_dir: str,
    folders: list[tuple[str, Optional[str]]],
    classnames_path: str,
    fix: str,
    expected: Optional[int] = None,
) -> list:
    """Datums for the images in ``[(folder, classname)]`` under ``base_dir``; label = the
    folder's position in the list.

    Dassl takes the class count and names from the labels present in ``train_x`` (the
    images themselves for the ImageNet variants), so a class without images does not fail
    anywhere: it silently drops out, and with it every later class name moves one label down
    (label 500's prompt gets class 501's name). Hence, in this order, each one-line error:
    a folder that is not an ImageNet class, a missing folder, a folder count other than
    ``expected`` (ImageNet-A/-R list their 200 folders from disk), an empty folder.

    Args:
        spec: the dataset, for messages.
        base_dir: the folder holding the class folders.
        folders: ``(folder, classname)`` in label order; ``classname`` None = not a known class.
        classnames_path: the class-name file, for messages.
        fix: how to restore missing images.
        expected: the number of class folders the dataset has, if checked.
    """
    for folder, classname in folders:
        if classname is None:
            raise DatasetError(
                spec.name, f"folder {folder!r} is not an ImageNet class listed in {classnames_path}",
                osp.join(base_dir, folder),
                "use CoOp's classnames.txt (python prepare_data.py download) and remove stray folders",
            )
    missing = [folder for folder, _ in folders if not osp.isdir(osp.join(base_dir, folder))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(spec.name, f"class folder not found{more}", osp.join(base_dir, missing[0]), fix)
    if expected is not None and len(folders) != expected:
        raise DatasetError(
            spec.name, f"{len(folders)} class folders found, {spec.name} has {expected}; a missing class "
            f"would silently drop out of the label set", base_dir, fix,
        )
    items, empty = [], []
    for label, (folder, classname) in enumerate(folders):
        path = osp.join(base_dir, folder)
        names = listdir_nohidden(path, sort=True)
        if not names:
            empty.append((label, classname, path))
        items.extend(Datum(impath=osp.join(path, name), label=label, classname=classname) for name in names)
    if empty:
        label, classname, path = empty[0]
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DatasetError(
            spec.name, f"class {label} ({classname!r}) has no image: its folder is empty{more}; every class "
            f"needs images (an empty one drops out of the label set and shifts the class names after it)",
            path, f"restore the folder's images: {fix}",
        )
    return items


class ImageNetVariant(_SpecDataset):
    """An evaluation-only ImageNet variant: every image is test data; ``train_x`` is the test
    set too, since Dassl reads class names from ``train_x``. NUM_SHOTS and
    SUBSAMPLE_CLASSES do not apply (as in CoOp)."""

    ignored: tuple[str, ...] = ("README.txt",)
    read_classnames = staticmethod(read_classnames)

    def __init__(self, cfg: Any):
        self.root = self._locate(cfg)
        self.classnames_path = osp.join(self.dataset_dir, "classnames.txt")
        data = self.read_data(read_imagenet_classnames(self.spec, self.dataset_dir, self.root))
        super().__init__(train_x=data, test=data)

    def read_data(self, classnames: "OrderedDict[str, str]") -> list:
        """Default layout: one folder per wnid; label = position among the sorted folders,
        class name = ImageNet's name of that wnid."""
        folders = [f for f in listdir_nohidden(self.image_dir, sort=True) if f not in self.ignored]
        return self.read_folders([(folder, classnames.get(folder)) for folder in folders])

    def read_folders(self, folders: list[tuple[str, Optional[str]]]) -> list:
        """Datums for ``[(folder, classname)]`` under ``image_dir``, label = list position;
        every one of the dataset's ``spec.num_classes`` classes must have a non-empty folder."""
        return folder_datums(self.spec, self.image_dir, folders, self.classnames_path,
                             self.spec.setup_fix(self.root), expected=self.spec.num_classes)
