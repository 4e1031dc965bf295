"""TPT's test-time views of one image (Shu et al., NeurIPS 2022), for TPT and Self-TPT-v.

View 0 is the clean image (resize of the shorter side + centre crop); the others are
random resized crops with horizontal flips and, for fine-grained datasets, an AugMix
blend applied to the crop (torchvision's ``AugMix`` with TPT's operation set: severity 1,
no colour/contrast/brightness/sharpness operations, Dirichlet chain weights, Beta mixing).
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

# TPT applies no AugMix to ImageNet and its variants (single-letter set ids in its code).
NO_AUGMIX_DATASETS = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def use_augmix(setting: str, dataset_name: str) -> bool:
    """Resolve an ``AUGMIX`` key (auto | on | off) for a dataset as TPT does."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"AUGMIX must be auto, on or off; got {setting!r}")
    if setting == "auto":
        return dataset_name not in NO_AUGMIX_DATASETS
    return setting == "on"


class TestTimeViews:
    """Callable: PIL image -> (n_views, 3, H, W) tensor, the clean view first.

    Args:
        size: output (H, W).
        n_views: total views including the clean one (TPT: 64).
        augmix: blend AugMix chains into the augmented views.
        mean, std: normalisation (CLIP's).
        interpolation: resize interpolation name.
    """

    def __init__(self, size: Sequence[int], n_views: int = 64, augmix: bool = False,
                 mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
                 interpolation: str = "bicubic") -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        size = tuple(size)
        mode = INTERPOLATIONS[interpolation]
        finish = [T.ToTensor(), T.Normalize(mean, std)]
        self.n_views = n_views
        self.clean = T.Compose([T.Resize(max(size), interpolation=mode), T.CenterCrop(size), *finish])
        augment = [T.RandomResizedCrop(size, interpolation=mode), T.RandomHorizontalFlip()]
        if augmix:
            augment.append(T.AugMix(severity=1, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False))
        self.augmented = T.Compose([*augment, *finish])

    @classmethod
    def from_cfg(cls, cfg, n_views: int, augmix: str) -> "TestTimeViews":
        """Views sized and normalised as the config's input, AugMix per ``use_augmix``."""
        return cls(cfg.INPUT.SIZE, n_views, use_augmix(augmix, cfg.DATASET.NAME), cfg.INPUT.PIXEL_MEAN,
                   cfg.INPUT.PIXEL_STD, cfg.INPUT.INTERPOLATION)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        views = [self.clean(image)] + [self.augmented(image) for _ in range(self.n_views - 1)]
        return torch.stack(views)  # (n_views, 3, H, W)

    def __repr__(self) -> str:
        return f"TestTimeViews(n_views={self.n_views}, clean={self.clean}, augmented={self.augmented})"
