"""FGVC-Aircraft in CoOp's layout: the archive's ``data/`` folder renamed ``fgvc_aircraft/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import DatasetError
from .template import SplitDataset, Splits


@DATASET_REGISTRY.register()
class FGVCAircraft(SplitDataset):
    """FGVC-Aircraft (Maji et al., arXiv 1306.5151), 100 variants; the official splits.

    Reads ``variants.txt`` (class order) and ``images_variant_{train,val,test}.txt``
    (lines ``<image id> <variant name>``) on every load; there is no split JSON.
    """

    spec = CATALOG["FGVCAircraft"]

    def build_split(self) -> Splits:
        cname2lab = {name: i for i, name in enumerate(self.read_lines("variants.txt"))}
        return tuple(self.read_data(cname2lab, f"images_variant_{s}.txt") for s in ("train", "val", "test"))

    def read_data(self, cname2lab: dict[str, int], relpath: str) -> list:
        items = []
        for line in self.read_lines(relpath):
            image_id, variant = line.split(" ", 1)
            if variant not in cname2lab:
                raise DatasetError(self.spec.name, f"variant {variant!r} of {relpath} is not in variants.txt",
                                   f"{self.dataset_dir}/{relpath}", f"re-extract {self.spec.source}")
            items.append(self.datum(f"{image_id}.jpg", cname2lab[variant], variant))
        return items
