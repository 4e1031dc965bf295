"""ImageNet-1k in CoOp's layout: ``imagenet/images/{train,val}/<wnid>/`` + ``classnames.txt``."""
from __future__ import annotations

import os.path as osp

from selftpt.toolbox import DATASET_REGISTRY, listdir_nohidden

from .catalog import CATALOG
from .common import (
    COOP_IMAGENET_LISTING,
    OWN_IMAGENET_LISTING,
    DatasetError,
    load_shared_cache,
    write_entry_pickle,
)
from .template import SplitDataset, Splits, folder_datums, read_classnames, read_imagenet_classnames


@DATASET_REGISTRY.register()
class ImageNet(SplitDataset):
    """ImageNet (Deng et al., CVPR 2009), 1000 classes with CLIP's class names.

    As in CoOp the official val set is the test set (and the val set); few-shot sampling
    draws from train only. Listing 1.3M files is slow, so the listing is cached: CoOp's
    ``preprocessed.pkl`` (pickled ``Datum`` objects) is read when present and never written;
    the project's own ``preprocessed.selftpt.pkl`` (paths relative to the dataset folder) is
    read otherwise, and rebuilt when unreadable or when its images have moved.
    """

    spec = CATALOG["ImageNet"]
    val_is_test = True
    read_classnames = staticmethod(read_classnames)

    def read_full_split(self) -> Splits:
        # CoOp's attribute name, pointing at the file this project writes
        self.preprocessed = osp.join(self.dataset_dir, OWN_IMAGENET_LISTING)
        self.preprocessed_coop = osp.join(self.dataset_dir, COOP_IMAGENET_LISTING)
        cached = load_shared_cache(
            self.spec.name, self.dataset_dir, self.preprocessed_coop, self.preprocessed, ("train", "test"),
            "file listing", lambda content: None, {"dataset": self.spec.name},
        )
        if cached is not None:
            return cached["train"], cached["test"], cached["test"]
        classnames = read_imagenet_classnames(self.spec, self.dataset_dir, self.root)
        train = self.read_data(classnames, "train")
        # standard practice: evaluate on the official val set (CoOp uses it as val too)
        test = self.read_data(classnames, "val")
        print(f"Saving the file listing to {self.preprocessed}")
        write_entry_pickle(self.preprocessed, self.dataset_dir, {"train": train, "test": test}, dataset="ImageNet")
        return train, test, test

    def read_data(self, classnames: dict, split_dir: str) -> list:
        """Images of ``images/<split_dir>/<wnid>/``, label = rank of the wnid among the
        sorted train folders (= ImageNet's label order)."""
        base = osp.join(self.image_dir, split_dir)
        folders = sorted(f for f in listdir_nohidden(base) if osp.isdir(osp.join(base, f)))
        train_folders = sorted(listdir_nohidden(osp.join(self.image_dir, "train")))
        if folders != [f for f in train_folders if osp.isdir(osp.join(self.image_dir, "train", f))]:
            raise DatasetError(
                "ImageNet", f"images/{split_dir} does not hold the same wnid folders as images/train", base,
                "sort the val images into one folder per wnid (e.g. with the valprep.sh script of "
                "soumith/imagenetloader.torch) as CoOp's DATASETS.md expects",
            )
        pairs = [(folder, classnames.get(folder)) for folder in folders]
        return folder_datums(self.spec, base, pairs, osp.join(self.dataset_dir, "classnames.txt"),
                             self.spec.setup_fix(self.root))
