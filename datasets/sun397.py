"""SUN397 in CoOp's layout: ``sun397/SUN397/<letter>/<category>[/<sub>]/`` + partition files."""
from __future__ import annotations

import posixpath

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_trainval
from .template import SplitDataset, Splits


def sun_classname(category: str) -> str:
    """``"a/apartment_building/outdoor"`` -> ``"outdoor apartment_building"``: drop the
    letter folder and put qualifiers such as indoor/outdoor first (CoOp's naming)."""
    return " ".join(category.split("/")[1:][::-1])


@DATASET_REGISTRY.register()
class SUN397(SplitDataset):
    """SUN397 (Xiao et al., CVPR 2010), 397 scene categories; CoOp's fixed split.

    Without the split file it is built from ``ClassName.txt`` and partition 01
    (``Training_01.txt`` / ``Testing_01.txt``, lines ``/a/abbey/sun_x.jpg``).
    """

    spec = CATALOG["SUN397"]

    def build_split(self) -> Splits:
        cname2lab = {line[1:]: i for i, line in enumerate(self.read_lines("ClassName.txt"))}
        train, val = split_trainval(self.read_data(cname2lab, "Training_01.txt"))
        return train, val, self.read_data(cname2lab, "Testing_01.txt")

    def read_data(self, cname2lab: dict[str, int], relpath: str) -> list:
        items = []
        for line in self.read_lines(relpath):
            imname = line[1:]  # drop the leading "/"
            category = posixpath.dirname(imname)
            items.append(self.datum(imname, cname2lab[category], sun_classname(category)))
        return items
