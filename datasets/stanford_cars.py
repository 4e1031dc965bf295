"""Stanford Cars in CoOp's layout: ``stanford_cars/{cars_train,cars_test,devkit}/`` + test labels."""
from __future__ import annotations

import os.path as osp

from scipy.io import loadmat

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_trainval
from .template import SplitDataset, Splits


@DATASET_REGISTRY.register()
class StanfordCars(SplitDataset):
    """Stanford Cars (Krause et al., ICCV-W 2013), 196 models; CoOp's fixed split.

    Split paths are relative to the dataset folder (``cars_train/...``, ``cars_test/...``).
    Class names put the year first ("2012 Tesla Model S"), as CoOp does.
    """

    spec = CATALOG["StanfordCars"]

    def build_split(self) -> Splits:
        meta = osp.join(self.dataset_dir, "devkit", "cars_meta.mat")
        trainval = self.read_data("cars_train", osp.join(self.dataset_dir, "devkit", "cars_train_annos.mat"), meta)
        test = self.read_data("cars_test", osp.join(self.dataset_dir, "cars_test_annos_withlabels.mat"), meta)
        train, val = split_trainval(trainval)
        return train, val, test

    def read_data(self, image_dir: str, anno_file: str, meta_file: str) -> list:
        annos = loadmat(anno_file)["annotations"][0]
        names = [str(n[0]) for n in loadmat(meta_file)["class_names"][0]]
        items = []
        for anno in annos:
            label = int(anno["class"][0, 0]) - 1
            *model, year = names[label].split(" ")
            items.append(self.datum(osp.join(image_dir, str(anno["fname"][0])), label, " ".join([year, *model])))
        return items
