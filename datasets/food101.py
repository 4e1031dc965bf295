"""Food-101 in CoOp's layout: ``food-101/images/<class>/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_class_folders
from .template import SplitDataset, Splits


@DATASET_REGISTRY.register()
class Food101(SplitDataset):
    """Food-101 (Bossard et al., ECCV 2014), 101 dishes; CoOp's fixed split."""

    spec = CATALOG["Food101"]

    def build_split(self) -> Splits:
        return split_class_folders(self.image_dir, dataset=self.spec.name)
