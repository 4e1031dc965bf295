"""Image transforms from config (Dassl's ``build_transform``), built from torchvision.

Train pipeline, in Dassl's order: Resize(INPUT.SIZE) unless a random crop is chosen,
RandomCrop, RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomGrayscale,
RandomApply(GaussianBlur), ToTensor, Normalize.
Test pipeline (whatever the choices): Resize(max(INPUT.SIZE)) (shorter edge, keeps the
aspect ratio), CenterCrop(INPUT.SIZE), ToTensor, then Normalize if chosen.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

from selftpt.errors import ConfigError

__all__ = ["AVAI_CHOICES", "SUPPORTED_CHOICES", "INTERPOLATION_MODES", "build_transform"]

INTERPOLATION_MODES = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}

# Every choice Dassl 0.6.3 knows.
AVAI_CHOICES = [
    "random_flip", "random_resized_crop", "normalize", "instance_norm", "random_crop",
    "random_translation", "center_crop", "cutout", "imagenet_policy", "cifar10_policy",
    "svhn_policy", "randaugment", "randaugment_fixmatch", "randaugment2", "gaussian_noise",
    "colorjitter", "randomgrayscale", "gaussian_blur",
]

# The subset this engine implements. "center_crop" is accepted and, as in Dassl 0.6.3,
# has no effect on the train pipeline (the test pipeline always center-crops).
SUPPORTED_CHOICES = [
    "random_flip", "random_resized_crop", "random_crop", "center_crop", "normalize",
    "colorjitter", "randomgrayscale", "gaussian_blur",
]


def _check_choices(choices: Sequence[str]) -> None:
    for choice in choices:
        if choice in SUPPORTED_CHOICES:
            continue
        if choice in AVAI_CHOICES:
            raise ConfigError(
                f"Transform {choice!r} is a Dassl choice that the built-in engine does not "
                f"implement; install Dassl or use one of: {', '.join(SUPPORTED_CHOICES)}"
            )
        from .registry import get_most_similar_str_to_a_from_b

        guess = get_most_similar_str_to_a_from_b(choice, SUPPORTED_CHOICES)
        raise ConfigError(
            f"Unknown transform {choice!r}; did you mean {guess!r}? "
            f"Available: {', '.join(SUPPORTED_CHOICES)}"
        )


def _interpolation(cfg) -> InterpolationMode:
    name = cfg.INPUT.INTERPOLATION
    if name not in INTERPOLATION_MODES:
        raise ConfigError(
            f"Unknown INPUT.INTERPOLATION {name!r}; choose from {sorted(INTERPOLATION_MODES)}"
        )
    return INTERPOLATION_MODES[name]


def build_transform(cfg, is_train: bool = True, choices: Optional[Sequence[str]] = None):
    """Build the train or test transform described by ``cfg.INPUT``.

    Args:
        cfg: the config (reads ``cfg.INPUT.*``).
        is_train: build the augmenting train pipeline, else the deterministic test one.
        choices: transform names overriding ``cfg.INPUT.TRANSFORMS``.

    Returns:
        A ``torchvision.transforms.Compose``, or None when ``cfg.INPUT.NO_TRANSFORM``.
    """
    if cfg.INPUT.NO_TRANSFORM:
        print("Note: no transform is applied!")
        return None
    choices = list(cfg.INPUT.TRANSFORMS if choices is None else choices)
    _check_choices(choices)
    normalize = T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD)
    if is_train:
        return _build_transform_train(cfg, choices, normalize)
    return _build_transform_test(cfg, choices, normalize)


def _build_transform_train(cfg, choices: list[str], normalize: T.Normalize) -> T.Compose:
    print("Building transform_train")
    interp = _interpolation(cfg)
    size = tuple(cfg.INPUT.SIZE)
    tfms = []

    if "random_crop" not in choices and "random_resized_crop" not in choices:
        print(f"+ resize to {size[0]}x{size[1]}")
        tfms.append(T.Resize(size, interpolation=interp))
    if "random_crop" in choices:
        padding = cfg.INPUT.CROP_PADDING
        print(f"+ random crop (padding = {padding})")
        tfms.append(T.RandomCrop(size, padding=padding))
    if "random_resized_crop" in choices:
        scale = tuple(cfg.INPUT.RRCROP_SCALE)
        print(f"+ random resized crop (size={size}, scale={scale})")
        tfms.append(T.RandomResizedCrop(size, scale=scale, interpolation=interp))
    if "random_flip" in choices:
        print("+ random flip")
        tfms.append(T.RandomHorizontalFlip())
    if "colorjitter" in choices:
        b, c, s, h = (cfg.INPUT.COLORJITTER_B, cfg.INPUT.COLORJITTER_C,
                      cfg.INPUT.COLORJITTER_S, cfg.INPUT.COLORJITTER_H)
        print(f"+ color jitter (brightness={b}, contrast={c}, saturation={s}, hue={h})")
        tfms.append(T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    if "randomgrayscale" in choices:
        print("+ random gray scale")
        tfms.append(T.RandomGrayscale(p=cfg.INPUT.RGS_P))
    if "gaussian_blur" in choices:
        print(f"+ gaussian blur (kernel={cfg.INPUT.GB_K})")
        tfms.append(T.RandomApply([T.GaussianBlur(cfg.INPUT.GB_K)], p=cfg.INPUT.GB_P))
    print("+ to torch tensor of range [0, 1]")
    tfms.append(T.ToTensor())
    if "normalize" in choices:
        print(f"+ normalization (mean={cfg.INPUT.PIXEL_MEAN}, std={cfg.INPUT.PIXEL_STD})")
        tfms.append(normalize)
    return T.Compose(tfms)


def _build_transform_test(cfg, choices: list[str], normalize: T.Normalize) -> T.Compose:
    print("Building transform_test")
    interp = _interpolation(cfg)
    size = tuple(cfg.INPUT.SIZE)
    print(f"+ resize the smaller edge to {max(size)}")
    print(f"+ {size[0]}x{size[1]} center crop")
    print("+ to torch tensor of range [0, 1]")
    tfms = [T.Resize(max(size), interpolation=interp), T.CenterCrop(size), T.ToTensor()]
    if "normalize" in choices:
        print(f"+ normalization (mean={cfg.INPUT.PIXEL_MEAN}, std={cfg.INPUT.PIXEL_STD})")
        tfms.append(normalize)
    return T.Compose(tfms)
