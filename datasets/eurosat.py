"""EuroSAT (RGB) in CoOp's layout: ``eurosat/2750/<class>/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_class_folders
from .template import SplitDataset, Splits

# CoOp's descriptive names for the folder names (they read better in a prompt).
NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@DATASET_REGISTRY.register()
class EuroSAT(SplitDataset):
    """EuroSAT (Helber et al., IEEE JSTARS 2019), 10 land-use classes; CoOp's fixed split."""

    spec = CATALOG["EuroSAT"]

    def build_split(self) -> Splits:
        return split_class_folders(self.image_dir, new_cnames=NEW_CNAMES, dataset=self.spec.name)
