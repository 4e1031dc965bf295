"""Makes the repository root importable in tests (``datasets``, ``trainers``), as for train.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
