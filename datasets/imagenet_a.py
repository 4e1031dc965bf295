"""ImageNet-A in CoOp's layout: ``imagenet-adversarial/imagenet-a/<wnid>/`` (200 classes)."""
from __future__ import annotations

from selftpt.toolbox import DATASET_REGISTRY

from .catalog import CATALOG
from .template import ImageNetVariant


@DATASET_REGISTRY.register()
class ImageNetA(ImageNetVariant):
    """ImageNet-A (Hendrycks et al., CVPR 2021), natural adversarial examples of 200 ImageNet
    classes. Label = rank of the wnid among the 200 folders; class name = ImageNet's name of
    that wnid (from the 1000-class ``classnames.txt``)."""

    spec = CATALOG["ImageNetA"]
