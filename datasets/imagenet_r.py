"""ImageNet-R in CoOp's layout: ``imagenet-rendition/imagenet-r/<wnid>/`` (200 classes)."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .template import ImageNetVariant


@DATASET_REGISTRY.register()
class ImageNetR(ImageNetVariant):
    """ImageNet-R (Hendrycks et al., ICCV 2021), renditions of 200 ImageNet classes. Label =
    rank of the wnid among the 200 folders; class name = ImageNet's name of that wnid."""

    spec = CATALOG["ImageNetR"]
