"""Hand-crafted prompt templates: one per dataset (CoOp's ``CUSTOM_TEMPLATES``, kept in
``selftpt.dataset_catalog``) and CLIP's ImageNet prompt-ensemble lists.

Zero-shot CLIP classifies with the per-dataset template, and Self-TPT uses it as the fourth,
fixed CPT view; datasets without an entry fall back to ``DEFAULT_TEMPLATE``. ZeroshotCLIP2
averages the text features of an ensemble of templates (``ensemble_templates``).
"""
from __future__ import annotations

from selftpt.dataset_catalog import DATASETS, DEFAULT_TEMPLATE
from selftpt.errors import ConfigError

CUSTOM_TEMPLATES: dict[str, str] = {d.name: d.template for d in DATASETS}


def template_for(dataset_name: str) -> str:
    """The hand-crafted template of a dataset (``{}`` marks the class name)."""
    return CUSTOM_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATE)


# CLIP's 80 ImageNet templates (Radford et al., 2021; openai/CLIP's notebook
# "Prompt_Engineering_for_ImageNet"), in that order. CoOp ships them as IMAGENET_TEMPLATES
# (trainers/imagenet_templates.py); TPT's repository holds the same list (data/imagnet_prompts.py)
# and its README attributes its "Ensembled prompt" baseline row to CLIP.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7 of them that CoOp's ZeroshotCLIP2 averages (IMAGENET_TEMPLATES_SELECT), in CoOp's order.
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Values of TRAINER.ZSCLIP.ENSEMBLE:
#   coop_select: CoOp's ZeroshotCLIP2, the 7 templates above plus the dataset's own template
#                for every dataset except ImageNet;
#   clip80:      CLIP's 80 ImageNet templates, for every dataset.
ENSEMBLES = ("coop_select", "clip80")


def ensemble_templates(dataset_name: str, ensemble: str = "coop_select") -> list[str]:
    """The templates whose text features ZeroshotCLIP2 averages for ``dataset_name``.

    Args:
        dataset_name: the registered Dassl name (``DATASET.NAME``), e.g. ``OxfordPets``.
        ensemble: one of ``ENSEMBLES``.

    Returns:
        A new list on every call (sweep workers evaluate many datasets in one process, so a
        shared list must never grow).
    """
    if ensemble == "coop_select":
        templates = list(IMAGENET_TEMPLATES_SELECT)
        # CoOp compares the name with "ImageNet" exactly: its variants (ImageNetV2, -Sketch, -A,
        # -R) do get their template ("a photo of a {}.") added.
        if dataset_name != "ImageNet":
            templates.append(template_for(dataset_name))
        return templates
    if ensemble == "clip80":
        return list(IMAGENET_TEMPLATES)
    raise ConfigError(f"unknown prompt ensemble {ensemble!r}; choose from {ENSEMBLES}")
