"""AugMix as TPT uses it (Shu et al., NeurIPS 2022; Hendrycks et al., ICLR 2020).

TPT blends AugMix chains into each random resized crop of a test image. Its operations and
their magnitudes are those of Hendrycks et al.'s reference AugMix (not torchvision's
``AugMix``, whose magnitude bin at severity 1 is always bin 0, i.e. identity geometry):

- operations, one drawn uniformly per step: autocontrast, equalize, posterize, rotate,
  solarize, shear_x, shear_y, translate_x, translate_y (no colour, contrast, brightness or
  sharpness: they overlap with ImageNet-C's corruptions);
- per operation, a level drawn uniformly in [0.1, severity), mapped onto the operation's
  range by ``int_parameter`` / ``float_parameter`` (see ``sample_op`` for the ranges);
- ``width`` 3 chains, each of depth uniform in {1, 2, 3}, chain weights w ~ Dirichlet(1, 1, 1)
  and a skip weight m ~ Beta(1, 1);
- mixing in normalised float space: ``m * preprocess(crop) + (1 - m) * sum_i w_i *
  preprocess(chain_i(crop))`` with ``preprocess`` = ToTensor + Normalize.

Randomness: every draw comes from torch's global generator, the one torchvision's
``RandomResizedCrop`` and ``RandomHorizontalFlip`` use, so a view depends on the torch seed
alone (``set_random_seed`` seeds it; DataLoader workers reseed it per worker).

Sampling is separate from application (``sample_op`` / ``apply_op``, ``sample_augmix`` /
``apply_augmix``), so the parameters an operation really gets can be inspected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image, ImageOps

# TPT's operation set (Hendrycks et al.'s ``augmentations`` list).
OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize",
       "shear_x", "shear_y", "translate_x", "translate_y")

# The reference code's PARAMETER_MAX: a level of 10 maps to an operation's full range.
MAX_LEVEL = 10.0
# The lowest level drawn, whatever the severity.
MIN_LEVEL = 0.1


@dataclass(frozen=True)
class OpCall:
    """One operation with the parameter it was sampled.

    Args:
        name: one of ``OPS``.
        parameter: degrees (rotate), threshold (solarize), bits (posterize), shear factor
            (shear_*), pixel shift (translate_*); None for autocontrast and equalize.
    """

    name: str
    parameter: int | float | None


@dataclass(frozen=True)
class AugMixDraw:
    """Everything random in one AugMix blend.

    Args:
        chains: the operations of each chain, applied in order.
        weights: (width,) chain weights, a Dirichlet draw (sums to 1).
        skip: m, the weight of the un-augmented crop in the final blend.
    """

    chains: tuple[tuple[OpCall, ...], ...]
    weights: torch.Tensor
    skip: float


def int_parameter(level: float, maxval: float) -> int:
    """Scale ``level`` in [0, MAX_LEVEL] onto [0, maxval], truncated to an integer.

    Args:
        level: operation level.
        maxval: the operation's value at ``MAX_LEVEL``.
    """
    return int(level * maxval / MAX_LEVEL)


def float_parameter(level: float, maxval: float) -> float:
    """Scale ``level`` in [0, MAX_LEVEL] onto [0, maxval].

    Args:
        level: operation level.
        maxval: the operation's value at ``MAX_LEVEL``.
    """
    return float(level) * maxval / MAX_LEVEL


def _uniform(low: float = 0.0, high: float = 1.0) -> float:
    # float64 so that levels have the resolution of the reference's numpy draws
    return low + (high - low) * torch.rand((), dtype=torch.float64).item()


def sample_level(severity: float) -> float:
    """A level uniform in [MIN_LEVEL, severity).

    Args:
        severity: AugMix severity (TPT: 1).
    """
    return _uniform(MIN_LEVEL, severity)


def _random_sign(value: int | float) -> int | float:
    return -value if _uniform() > 0.5 else value


def sample_op(name: str, severity: float, image_size: Sequence[int]) -> OpCall:
    """Draw the parameter of operation ``name`` as Hendrycks et al.'s AugMix does.

    Ranges at severity 1 (level in [0.1, 1)):
    rotate: ``int_parameter(level, 30)`` = 0, 1 or 2 degrees, random sign;
    solarize: threshold ``256 - int_parameter(level, 256)`` in 231..254;
    posterize: ``4 - int_parameter(level, 4)`` = always 4 bits;
    shear_x / shear_y: ``float_parameter(level, 0.3)`` in [0.003, 0.03), random sign;
    translate_x / translate_y: ``int_parameter(level, size / 3)`` pixels, random sign:
    0..7 px at 224 (TPT), 0..2 px at 64, 0..1 px at 32;
    autocontrast, equalize: no parameter.

    Args:
        name: one of ``OPS``.
        severity: AugMix severity (TPT: 1).
        image_size: (width, height) of the image the operation will be applied to; the
            reference scales translations by its fixed square IMAGE_SIZE (224 in TPT), i.e.
            the crop size.
    """
    width, height = image_size
    if name in ("autocontrast", "equalize"):
        return OpCall(name, None)
    level = sample_level(severity)
    if name == "posterize":
        return OpCall(name, 4 - int_parameter(level, 4))
    if name == "solarize":
        return OpCall(name, 256 - int_parameter(level, 256))
    if name == "rotate":
        return OpCall(name, _random_sign(int_parameter(level, 30)))
    if name in ("shear_x", "shear_y"):
        return OpCall(name, _random_sign(float_parameter(level, 0.3)))
    if name == "translate_x":
        return OpCall(name, _random_sign(int_parameter(level, width / 3)))
    if name == "translate_y":
        return OpCall(name, _random_sign(int_parameter(level, height / 3)))
    raise ValueError(f"Unknown AugMix operation {name!r}; expected one of {OPS}")


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    # PIL's affine maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f)
    return image.transform(image.size, Image.Transform.AFFINE, coefficients,
                           resample=Image.Resampling.BILINEAR)


def apply_op(image: Image.Image, op: OpCall) -> Image.Image:
    """Apply a sampled operation (deterministic).

    Args:
        image: PIL image (RGB).
        op: the operation and its parameter, from ``sample_op``.
    """
    p = op.parameter
    if op.name == "autocontrast":
        return ImageOps.autocontrast(image)
    if op.name == "equalize":
        return ImageOps.equalize(image)
    if op.name == "posterize":
        return ImageOps.posterize(image, int(p))
    if op.name == "solarize":
        return ImageOps.solarize(image, int(p))
    if op.name == "rotate":
        return image.rotate(p, resample=Image.Resampling.BILINEAR)
    if op.name == "shear_x":
        return _affine(image, (1, p, 0, 0, 1, 0))
    if op.name == "shear_y":
        return _affine(image, (1, 0, 0, p, 1, 0))
    if op.name == "translate_x":
        return _affine(image, (1, 0, p, 0, 1, 0))
    if op.name == "translate_y":
        return _affine(image, (1, 0, 0, 0, 1, p))
    raise ValueError(f"Unknown AugMix operation {op.name!r}; expected one of {OPS}")


def sample_chain(image_size: Sequence[int], severity: float = 1.0, depth: int | None = None
                 ) -> tuple[OpCall, ...]:
    """One chain: ``depth`` operations (uniform in {1, 2, 3} when None), each drawn uniformly.

    Args:
        image_size: (width, height) of the crop.
        severity: AugMix severity.
        depth: fixed chain length, or None for TPT's random depth.
    """
    if depth is None:
        depth = int(torch.randint(1, 4, ()).item())
    ops = []
    for _ in range(depth):
        name = OPS[int(torch.randint(len(OPS), ()).item())]
        ops.append(sample_op(name, severity, image_size))
    return tuple(ops)


def sample_augmix(image_size: Sequence[int], severity: float = 1.0, width: int = 3,
                  depth: int | None = None, alpha: float = 1.0) -> AugMixDraw:
    """Draw one AugMix blend (TPT: severity 1, width 3, random depth, alpha 1).

    Args:
        image_size: (width, height) of the crop.
        severity: AugMix severity.
        width: number of chains.
        depth: fixed chain length, or None for a depth uniform in {1, 2, 3} per chain.
        alpha: Dirichlet and Beta concentration.
    """
    weights = torch.distributions.Dirichlet(torch.full((width,), float(alpha))).sample()
    skip = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    chains = tuple(sample_chain(image_size, severity, depth) for _ in range(width))
    return AugMixDraw(chains, weights, skip)


def apply_augmix(crop: Image.Image, draw: AugMixDraw,
                 preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Blend a drawn AugMix into ``crop`` in preprocessed (normalised float) space.

    ``m * preprocess(crop) + (1 - m) * sum_i w_i * preprocess(chain_i(crop))``, the order of
    TPT's ``augmix`` (the reference puts m on the mixture; with Beta(1, 1) both are the same
    distribution).

    Args:
        crop: the (flipped) random resized crop, PIL.
        draw: from ``sample_augmix``.
        preprocess: PIL -> float tensor (ToTensor + Normalize).
    """
    clean = preprocess(crop)
    mix = torch.zeros_like(clean)
    for weight, chain in zip(draw.weights.tolist(), draw.chains):
        image = crop
        for op in chain:
            image = apply_op(image, op)
        mix += weight * preprocess(image)
    return draw.skip * clean + (1.0 - draw.skip) * mix


def augmix(crop: Image.Image, preprocess: Callable[[Image.Image], torch.Tensor],
           severity: float = 1.0, width: int = 3, depth: int | None = None,
           alpha: float = 1.0) -> torch.Tensor:
    """Draw and apply one AugMix blend of ``crop`` (TPT's defaults).

    Args:
        crop: PIL image.
        preprocess: PIL -> float tensor (ToTensor + Normalize).
        severity, width, depth, alpha: as ``sample_augmix``.
    """
    return apply_augmix(crop, sample_augmix(crop.size, severity, width, depth, alpha), preprocess)
