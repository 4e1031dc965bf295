"""ImageNet-Sketch in CoOp's layout: ``imagenet-sketch/images/<wnid>/``."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .template import ImageNetVariant


@DATASET_REGISTRY.register()
class ImageNetSketch(ImageNetVariant):
    """ImageNet-Sketch (Wang et al., NeurIPS 2019), sketches of the 1000 ImageNet classes."""

    spec = CATALOG["ImageNetSketch"]
