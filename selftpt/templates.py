"""Hand-crafted prompt templates per dataset (CoOp's ``CUSTOM_TEMPLATES``).

Zero-shot CLIP classifies with them, and Self-TPT uses them as the fourth, fixed CPT view.
Datasets without an entry fall back to ``DEFAULT_TEMPLATE``.
"""
from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."

CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
    "ShapeWorld": "a photo of a {}.",  # built-in benchmark (selftpt/benchmark), issue 3
    "ShapeWorldSketch": "a photo of a {}.",
    "ShapeWorldNoisy": "a photo of a {}.",
    "ShapeWorldPastel": "a photo of a {}.",
    "ShapeWorldClutter": "a photo of a {}.",
    "MoreShapes": "a photo of a {}.",
    "ShapePatterns": "a photo of a {}.",
    "FashionMNIST": "a photo of a {}, a type of clothing.",
}


def template_for(dataset_name: str) -> str:
    """The hand-crafted template of a dataset (``{}`` marks the class name)."""
    return CUSTOM_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATE)
