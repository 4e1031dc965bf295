"""The benchmark's second backbone, Bench-RN-S (selftpt/benchmark/staged.py): the
shipped asset is a clip.model.CLIP loaded by name, and its sidecar records how it was made."""
import json

import numpy as np
import pytest
import torch

from selftpt.benchmark import captions, staged
from selftpt.clip_loader import ASSET_DIR, BUILTIN_BACKBONES, CLIP_ARCHS, load_clip


def test_bench_rn_s_asset_is_a_clip_model_with_its_recorded_settings():
    from clip.model import CLIP

    name = staged.BACKBONE_NAME
    assert BUILTIN_BACKBONES[name] == staged.ASSET_FILE and name in CLIP_ARCHS
    model = load_clip(name)  # the normal loading path, from selftpt/assets
    assert isinstance(model, CLIP)
    assert model.visual.input_resolution == CLIP_ARCHS[name]["image_resolution"] == 64
    assert model.context_length == 32 and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        img = model.encode_image(torch.zeros(2, 3, 64, 64))
        txt = model.encode_text(torch.zeros(2, 32, dtype=torch.long))
    assert img.shape == txt.shape == (2, CLIP_ARCHS[name]["embed_dim"])
    asset = ASSET_DIR / staged.ASSET_FILE
    assert asset.stat().st_size <= 20 * 2 ** 20
    record = json.loads(asset.with_suffix(".json").read_text())
    assert record["backbone"] == name and record["recipe"] == "staged"
    assert record["arch"]["image_resolution"] == 64
    settings = staged.Recipe(**{**record["settings"]})
    assert settings.caption_version in captions.WORLD_CAPTIONS
    assert set(record["quality"]["zeroshot"]) >= {"ShapeWorld", "MoreShapes", "ShapePatterns"}
    assert len(record["quality"]["probe_shapeworld_base"]["values"]) == 3


def test_caption_version_1_is_unchanged_and_versions_are_chosen_by_number():
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    args = ("red", "star", "striped", "photo", 0.25, [("blue", "circle")], "gray")
    assert captions.world_caption_version(1)(rng1, *args, "striped") == captions.world_caption(rng2, *args)
    assert captions.world_caption_version(2) is captions.world_caption_v2
    with pytest.raises(ValueError, match="known"):
        captions.world_caption_version(99)


def test_staged_batches_are_functions_of_seed_stage_and_step():
    recipe = staged.Recipe(batch_size=8)
    data = staged.SupervisedBatches(recipe, "photo", steps=2, resolution=64)
    x, yc, ys, yp = data[1]
    again = data[1]
    assert x.shape == (8, 3, 64, 64) and torch.equal(x, again[0]) and torch.equal(ys, again[2])
    assert not torch.equal(x, data[0][0])
