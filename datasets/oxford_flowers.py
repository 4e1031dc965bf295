"""Oxford Flowers-102 in CoOp's layout: ``oxford_flowers/{jpg/,imagelabels.mat,cat_to_name.json}``."""
from __future__ import annotations

import os.path as osp
import random
from collections import defaultdict

from scipy.io import loadmat

from selftpt.toolbox import DATASET_REGISTRY, read_json

from .catalog import CATALOG
from .template import SplitDataset, Splits


@DATASET_REGISTRY.register()
class OxfordFlowers(SplitDataset):
    """Oxford Flowers-102 (Nilsback & Zisserman, ICVGIP 2008), 102 species; CoOp's fixed split.

    Without the split file: labels from ``imagelabels.mat`` (image ``i`` is
    ``image_{i:05d}.jpg``), names from ``cat_to_name.json``, 50/20/30 per class.
    """

    spec = CATALOG["OxfordFlowers"]

    def build_split(self) -> Splits:
        by_label: dict[int, list[str]] = defaultdict(list)
        for i, label in enumerate(loadmat(osp.join(self.dataset_dir, "imagelabels.mat"))["labels"][0]):
            by_label[int(label)].append(f"image_{i + 1:05d}.jpg")
        lab2cname = read_json(osp.join(self.dataset_dir, "cat_to_name.json"))  # 1-based keys
        train, val, test = [], [], []
        for label, names in by_label.items():
            random.shuffle(names)
            n_train, n_val = round(len(names) * 0.5), round(len(names) * 0.2)
            parts = (names[:n_train], names[n_train:n_train + n_val], names[n_train + n_val:])
            for out, part in zip((train, val, test), parts):
                out.extend(self.datum(name, label - 1, lab2cname[str(label)]) for name in part)
        return train, val, test
