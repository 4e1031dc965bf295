"""The built-in CPU-scale benchmark: generation, split files, the shipped tiny CLIP, datasets."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selftpt.benchmark import catalog
from selftpt.benchmark import materialize as mat
from selftpt.benchmark.catalog import DATASETS, PRETRAIN_TIERS, WorldDataset
from selftpt.benchmark.world import WORLD_VERSION

TINY = WorldDataset("TinyWorld", "tinyworld", catalog.SHAPEWORLD_CLASSES[:6], n_train=3, n_val=2, n_test=2, seed=5)


@pytest.fixture()
def tiny_catalog(monkeypatch):
    """Register a 6-class, 7-images-per-class world dataset for the duration of a test."""
    monkeypatch.setitem(catalog.DATASETS, TINY.name, TINY)
    return TINY


@pytest.fixture(scope="session")
def bench_root(tmp_path_factory):
    """A dataset root with ShapeWorld materialised once for the session."""
    root = tmp_path_factory.mktemp("bench")
    mat.materialize("ShapeWorld", root, verbose=False)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- generation

def test_rendering_is_deterministic_per_seed():
    spec = DATASETS["ShapeWorld"]
    a = mat.render_world_class(spec, 3, "test", 5)
    b = mat.render_world_class(spec, 3, "test", 5)
    other = mat.render_world_class(dataclasses.replace(spec, seed=spec.seed + 1), 3, "test", 5)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, other)
    assert not np.array_equal(a, mat.render_world_class(spec, 3, "train", 5))  # splits differ


def test_materialize_same_seed_same_bytes(tiny_catalog, tmp_path, capsys):
    one = mat.materialize(TINY.name, tmp_path / "a")
    assert f"generating {TINY.name} into {one}" in capsys.readouterr().out  # says where it writes
    two = mat.materialize(TINY.name, tmp_path / "b", verbose=False)
    assert _files(one) == _files(two)
    catalog.DATASETS[TINY.name] = dataclasses.replace(TINY, seed=6)
    three = mat.materialize(TINY.name, tmp_path / "c", verbose=False)
    split = json.loads((three / f"split_{TINY.name}.json").read_text())
    assert split == json.loads((one / f"split_{TINY.name}.json").read_text())  # same labels and names
    assert _files(one) != _files(three)  # other pixels


def test_split_file_is_coop_format_and_complete(tiny_catalog, tmp_path):
    from datasets.common import split_problems

    folder = mat.materialize(TINY.name, tmp_path, verbose=False)
    split = json.loads((folder / f"split_{TINY.name}.json").read_text())
    assert split_problems(split, num_classes=len(TINY.classes)) == []
    for key, per_class in (("train", TINY.n_train), ("val", TINY.n_val), ("test", TINY.n_test)):
        labels = [lab for _, lab, _ in split[key]]
        assert sorted(set(labels)) == list(range(len(TINY.classes)))
        assert all(labels.count(lab) == per_class for lab in set(labels))
        for rel, lab, name in split[key]:
            assert (folder / "images" / rel).is_file()
            assert name == TINY.classes[lab].name
    meta = json.loads((folder / mat.META_FILE).read_text())
    assert meta["world_version"] == WORLD_VERSION and meta["counts"]["test"] == 2 * len(TINY.classes)


def test_materialize_is_cached_and_replaces_stale_copies(tiny_catalog, tmp_path):
    folder = mat.materialize(TINY.name, tmp_path, verbose=False)
    stamp = (folder / mat.META_FILE).stat().st_mtime_ns
    assert mat.materialize(TINY.name, tmp_path, verbose=False) == folder
    assert (folder / mat.META_FILE).stat().st_mtime_ns == stamp  # not regenerated
    meta = json.loads((folder / mat.META_FILE).read_text())
    (folder / mat.META_FILE).write_text(json.dumps(meta | {"world_version": -1}))
    (folder / "junk.txt").write_text("from an older version")
    assert not mat.is_materialized(TINY.name, tmp_path)
    mat.materialize(TINY.name, tmp_path, verbose=False)
    assert mat.is_materialized(TINY.name, tmp_path) and not (folder / "junk.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == [TINY.dataset_dir]  # no temp or stale folder left


def test_interrupted_generation_leaves_no_dataset(tiny_catalog, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mat, "_write", boom)
    with pytest.raises(KeyboardInterrupt):
        mat.materialize(TINY.name, tmp_path, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(mat.ENV_ROOT, str(tmp_path))
    assert mat.default_data_root() == tmp_path.resolve()
    monkeypatch.delenv(mat.ENV_ROOT)
    assert mat.default_data_root() == (Path.home() / ".cache" / "selftpt" / "data").resolve()


# ----------------------------------------------------------------------------- class design

@pytest.mark.parametrize("name", ["ShapeWorld", "MoreShapes", "ShapePatterns"])
def test_new_classes_are_new_combinations_of_base_words(name):
    classes = DATASETS[name].classes
    half = len(classes) // 2
    base, new = classes[:half], classes[half:]
    assert len(classes) >= 40
    words = lambda cs: {w for c in cs for w in c.name.split()}  # noqa: E731
    assert words(new) <= words(base)  # every word of a new class was seen in base classes
    assert not {c.name for c in new} & {c.name for c in base}
    for half_classes in (base, new):  # both halves hold unseen and rare pretraining pairs
        tiers = {catalog.tier_of(c) for c in half_classes}
        assert {"unseen", "rare", "common"} <= tiers


def test_pretraining_never_shows_unseen_pairs():
    from selftpt.benchmark.pretrain import CaptionedBatches

    unseen = {k for k, t in PRETRAIN_TIERS.items() if t == "unseen"}
    data = CaptionedBatches(seed=1, batch_size=96, context_length=32, steps=3, fashion_pool=None)
    for step in range(3):
        images, texts, drawn = data.make(step)
        assert images.shape == (96, 32, 32, 3) and len(texts) == 96
        shown = set(drawn["pairs"]) | set(drawn["distractors"]) | set(drawn["patterns"])
        assert not shown & unseen
    again = data.make(2)
    assert np.array_equal(again[0], images) and again[1] == texts  # a batch is a function of (seed, step)


# ----------------------------------------------------------------------------- the tiny CLIP

def test_shipped_backbone_loads_and_beats_chance(bench_root):
    from selftpt.benchmark.zeroshot import evaluate_dataset
    from selftpt.clip_loader import BUILTIN_BACKBONES, CLIP_ARCHS, build_random_clip, load_clip

    name = "Bench-RN-T"
    assert name in BUILTIN_BACKBONES and name in CLIP_ARCHS
    model = load_clip(name)  # the normal loading path, from selftpt/assets
    assert model.visual.input_resolution == 32 and model.context_length == 32
    assert next(model.parameters()).dtype == torch.float32
    result = evaluate_dataset(model, "ShapeWorld", bench_root)
    assert result["all"] >= 3 * result["chance_all"]  # the benchmark's quality bar
    assert result["base"] > 2 * result["chance_base"] and result["new"] > 2 * result["chance_new"]
    random_model = build_random_clip(name)
    assert evaluate_dataset(random_model, "ShapeWorld", bench_root, limit=256)["all"] < result["all"]


def test_pretraining_script_runs_and_is_deterministic(tmp_path):
    from selftpt.benchmark.pretrain import pretrain
    from selftpt.clip_loader import load_clip

    kwargs = dict(steps=2, batch_size=16, workers=0, threads=1, use_fashion=False, evaluate=False)
    record = pretrain(tmp_path / "a.pt", **kwargs)
    pretrain(tmp_path / "b.pt", **kwargs)
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())
    assert record["steps"] == 2 and json.loads((tmp_path / "a.json").read_text())["batch_size"] == 16
    assert load_clip(str(tmp_path / "a.pt")).context_length == 32


# ----------------------------------------------------------------------------- registered datasets

def _cfg(name: str, root, shots: int, subsample: str):
    from selftpt.config import extend_cfg
    from selftpt.toolbox import get_cfg_default

    cfg = extend_cfg(get_cfg_default())
    cfg.DATASET.NAME, cfg.DATASET.ROOT = name, str(root)
    cfg.DATASET.NUM_SHOTS, cfg.DATASET.SUBSAMPLE_CLASSES, cfg.SEED = shots, subsample, 1
    return cfg


def test_registered_dataset_few_shot_and_halves(bench_root):
    import datasets  # noqa: F401  (registers the datasets)
    from selftpt.toolbox import build_dataset

    names = DATASETS["ShapeWorld"].classnames
    full = build_dataset(_cfg("ShapeWorld", bench_root, -1, "all"))
    assert full.num_classes == 64 and full.classnames == names and len(full.test) == 64 * 20
    base = build_dataset(_cfg("ShapeWorld", bench_root, 2, "base"))
    assert base.num_classes == 32 and len(base.train_x) == 32 * 2 and len(base.val) == 32 * 2
    assert base.classnames == names[:32] and len(base.test) == 32 * 20
    again = build_dataset(_cfg("ShapeWorld", bench_root, 2, "base"))  # from the few-shot cache
    assert [d.impath for d in again.train_x] == [d.impath for d in base.train_x]
    new = build_dataset(_cfg("ShapeWorld", bench_root, 2, "new"))
    assert new.classnames == names[32:] and {d.label for d in new.test} == set(range(32))


def test_registered_shift_is_test_only(tmp_path):
    import datasets  # noqa: F401
    from selftpt.toolbox import build_dataset

    shifted = build_dataset(_cfg("ShapeWorldSketch", tmp_path, 16, "all"))
    assert shifted.num_classes == 64 and len(shifted.test) == 64 * 16
    assert [d.impath for d in shifted.train_x] == [d.impath for d in shifted.test]


def test_fashion_mnist_reader():
    from selftpt.benchmark import fashion

    try:
        images, labels = fashion.load_split("test")
    except fashion.FashionMNISTUnavailable:
        pytest.skip("Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)")
    assert images.shape == (10000, 28, 28) and sorted(set(labels.tolist())) == list(range(10))
    rgb = fashion.to_rgb32(images[:3])
    assert rgb.shape == (3, 32, 32, 3) and np.array_equal(rgb[:, 2:30, 2:30, 0], images[:3])


def test_protocols_name_registered_datasets():
    from selftpt import dataset_catalog
    from selftpt.deep_prompts import require_vit_backbone
    from selftpt.errors import ConfigError
    from selftpt.protocols import PROTOCOLS

    configs = Path(__file__).resolve().parents[1] / "configs"
    for protocol in PROTOCOLS.values():
        defaults = protocol.defaults(dataset_catalog.BENCHMARK)
        assert defaults.targets and (defaults.source or protocol.name in ("base2new", "fewshot"))
        for stem in defaults.datasets:
            assert dataset_catalog.find(stem, dataset_catalog.BENCHMARK).name in DATASETS
            assert (configs / "datasets" / f"{stem}.yaml").is_file()
        # the shipped benchmark configs use the backbone the defaults name
        # (the deep-prompt methods' name the benchmark's ViT: they refuse the default, a ResNet)
        for path in configs.glob("trainers/*/bench*.yaml"):
            if f'NAME: "{defaults.backbone}"' not in path.read_text():
                assert 'NAME: "Bench-ViT-S"' in path.read_text(), path
                with pytest.raises(ConfigError, match="is a ResNet CLIP"):
                    require_vit_backbone(path.parent.name, defaults.backbone)


def test_protocols_cli_accepts_old_and_new_names(capsys):
    from selftpt.benchmark.protocols import main

    for old, new in (("cross_dataset", "xd"), ("domain_generalization", "dg"), ("base2new", "base2new")):
        main([old, "--names"])
        main([new, "--names"])
        first, second = capsys.readouterr().out.splitlines()
        assert first == second
    main(["xd"])
    assert capsys.readouterr().out.split() == ["shapeworld", "moreshapes", "shapepatterns", "fashion_mnist"]
    main(["dg", "--names"])
    assert capsys.readouterr().out.split() == ["ShapeWorld", "ShapeWorldSketch", "ShapeWorldNoisy",
                                               "ShapeWorldPastel", "ShapeWorldClutter"]
