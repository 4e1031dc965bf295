"""TPT's test-time views (selftpt/views.py) and its AugMix (selftpt/augmix.py), on small images."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from selftpt import augmix as am
from selftpt import views as tv

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def op_parameters(name: str, n: int, size: int) -> list:
    torch.manual_seed(0)
    return [am.sample_op(name, 1, (size, size)).parameter for _ in range(n)]


def views_cfg(dataset: str = "OxfordPets", augmix: str = "auto"):
    cfg = SimpleNamespace(INPUT=SimpleNamespace(SIZE=(32, 32), PIXEL_MEAN=MEAN, PIXEL_STD=STD,
                                                INTERPOLATION="bicubic"),
                          DATASET=SimpleNamespace(NAME=dataset))
    return tv.TestTimeViews.from_cfg(cfg, 6, augmix)


def reference_crop_and_flip(image: Image.Image, size: int = 32) -> Image.Image:
    """TPT's ``get_preaugment``: torchvision defaults (scale (0.08, 1), bilinear), then a flip."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])(image)


# --------------------------------------------------------------------------- the operations
def test_op_parameters_lie_in_and_span_the_reference_ranges_at_severity_1():
    n = 600
    rotate = op_parameters("rotate", n, 224)
    solarize = op_parameters("solarize", n, 224)
    posterize = op_parameters("posterize", n, 224)
    shear = op_parameters("shear_x", n, 224) + op_parameters("shear_y", n, 224)
    translate = {size: op_parameters("translate_x", n, size) + op_parameters("translate_y", n, size)
                 for size in (224, 64, 32)}
    print(f"rotate {sorted(set(rotate))}, solarize [{min(solarize)}, {max(solarize)}], "
          f"posterize {sorted(set(posterize))}, "
          f"|shear| [{min(map(abs, shear)):.5f}, {max(map(abs, shear)):.5f}], "
          + ", ".join(f"translate@{s} {sorted(set(t))}" for s, t in translate.items()))

    # rotate: int(level * 30 / 10) degrees with level < 1: up to 2 degrees, both directions
    assert set(rotate) == {-2, -1, 0, 1, 2}
    # solarize: 256 - int(level * 25.6): thresholds 231..254, both ends reached
    assert min(solarize) == 231 and max(solarize) == 254 and len(set(solarize)) == 24
    # posterize: 4 - int(level * 0.4) = 4 bits always
    assert set(posterize) == {4}
    # shear: level * 0.03, both signs, never zero
    magnitudes = [abs(s) for s in shear]
    assert min(magnitudes) >= 0.003 and max(magnitudes) < 0.03 and max(magnitudes) > 0.028
    assert min(shear) < 0 < max(shear)
    # translate: int(level * size / 30) pixels, both signs
    assert set(translate[224]) == set(range(-7, 8))
    assert set(translate[64]) == set(range(-2, 3))
    assert set(translate[32]) == {-1, 0, 1}
    # autocontrast and equalize take no parameter
    assert am.sample_op("autocontrast", 1, (32, 32)).parameter is None
    with pytest.raises(ValueError, match="Unknown AugMix operation"):
        am.sample_op("color", 1, (32, 32))


def test_ops_apply_their_parameter():
    image = noise_image(64, 48)
    pixels = np.asarray(image).astype(int)

    shifted = np.asarray(am.apply_op(image, am.OpCall("translate_x", 2)))
    assert np.array_equal(shifted[:, :-2], pixels[:, 2:]) and not shifted[:, -2:].any()  # content moves 2 px left
    shifted = np.asarray(am.apply_op(image, am.OpCall("translate_y", -2)))
    assert np.array_equal(shifted[2:], pixels[:-2]) and not shifted[:2].any()  # content moves 2 px down

    solarized = np.asarray(am.apply_op(image, am.OpCall("solarize", 231))).astype(int)
    assert np.array_equal(solarized, np.where(pixels >= 231, 255 - pixels, pixels))
    posterized = np.asarray(am.apply_op(image, am.OpCall("posterize", 4)))
    assert np.array_equal(posterized, pixels & 0xF0)

    for op in (am.OpCall("rotate", 2), am.OpCall("rotate", -1), am.OpCall("shear_x", 0.03),
               am.OpCall("shear_y", -0.02)):
        assert not np.array_equal(np.asarray(am.apply_op(image, op)), pixels), op
    assert np.array_equal(np.asarray(am.apply_op(image, am.OpCall("rotate", 0))), pixels)


# --------------------------------------------------------------------------- the blend
def test_chain_depths_ops_and_mixing_weights():
    torch.manual_seed(0)
    draws = [am.sample_augmix((32, 32)) for _ in range(300)]
    depths = [len(chain) for draw in draws for chain in draw.chains]
    names = {op.name for draw in draws for chain in draw.chains for op in chain}
    sums = torch.stack([draw.weights.sum() for draw in draws])
    skips = [draw.skip for draw in draws]
    print(f"depth counts {np.bincount(depths).tolist()}, weight sums [{sums.min():.7f}, {sums.max():.7f}], "
          f"skip m [{min(skips):.4f}, {max(skips):.4f}]")

    assert all(len(draw.chains) == 3 and draw.weights.shape == (3,) for draw in draws)  # width 3
    assert set(depths) == {1, 2, 3}
    counts = np.bincount(depths)[1:]
    assert counts.min() > 0.25 * len(depths)  # each depth about a third of the chains
    assert names == set(am.OPS)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
    assert all((draw.weights > 0).all() for draw in draws)
    assert 0 < min(skips) < 0.05 and 0.95 < max(skips) < 1  # Beta(1, 1) spans (0, 1)


def test_apply_augmix_is_tpts_float_blend():
    crop = noise_image(32, 32, seed=1)
    draw = am.AugMixDraw(chains=((am.OpCall("translate_x", 1),),
                                 (am.OpCall("solarize", 240), am.OpCall("posterize", 4)),
                                 (am.OpCall("equalize", None),)),
                         weights=torch.tensor([0.2, 0.3, 0.5]), skip=0.25)
    chain_images = [crop.transform(crop.size, Image.Transform.AFFINE, (1, 0, 1, 0, 1, 0)),
                    ImageOps.posterize(ImageOps.solarize(crop, 240), 4),
                    ImageOps.equalize(crop)]
    mix = sum(w * PREPROCESS(img) for w, img in zip((0.2, 0.3, 0.5), chain_images))
    expected = 0.25 * PREPROCESS(crop) + 0.75 * mix  # TPT: m on the clean crop, 1 - m on the mixture
    assert torch.allclose(am.apply_augmix(crop, draw, PREPROCESS), expected, atol=1e-6)


# --------------------------------------------------------------------------- the views
def test_augmix_views_are_float_blends_of_the_flipped_crop_and_reproducible():
    image = noise_image(48, 40)
    views = views_cfg()  # AugMix on ("auto" on a fine-grained set)
    torch.manual_seed(0)
    first = views(image)
    torch.manual_seed(0)
    assert torch.equal(views(image), first)  # the torch seed alone fixes the views

    # un-normalised to 0..255, a uint8 blend sits on integers; TPT's float blend does not
    pixels = (first[1:] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    off_grid = ((pixels - pixels.round()).abs() > 1e-3).float().mean(dim=(1, 2, 3))
    print(f"fraction of off-grid values per augmented view: {[round(f, 2) for f in off_grid.tolist()]}")
    assert (off_grid > 0.2).sum() >= 4

    # an augmented view = TPT's crop + flip, then AugMix of the flipped crop, in that draw order
    torch.manual_seed(5)
    view = views.augmented_view(image)
    torch.manual_seed(5)
    crop = reference_crop_and_flip(image)
    assert torch.equal(view, am.augmix(crop, PREPROCESS))


def test_crops_are_bilinear_and_the_clean_view_is_the_bicubic_resize_and_centre_crop():
    views = views_cfg()
    parts = [t for value in vars(views).values() if isinstance(value, T.Compose) for t in value.transforms]
    crops = [t for t in parts if isinstance(t, T.RandomResizedCrop)]
    resizes = [t for t in parts if type(t) is T.Resize]
    assert crops and resizes
    assert all(c.interpolation == T.InterpolationMode.BILINEAR and tuple(c.scale) == (0.08, 1.0) for c in crops)
    assert all(r.interpolation == T.InterpolationMode.BICUBIC for r in resizes)

    image = noise_image(50, 37)
    clean = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), PREPROCESS])
    torch.manual_seed(0)
    assert torch.equal(views(image)[0], clean(image))


def test_without_augmix_augmented_views_are_crop_and_flip_only():
    for name in ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"):
        assert not tv.use_augmix("auto", name)  # TPT: no AugMix on ImageNet and its variants
    assert tv.use_augmix("auto", "OxfordPets") and tv.use_augmix("on", "ImageNet")
    assert not tv.use_augmix("off", "OxfordPets")
    with pytest.raises(ValueError, match="auto, on or off"):
        tv.use_augmix("yes", "OxfordPets")

    image = noise_image(80, 60)
    for views in (views_cfg("ImageNetA"), views_cfg("OxfordPets", "off")):
        torch.manual_seed(3)
        out = views(image)
        torch.manual_seed(3)
        expected = [PREPROCESS(reference_crop_and_flip(image)) for _ in range(5)]
        assert out.shape == (6, 3, 32, 32)
        assert all(torch.equal(out[i + 1], e) for i, e in enumerate(expected))


# --------------------------------------------------------------------------- views seeded per item
def seeded_items(tmp_path, seed: int, is_train: bool = False, n_images: int = 4):
    """An ``ItemSeededDatasetWrapper`` over ``n_images`` noise images with TPT's views (AugMix on)."""
    from selftpt.toolbox import Datum
    from tests.helpers import project_cfg

    cfg = project_cfg(["SEED", str(seed), "INPUT.SIZE", "(32, 32)"])
    data = []
    for i in range(n_images):
        path = tmp_path / f"{i}.png"
        noise_image(40, 36, seed=i).save(path)
        data.append(Datum(impath=str(path), label=i % 2, domain=0))
    views = tv.TestTimeViews(cfg.INPUT.SIZE, n_views=5, augmix=True)
    return tv.ItemSeededDatasetWrapper(cfg, data, transform=views, is_train=is_train)


def test_a_test_items_views_depend_on_the_run_seed_and_its_index_alone(tmp_path):
    items = seeded_items(tmp_path, seed=1)
    forward = [items[i]["img"] for i in range(4)]
    torch.manual_seed(123)  # another global state, items read in another order (as another worker would)
    backward = {i: items[i]["img"] for i in (3, 1, 2, 0)}
    assert all(torch.equal(forward[i], backward[i]) for i in range(4))
    other_seed = seeded_items(tmp_path, seed=2)
    assert not torch.equal(forward[0][1:], other_seed[0]["img"][1:])
    assert torch.equal(forward[0][0], other_seed[0]["img"][0])  # the clean view is not random


def test_seeding_items_leaves_the_global_random_state_as_it_was(tmp_path):
    items = seeded_items(tmp_path, seed=1)
    torch.manual_seed(7)
    items[0]
    after_item = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_item, torch.rand(3))


@pytest.mark.parametrize("seed, is_train", [(1, True), (-1, False)])
def test_training_items_and_unseeded_runs_draw_from_the_global_stream(tmp_path, seed, is_train):
    items = seeded_items(tmp_path, seed=seed, is_train=is_train)
    torch.manual_seed(0)
    first = items[0]["img"]
    assert not torch.equal(first[1:], items[0]["img"][1:])  # a new draw each time
    torch.manual_seed(0)
    assert torch.equal(first, items[0]["img"])


def test_item_seeds_differ_across_run_seeds_and_indices():
    seeds = {tv.item_seed(s, i) for s in range(1, 4) for i in range(2000)}
    assert len(seeds) == 6000 and max(seeds) < 2 ** 63
    assert tv.item_seed(1, 5) == tv.item_seed(1, 5)


def test_item_seeds_are_the_sha256_of_seed_and_index_little_endian_63_bits():
    # pinned: a changed byte order or shift would give every run other views than before
    assert tv.item_seed(1, 0) == 9096684868786435155 and tv.item_seed(2, 7) == 1904079817086592701


def test_the_same_image_at_two_indices_gets_two_sets_of_views_and_seed_0_is_a_fixed_seed(tmp_path):
    from selftpt.toolbox import Datum
    from tests.helpers import project_cfg

    path = tmp_path / "same.png"
    noise_image(40, 36).save(path)
    cfg = project_cfg(["SEED", "0", "INPUT.SIZE", "(32, 32)"])
    data = [Datum(impath=str(path), label=0, domain=0)] * 2
    items = tv.ItemSeededDatasetWrapper(cfg, data, transform=tv.TestTimeViews(cfg.INPUT.SIZE, n_views=3),
                                        is_train=False)
    first = items[0]["img"]
    assert torch.equal(first, items[0]["img"])  # SEED 0 seeds the items as any other fixed seed
    assert not torch.equal(first[1:], items[1]["img"][1:])  # each index has views of its own


def test_default_views_are_tpts_64_without_augmix_and_one_view_is_the_clean_image():
    image = noise_image(40, 36)
    views = tv.TestTimeViews((32, 32))
    assert views.n_views == 64 and not views.augmix and views(image).shape == (64, 3, 32, 32)
    one = tv.TestTimeViews((32, 32), n_views=1)(image)
    assert one.shape == (1, 3, 32, 32) and torch.equal(one[0], views.clean_view(image))
    with pytest.raises(ValueError, match=r"^n_views must be >= 1, got 0$"):
        tv.TestTimeViews((32, 32), n_views=0)


def test_the_clean_view_uses_the_configs_interpolation():
    image = noise_image(50, 37)
    cfg = SimpleNamespace(INPUT=SimpleNamespace(SIZE=(32, 32), PIXEL_MEAN=MEAN, PIXEL_STD=STD,
                                                INTERPOLATION="bilinear"), DATASET=SimpleNamespace(NAME="X"))
    bilinear = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), PREPROCESS])
    assert torch.equal(tv.TestTimeViews.from_cfg(cfg, 1, "off")(image)[0], bilinear(image))
    assert not torch.equal(views_cfg()(image)[0], bilinear(image))  # bicubic there


def test_repr_names_the_views_and_the_augmix_severity():
    assert "n_views=6" in repr(views_cfg()) and "augmix=severity 1," in repr(views_cfg())
    assert "augmix=off," in repr(views_cfg("ImageNet"))


# --------------------------------------------------------------------------- AugMix details
def test_geometric_ops_are_pils_bilinear_rotate_shear_and_translate():
    image = noise_image(32, 32)
    bilinear = Image.Resampling.BILINEAR

    def affine(*coefficients):
        return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=bilinear)

    expected = {("rotate", 2): image.rotate(2, resample=bilinear),
                ("shear_x", 0.03): affine(1, 0.03, 0, 0, 1, 0), ("shear_y", -0.03): affine(1, 0, 0, -0.03, 1, 0),
                ("translate_x", 1): affine(1, 0, 1, 0, 1, 0), ("translate_y", -1): affine(1, 0, 0, 0, 1, -1)}
    for (name, parameter), want in expected.items():
        got = am.apply_op(image, am.OpCall(name, parameter))
        assert np.array_equal(np.asarray(got), np.asarray(want)), name
        assert not np.array_equal(np.asarray(got), np.asarray(image)), name
    with pytest.raises(ValueError, match=r"^Unknown AugMix operation 'blur'; expected one of \('autocontrast'"):
        am.apply_op(image, am.OpCall("blur", None))


def test_op_parameters_at_the_top_level_of_severity_10(monkeypatch):
    """At level 9.99 every operation's parameter is the reference formula's largest value."""
    monkeypatch.setattr(am, "sample_level", lambda severity: 9.99)
    size = (30, 60)
    top = {name: am.sample_op(name, 10, size).parameter for name in ("posterize", "solarize")}
    assert top == {"posterize": 1, "solarize": 1}  # 4 - int(3.996), 256 - int(255.74)
    magnitudes = {name: abs(am.sample_op(name, 10, size).parameter)
                  for name in ("rotate", "translate_x", "translate_y")}
    assert magnitudes == {"rotate": 29, "translate_x": 9, "translate_y": 19}  # int(9.99 * 30/10), size / 3


def test_levels_follow_the_severity_with_float64_resolution_and_signs_are_fair():
    torch.manual_seed(0)
    levels = [am.sample_level(10) for _ in range(400)]
    assert min(levels) >= am.MIN_LEVEL and max(levels) > 9 and max(levels) < 10
    draws = [am._uniform() for _ in range(400)]
    assert 0 <= min(draws) and max(draws) < 1
    assert any(d != float(np.float32(d)) for d in draws)  # not float32 draws
    negative = sum(am._random_sign(1) < 0 for _ in range(4000))
    assert 1800 < negative < 2200


def test_default_blends_are_tpts_severity_1_width_3_random_depth_alpha_1():
    crop = noise_image(32, 32)
    torch.manual_seed(5)
    default = am.augmix(crop, PREPROCESS)
    torch.manual_seed(5)
    assert torch.equal(default, am.apply_augmix(crop, am.sample_augmix(crop.size, 1.0, 3, None, 1.0), PREPROCESS))
    torch.manual_seed(5)
    explicit = am.augmix(crop, PREPROCESS, depth=2, alpha=0.5)
    torch.manual_seed(5)
    assert torch.equal(explicit, am.apply_augmix(crop, am.sample_augmix(crop.size, 1.0, 3, 2, 0.5), PREPROCESS))
    assert all(len(chain) == 2 for chain in am.sample_augmix(crop.size, depth=2).chains)
    torch.manual_seed(0)  # default severity 1: rotations of at most 2 degrees, whatever the draw
    rotations = [abs(op.parameter) for _ in range(300) for chain in am.sample_augmix((224, 224)).chains
                 for op in chain if op.name == "rotate"]
    rotations += [abs(op.parameter) for _ in range(300) for op in am.sample_chain((224, 224)) if op.name == "rotate"]
    assert len(rotations) > 50 and max(rotations) == 2
