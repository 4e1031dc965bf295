"""Oxford-IIIT Pets in CoOp's layout: ``oxford_pets/{images,annotations}/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_trainval
from .template import SplitDataset, Splits


@DATASET_REGISTRY.register()
class OxfordPets(SplitDataset):
    """Oxford-IIIT Pets (Parkhi et al., CVPR 2012), 37 breeds; CoOp's fixed split.

    Without the split file it is built from ``annotations/{trainval,test}.txt`` (lines
    ``<Breed_Name>_<n> <class id> <species> <breed id>``), breed names lower-cased.
    """

    spec = CATALOG["OxfordPets"]

    def build_split(self) -> Splits:
        train, val = split_trainval(self.read_data("annotations/trainval.txt"))
        return train, val, self.read_data("annotations/test.txt")

    def read_data(self, relpath: str) -> list:
        items = []
        for line in self.read_lines(relpath):
            imname, class_id = line.split()[:2]
            breed = imname.rsplit("_", 1)[0].lower()  # "Abyssinian_100" -> "abyssinian"
            items.append(self.datum(f"{imname}.jpg", int(class_id) - 1, breed))
        return items
