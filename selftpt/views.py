"""TPT's test-time views of one image (Shu et al., NeurIPS 2022), for TPT and Self-TPT-v.

As TPT's ``AugMixAugmenter``: view 0 is the clean image (resize of the shorter side + centre
crop, the config's interpolation: bicubic for CLIP); each other view is a
``RandomResizedCrop`` at torchvision's defaults (scale (0.08, 1), bilinear) followed by a
horizontal flip and, for all but ImageNet and its variants, an AugMix blend of that flipped
crop (``selftpt.augmix``: Hendrycks et al.'s operations at severity 1, mixed in normalised
float space). Without AugMix an augmented view is the preprocessed crop + flip alone.

The views of a test item are drawn from a seed of the run's seed and the item's index in the
test split (``ItemSeededDatasetWrapper``), not from one global random stream as in TPT's code:
the distribution of views is TPT's, but which views an image gets no longer depends on the
images before it, the number of data-loader workers, or which part of the test set a process
evaluates, so a test set split across processes gives the predictions of one process.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from selftpt.augmix import augmix as augmix_blend
from selftpt.errors import ConfigError
from selftpt.safe_data import SafeDatasetWrapper

# TPT applies no AugMix to ImageNet and its variants (single-letter set ids in its code).
NO_AUGMIX_DATASETS = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}

# TPT's ``get_preaugment`` is ``RandomResizedCrop(224)`` with torchvision's defaults; spelled
# out so that a change of torchvision's defaults cannot change the views.
CROP_SCALE = (0.08, 1.0)
CROP_INTERPOLATION = T.InterpolationMode.BILINEAR
AUGMIX_SEVERITY = 1


def use_augmix(setting: str, dataset_name: str) -> bool:
    """Resolve an ``AUGMIX`` key (auto | on | off) for a dataset as TPT does.

    Args:
        setting: ``auto`` (off for ImageNet and its variants, on elsewhere), ``on`` or ``off``.
        dataset_name: the config's ``DATASET.NAME``.
    """
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"AUGMIX must be auto, on or off; got {setting!r}")
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
        interpolation: interpolation name of the clean view's resize (the augmented crops
            are bilinear whatever this is, as in TPT).
    """

    def __init__(self, size: Sequence[int], n_views: int = 64, augmix: bool = False,
                 mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
                 interpolation: str = "bicubic") -> None:
        if n_views < 1:
            raise ConfigError(f"n_views must be >= 1, got {n_views}")
        size = tuple(size)
        self.n_views = n_views
        self.augmix = augmix
        self.base = T.Compose([T.Resize(max(size), interpolation=INTERPOLATIONS[interpolation]),
                               T.CenterCrop(size)])
        self.preaugment = T.Compose([T.RandomResizedCrop(size, scale=CROP_SCALE,
                                                         interpolation=CROP_INTERPOLATION),
                                     T.RandomHorizontalFlip()])
        self.preprocess = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    @classmethod
    def from_cfg(cls, cfg, n_views: int, augmix: str) -> "TestTimeViews":
        """Views sized and normalised as the config's input, AugMix per ``use_augmix``.

        Args:
            cfg: the run's config (``INPUT.*``, ``DATASET.NAME``).
            n_views: total views including the clean one.
            augmix: the ``AUGMIX`` setting (auto | on | off).
        """
        return cls(cfg.INPUT.SIZE, n_views, use_augmix(augmix, cfg.DATASET.NAME), cfg.INPUT.PIXEL_MEAN,
                   cfg.INPUT.PIXEL_STD, cfg.INPUT.INTERPOLATION)

    def clean_view(self, image: Image.Image) -> torch.Tensor:
        """The deterministic view 0, (3, H, W)."""
        return self.preprocess(self.base(image))

    def augmented_view(self, image: Image.Image) -> torch.Tensor:
        """One random view, (3, H, W): crop, flip, then AugMix when on."""
        crop = self.preaugment(image)
        if not self.augmix:
            return self.preprocess(crop)
        return augmix_blend(crop, self.preprocess, severity=AUGMIX_SEVERITY)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        views = [self.clean_view(image)] + [self.augmented_view(image) for _ in range(self.n_views - 1)]
        return torch.stack(views)  # (n_views, 3, H, W)

    def __repr__(self) -> str:
        return (f"TestTimeViews(n_views={self.n_views}, clean={self.base}, augmented={self.preaugment}, "
                f"augmix={'severity ' + str(AUGMIX_SEVERITY) if self.augmix else 'off'}, "
                f"preprocess={self.preprocess})")


def item_seed(run_seed: int, index: int) -> int:
    """The seed of test item ``index``'s random views in a run seeded ``run_seed`` (63 bits).

    A hash rather than ``run_seed * n + index`` so that no item of one seed shares its views with
    an item of another seed.
    """
    digest = hashlib.sha256(f"{run_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ItemSeededDatasetWrapper(SafeDatasetWrapper):
    """``SafeDatasetWrapper`` whose test items draw their random views from ``item_seed``.

    Training items keep the global stream (a fixed seed per item would give every epoch the
    same augmentation). With ``SEED`` < 0 (Dassl's "random seed") nothing is seeded. The global
    random state is left as it was, so seeding items does not change what anything else draws.
    """

    def __getitem__(self, idx: int) -> dict:
        if self.is_train or self.cfg.SEED < 0:
            return super().__getitem__(idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.cfg.SEED, idx))
            return super().__getitem__(idx)
