#!/usr/bin/env python
"""Every trainer on a GPU user's path (ViT-B/16 shape, 1000 classes, default precision): finite
results, time and peak memory. See selftpt/gpu_check.py.

    python gpu_check.py
"""
import sys

import datasets  # noqa: F401  (registers the datasets, as train.py does)
import trainers  # noqa: F401  (registers the trainers)
from selftpt.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
