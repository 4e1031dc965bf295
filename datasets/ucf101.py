"""UCF101 middle frames in CoOp's layout: ``ucf101/UCF-101-midframes/<Action_Name>/*.jpg``."""
from __future__ import annotations

import re

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import split_trainval
from .template import SplitDataset, Splits


def split_camel_case(action: str) -> str:
    """``"ApplyEyeMakeup"`` -> ``"Apply_Eye_Makeup"`` (the frame folders' and CoOp's names)."""
    return "_".join(re.findall(r"[A-Z][^A-Z]*", action))


@DATASET_REGISTRY.register()
class UCF101(SplitDataset):
    """UCF101 (Soomro et al., arXiv 1212.0402), 101 actions, one middle frame per video;
    CoOp's fixed split. Without it: ``ucfTrainTestlist`` split 01."""

    spec = CATALOG["UCF101"]

    def build_split(self) -> Splits:
        cname2lab = {}
        for line in self.read_lines("ucfTrainTestlist/classInd.txt"):
            index, action = line.split()
            cname2lab[action] = int(index) - 1
        train, val = split_trainval(self.read_data(cname2lab, "ucfTrainTestlist/trainlist01.txt"))
        return train, val, self.read_data(cname2lab, "ucfTrainTestlist/testlist01.txt")

    def read_data(self, cname2lab: dict[str, int], relpath: str) -> list:
        items = []
        for line in self.read_lines(relpath):
            action, video = line.split()[0].split("/")  # "Action/v_Action_g08_c01.avi [label]"
            folder = split_camel_case(action)
            items.append(self.datum(f"{folder}/{video.replace('.avi', '.jpg')}", cname2lab[action], folder))
        return items
