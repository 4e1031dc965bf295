"""FGVC-Aircraft in CoOp's layout: the archive's ``data/`` folder renamed ``fgvc_aircraft/``."""
from __future__ import annotations

import os.path as osp

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .common import DatasetError, read_lines
from .template import SplitDataset, Splits

SPLITS = ("train", "val", "test")


def read_aircraft_lists(dataset_dir: str, fix: str) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """The official lists, read for loading and for ``prepare_data.py check`` alike.

    Returns:
        The variants in class order (``variants.txt``) and, per split, the ``(image id,
        variant)`` pairs of ``images_variant_<split>.txt``.

    Raises:
        DatasetError: a split names a variant that ``variants.txt`` does not list (``fix`` says
            what to do).
    """
    variants = read_lines(osp.join(dataset_dir, "variants.txt"))
    known = set(variants)
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        relpath = f"images_variant_{split}.txt"
        splits[split] = []
        for line in read_lines(osp.join(dataset_dir, relpath)):
            image_id, _, variant = line.partition(" ")
            if variant not in known:
                raise DatasetError("FGVCAircraft", f"variant {variant!r} of {relpath} is not in variants.txt",
                                   f"{dataset_dir}/{relpath}", fix)
            splits[split].append((image_id, variant))
    return variants, splits


@DATASET_REGISTRY.register()
class FGVCAircraft(SplitDataset):
    """FGVC-Aircraft (Maji et al., arXiv 1306.5151), 100 variants; the official splits.

    Reads ``variants.txt`` (class order) and ``images_variant_{train,val,test}.txt``
    (lines ``<image id> <variant name>``) on every load; there is no split JSON.
    """

    spec = CATALOG["FGVCAircraft"]

    def build_split(self) -> Splits:
        variants, splits = read_aircraft_lists(self.dataset_dir, f"re-extract {self.spec.source}")
        cname2lab = {name: i for i, name in enumerate(variants)}
        return tuple([self.datum(f"{image_id}.jpg", cname2lab[variant], variant) for image_id, variant in splits[s]]
                     for s in SPLITS)
