"""Entry point with CoOp's flags: ``python train.py --root $DATA --trainer SelfTPT ...``.

Run from the repository root: importing ``datasets`` and ``trainers`` registers them.
"""
import sys

import datasets  # noqa: F401  (registers the datasets)
import trainers  # noqa: F401  (registers the trainers)
from selftpt.launch import main

if __name__ == "__main__":
    sys.exit(main())
