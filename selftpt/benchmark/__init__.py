"""The project's own CPU-scale benchmark: a tiny pretrained CLIP and datasets for all three
protocols, so that the whole pipeline runs end to end on two CPU cores (see docs/benchmark.md).

Modules (one concept each):

* ``world``: the procedural image world (vocabulary, scene sampling, vectorised rendering,
  rendering styles).
* ``captions``: noisy, partial alt-text-like captions for pretraining.
* ``fashion``: Fashion-MNIST from Debian's package, ``$SELFTPT_FASHION_MNIST`` or torchvision.
* ``catalog``: the benchmark datasets as data (classes, styles, sizes, seeds, pretraining tiers).
* ``materialize``: writes a dataset to disk in CoOp's layout, atomically; the default root.
* ``pretrain``: pretrains and saves the tiny CLIP (``Bench-RN-T``); the command line of all three.
* ``staged``: the second backbone, ``Bench-RN-S`` (supervised image tower, then the text tower).
* ``distill``: the ViT backbone, ``Bench-ViT-S`` (an image tower distilled from ``Bench-RN-S``'s).
* ``quality``: a backbone's linear probe, text-initialised probe and zero-shot table.
* ``zeroshot``: zero-shot accuracy with hand-crafted prompts (all / base / new / tiers).
* ``protocols``: prints a protocol's benchmark datasets (the protocols are ``selftpt.protocols``,
  the datasets' roles ``selftpt.dataset_catalog``).

This package never imports the top-level ``datasets`` or ``trainers``; ``datasets/benchmark.py``
registers the datasets with Dassl's registry.
"""
