"""ImageNetV2 matched-frequency in CoOp's layout: ``imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .template import ImageNetVariant


@DATASET_REGISTRY.register()
class ImageNetV2(ImageNetVariant):
    """ImageNetV2 (Recht et al., ICML 2019), matched-frequency test set, 1000 classes.

    Folders are named by ImageNet label, "0".."999": they are read in numeric order
    (label = int(folder)), not sorted as strings ("0", "1", "10", "100", ...), which would
    scramble the labels and give near-zero accuracy.
    """

    spec = CATALOG["ImageNetV2"]

    def read_data(self, classnames: dict) -> list:
        return self.read_folders([(str(label), name) for label, name in enumerate(classnames.values())])
