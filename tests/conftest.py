"""Shared fixtures, built once per session: a tiny random CLIP with TinyShapes, and a tiny
CLIP pretrained for seconds with LearnableShapes (the world in which training visibly works)."""
from __future__ import annotations

import pytest
import torch

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


@pytest.fixture(scope="session")
def learnable_clip_path(tmp_path_factory):
    """A tiny CLIP pretrained contrastively for a few seconds (tests/learnable_world.py)."""
    from tests.learnable_world import pretrain_learnable_clip
    path = tmp_path_factory.mktemp("learnable_clip") / "learnable_clip.pt"
    pretrain_learnable_clip(path)
    return path


@pytest.fixture(scope="session")
def learnable_data_root(tmp_path_factory):
    """LearnableShapes (12 colour x shape classes, CoOp's layout) under a session folder."""
    from tests.learnable_world import make_learnable_images
    return make_learnable_images(tmp_path_factory.mktemp("learnable_data"))
