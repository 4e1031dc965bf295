"""Install the ``selftpt`` library; ``train.py``, ``trainers/`` and ``datasets/`` run from the
repository root as in CoOp (``datasets`` is deliberately not installed: it would shadow the
Hugging Face package of that name)."""
from setuptools import find_packages, setup

setup(
    name="selftpt",
    version="0.1.0",
    description="Self-TPT: efficient test-time prompt tuning for CLIP, as a Dassl/CoOp plug-in",
    python_requires=">=3.10",
    packages=find_packages(include=["selftpt", "selftpt.*"]),
    package_data={"selftpt": ["assets/*.pt", "assets/*.json", "reference/*.yaml"]},
    install_requires=[
        "torch>=2.0,<=2.14.1",
        "torchvision>=0.15,<=0.29.1",
        "setuptools<82",  # openai-clip imports pkg_resources
        "openai-clip>=1.0.1",
        "yacs>=0.1.8",
        "gdown>=4.7",
        "tabulate>=0.9",
        "tqdm>=4.60",
        "scipy>=1.9",
        "numpy>=1.23",
        "Pillow>=9.0",
        "matplotlib>=3.6",
    ],
    extras_require={
        # the SLURM launcher's tests need submitit; tests/test_open_clip.py needs open_clip (and its timm)
        "test": ["pytest>=7", "ruff>=0.6", "submitit>=1.5", "open-clip-torch>=3.0"],
        "openclip": ["open-clip-torch>=3.0"],  # open_clip: backbones (OpenCLIP, EVA-CLIP), docs/backbones.md
        "slurm": ["submitit>=1.5"],  # LAUNCHER=slurm
        "mutation": ["mutmut>=3.3"],
    },
)
