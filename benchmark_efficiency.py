#!/usr/bin/env python
"""Measure images/s, peak memory and one-time cost per method on the same images.

Examples:
    python benchmark_efficiency.py                       # ViT-B/16 (random weights if none here), 100 and 1000 classes
    python benchmark_efficiency.py --device cuda --precision fp16 --batch-sizes 1 100 --num-images 200
    python benchmark_efficiency.py --backbone ViT-B/16 --num-classes 100 --methods ZeroshotCLIP SelfTPT TPT \\
        --num-images 2 --batch-sizes 1 2 --warmup 0 --tta-steps 1
    python benchmark_efficiency.py --dataset Caltech101 --root $DATA --cache-sweep
    python parse_results.py output/xd --plot eff.png --efficiency output/efficiency/efficiency_ViT-B-16_100cls.json

Run from the repository root: importing ``datasets`` and ``trainers`` registers them, and each
measuring subprocess imports the same modules. See selftpt/efficiency/ for what is timed and how
memory is measured, configs/efficiency.yaml for the comparisons and targets.
"""
import sys

import datasets  # noqa: F401  (registers the datasets)
import trainers  # noqa: F401  (registers the trainers)
from selftpt.efficiency import main

if __name__ == "__main__":
    sys.exit(main())
