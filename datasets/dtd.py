"""Describable Textures in CoOp's layout: ``dtd/images/<texture>/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_class_folders
from .template import SplitDataset, Splits


@DATASET_REGISTRY.register()
class DescribableTextures(SplitDataset):
    """Describable Textures Dataset (Cimpoi et al., CVPR 2014), 47 textures; CoOp's fixed split."""

    spec = CATALOG["DescribableTextures"]

    def build_split(self) -> Splits:
        return split_class_folders(self.image_dir, dataset=self.spec.name)
