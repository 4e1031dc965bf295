"""Shared fixtures: a tiny CLIP file and the TinyShapes dataset root (built once per session)."""
from __future__ import annotations

import torch
import pytest

torch.set_num_threads(1)  # CI machines have two cores; keep tests predictable


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    from tests.helpers import make_tiny_clip
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    from tests.helpers import make_tiny_images
    root = tmp_path_factory.mktemp("data")
    make_tiny_images(root)
    return root
