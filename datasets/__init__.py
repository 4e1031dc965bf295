"""Dassl datasets in CoOp's on-disk layouts; importing this package registers them.

Run from the repository root (as CoOp's train.py is): this folder is not installed into
site-packages, where it would shadow the Hugging Face package of the same name.
"""
from . import (  # noqa: F401,E501  (CoOp's 15 datasets)
    benchmark,  # noqa: F401  (the built-in CPU-scale benchmark)
    caltech101,
    dtd,
    eurosat,
    fgvc_aircraft,
    food101,
    imagenet,
    imagenet_a,
    imagenet_r,
    imagenet_sketch,
    imagenetv2,
    oxford_flowers,
    oxford_pets,
    stanford_cars,
    sun397,
    ucf101,
)
