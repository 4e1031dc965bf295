"""Caltech101 in CoOp's layout: ``caltech-101/101_ObjectCategories/<class>/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_class_folders
from .template import SplitDataset, Splits

# Not object classes: a background clutter folder and a duplicate of "Faces".
IGNORED = ["BACKGROUND_Google", "Faces_easy"]
NEW_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


@DATASET_REGISTRY.register()
class Caltech101(SplitDataset):
    """Caltech101 (Fei-Fei et al., CVPR-W 2004), 100 object classes; CoOp's fixed split."""

    spec = CATALOG["Caltech101"]

    def build_split(self) -> Splits:
        return split_class_folders(self.image_dir, ignored=IGNORED, new_cnames=NEW_CNAMES, dataset=self.spec.name)
