"""The 15 CoOp datasets on generated miniatures of their real layouts; few-shot cache;
base/new halves; bad inputs; the prepare_data.py download and check commands."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
import types
from pathlib import Path

import pytest

import datasets  # noqa: F401  (registers the datasets)
import prepare_data
from datasets.catalog import CATALOG, SHA256, get_spec
from datasets.common import DatasetError, split_problems, subsample_classes
from datasets.prepare import check_dataset, download_files
from selftpt import dataset_catalog
from selftpt.config import extend_cfg
from selftpt.errors import UserError
from selftpt.protocols import PROTOCOLS
from selftpt.templates import CUSTOM_TEMPLATES, DEFAULT_TEMPLATE, template_for
from selftpt.toolbox import DATASET_REGISTRY, USING_DASSL, DatasetBase, Datum, build_dataset, get_cfg_default
from tests import dataset_layouts as L

REPO = Path(__file__).resolve().parents[1]


def cfg_for(root, name, shots=-1, seed=1, subsample="all"):
    cfg = extend_cfg(get_cfg_default())
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = name
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.SEED = seed
    cfg.VERBOSE = False
    return cfg


def load(root, name, **kw):
    return build_dataset(cfg_for(root, name, **kw))


def triples(items, root=None):
    """(path relative to ``root`` if given, label, classname) of each item, in order."""
    return [(os.path.relpath(d.impath, root) if root else d.impath, d.label, d.classname) for d in items]


def one_line_error(excinfo, *needles):
    """The error is a DatasetError (a UserError/ValueError) on one line naming every needle."""
    err = excinfo.value
    assert isinstance(err, DatasetError) and isinstance(err, UserError) and isinstance(err, ValueError)
    msg = str(err)
    assert "\n" not in msg and "Fix:" in msg
    assert str(pickle.loads(pickle.dumps(err))) == msg  # crosses DataLoader worker processes
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# ----------------------------------------------------------------------------- registry, configs


def dataset_config(stem):
    cfg = extend_cfg(get_cfg_default())
    cfg.merge_from_file(str(REPO / "configs/datasets" / f"{stem}.yaml"))
    return cfg


def test_every_catalogued_dataset_is_registered_with_its_config():
    names = set(DATASET_REGISTRY.registered_names())
    assert set(CATALOG) <= names
    for info in dataset_catalog.DATASETS:
        assert info.name in names and dataset_config(info.stem).DATASET.NAME == info.name
        if info.suite == dataset_catalog.PAPER:
            assert get_spec(info.stem) is CATALOG[info.name] and CATALOG[info.name].stem == info.stem
        else:
            assert DATASET_REGISTRY.get(info.name).spec.stem == info.stem
    assert [d.name for d in dataset_catalog.suite_datasets(dataset_catalog.PAPER)] == list(CATALOG)


def test_one_config_file_per_dataset_and_renamed_stems_still_resolve():
    files = sorted(p.stem for p in (REPO / "configs/datasets").glob("*.yaml"))
    assert files == sorted(d.stem for d in dataset_catalog.DATASETS)
    assert dataset_catalog.renamed_stem("imagenetv2") == "imagenet_v2"
    assert not (REPO / "configs/datasets/imagenetv2.yaml").exists()
    assert dataset_catalog.renamed_stem("imagenet_v2") is None
    assert get_spec("imagenetv2").name == get_spec("imagenet_v2").name == "ImageNetV2"


def test_catalogue_names_every_spelling_once_and_its_roles_are_the_protocols():
    spellings = [key for d in dataset_catalog.DATASETS for key in d.spellings]
    assert len(spellings) == len(set(spellings))  # a folder or log name means one dataset
    for info in dataset_catalog.DATASETS:
        assert info.suite in dataset_catalog.SUITES and set(info.roles) <= set(dataset_catalog.ROLES), info.name
    for protocol in PROTOCOLS.values():
        assert {protocol.target_role, protocol.source_role} - {""} <= set(dataset_catalog.ROLES)
        for suite in dataset_catalog.SUITES:
            assert len(dataset_catalog.with_role(protocol.source_role, suite)) == bool(protocol.source_role)
            assert protocol.defaults(suite).targets


def test_templates_come_from_the_catalogue():
    assert CUSTOM_TEMPLATES == {d.name: d.template for d in dataset_catalog.DATASETS}
    assert template_for("DescribableTextures") == "{} texture."  # CoOp's CUSTOM_TEMPLATES
    assert template_for("FashionMNIST") == "a photo of a {}, a type of clothing."
    assert template_for("NotADataset") == DEFAULT_TEMPLATE == "a photo of a {}."


# ----------------------------------------------------------------------------- CoOp split files


@pytest.mark.parametrize("name", sorted(L.SPLIT_CASES))
def test_reads_coop_split_file(tmp_path, name):
    split = L.make_split_dataset(tmp_path, name)
    ds = load(tmp_path, name)
    case = L.SPLIT_CASES[name]
    assert ds.classnames == [c for _, c in case["classes"]]
    n = len(case["classes"])
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (5 * n, 2 * n, 3 * n)
    prefix = tmp_path / case["prefix"]
    for key, items in (("train", ds.train_x), ("val", ds.val), ("test", ds.test)):
        assert triples(items, prefix) == [tuple(e) for e in split[key]]
        assert all(os.path.isfile(d.impath) for d in items)


@pytest.mark.parametrize("name", sorted(L.RAW_BUILDERS))
def test_builds_split_from_raw_files_when_split_file_absent(tmp_path, name, capsys):
    classnames, counts = L.RAW_BUILDERS[name](tmp_path)
    random.seed(0)
    ds = load(tmp_path, name)
    assert ds.classnames == classnames  # CoOp's class-name fixes
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == counts
    assert "WARNING" in capsys.readouterr().out  # says the split is not CoOp's

    spec = CATALOG[name]
    split_path = tmp_path / spec.folder / spec.split_file
    split = json.loads(split_path.read_text())
    assert split_problems(split, len(classnames)) == []
    rels = [rel for key in ("train", "val", "test") for rel, _, _ in split[key]]
    assert not any(os.path.isabs(r) or str(tmp_path) in r for r in rels)
    prefix = tmp_path / spec.folder / spec.image_dir
    assert all((prefix / r).is_file() for r in rels)

    again = load(tmp_path, name)  # now read from the saved split file
    assert "Reading split from" in capsys.readouterr().out
    for a, b in ((ds.train_x, again.train_x), (ds.val, again.val), (ds.test, again.test)):
        assert triples(a) == triples(b)


def test_stanford_cars_split_paths_are_relative_to_the_dataset_folder(tmp_path):
    L.raw_stanford_cars(tmp_path)
    load(tmp_path, "StanfordCars")
    split = json.loads((tmp_path / "stanford_cars/split_zhou_StanfordCars.json").read_text())
    assert {rel.split("/")[0] for rel, _, _ in split["train"] + split["val"]} == {"cars_train"}
    assert {rel.split("/")[0] for rel, _, _ in split["test"]} == {"cars_test"}


def test_fgvc_aircraft_reads_official_split_files(tmp_path):
    variants = L.make_aircraft(tmp_path)
    ds = load(tmp_path, "FGVCAircraft")
    assert ds.classnames == variants  # file order, names with spaces kept
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (6, 6, 6)
    assert {d.classname for d in ds.test if d.label == 2} == {"Cessna 172"}
    assert not (tmp_path / "fgvc_aircraft" / "split_zhou_FGVCAircraft.json").exists()


def test_fgvc_aircraft_unknown_variant_is_one_error_for_loader_and_checker(tmp_path):
    L.make_aircraft(tmp_path)
    L.write_lines(["1000001 707-320", "1000002 Boeing 999"], tmp_path / "fgvc_aircraft/images_variant_val.txt")
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "FGVCAircraft")
    one_line_error(e, "'Boeing 999' of images_variant_val.txt is not in variants.txt")
    checked = check_dataset(CATALOG["FGVCAircraft"], tmp_path)
    assert checked.status == "malformed" and "'Boeing 999' of images_variant_val.txt" in checked.details


# ----------------------------------------------------------------------------- ImageNet family


def test_imagenet_labels_names_val_as_test_and_relative_cache(tmp_path, capsys):
    chosen = L.make_imagenet(tmp_path)
    ds = load(tmp_path, "ImageNet")
    assert ds.classnames == [name for _, name in chosen]
    assert (len(ds.train_x), len(ds.test)) == (12, 6)
    assert triples(ds.val) == triples(ds.test)  # val is the test set (CoOp)
    for d in ds.test:
        assert d.impath.split(os.sep)[-2] == chosen[d.label][0]  # wnid folder -> label
    pkl = tmp_path / "imagenet/preprocessed.selftpt.pkl"
    assert pkl.is_file() and str(tmp_path).encode() not in pkl.read_bytes()
    assert not (tmp_path / "imagenet/preprocessed.pkl").exists()  # CoOp's name, CoOp's format only

    moved = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.move(str(tmp_path), moved)
    try:
        capsys.readouterr()
        ds2 = load(moved, "ImageNet", shots=2)
        assert "rebuilding" not in capsys.readouterr().out
        assert len(ds2.train_x) == 6 and len(ds2.val) == len(ds2.test) == 6  # val stays whole
        assert all(d.impath.startswith(str(moved)) for d in ds2.train_x)
    finally:
        shutil.move(str(moved), tmp_path)


WNID_VARIANTS = [
    ("ImageNetA", "imagenet-adversarial", "imagenet-a"),
    ("ImageNetR", "imagenet-rendition", "imagenet-r"),
    ("ImageNetSketch", "imagenet-sketch", "images"),
]


@pytest.mark.parametrize("name, folder, image_dir", WNID_VARIANTS)
def test_wnid_variants_map_folders_to_imagenet_names(tmp_path, name, folder, image_dir):
    n = CATALOG[name].num_classes  # the loaders require every class folder (200, or 1000)
    indices = L.variant_indices(n)
    chosen = L.make_wnid_variant(tmp_path, folder, image_dir, indices=indices, per_class=1)
    (tmp_path / folder / image_dir / chosen[1][0] / "1.png").write_bytes(L.JPEG)  # a class of 2
    ds = load(tmp_path, name)
    # label = position among the sorted wnid folders, class name = ImageNet's name of the wnid
    pairs = L.imagenet_classnames()
    assert ds.classnames == [pairs[i][1] for i in indices]
    assert ds.classnames[indices.index(3)] == "class 3" and ds.classnames[indices.index(400)] == "name400"
    assert ds.classnames[indices.index(998)] == "name998"
    assert ds.num_classes == n and len(ds.test) == n + 1
    for d in ds.test:
        assert d.impath.split(os.sep)[-2] == chosen[d.label][0]
    assert not any(d.impath.endswith("README.txt") for d in ds.test)


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    return root, L.make_imagenetv2(root)


def test_imagenetv2_folders_read_in_numeric_order(v2_root):
    root, pairs = v2_root
    ds = load(root, "ImageNetV2")
    assert ds.num_classes == 1000 and ds.classnames == [name for _, name in pairs]
    assert len(ds.test) == 1002
    for d in ds.test:  # file "k_i.jpeg" sits in folder "k": its label must be k, not its string rank
        k = int(os.path.basename(d.impath).split("_")[0])
        assert d.label == k and d.classname == pairs[k][1]


# ----------------------------------------------------------------------------- few-shot


def _expected_fewshot(ds_full, shots, seed):
    sampler = object.__new__(DatasetBase)
    random.seed(seed)
    train = sampler.generate_fewshot_dataset(list(ds_full.train_x), num_shots=shots)
    val = sampler.generate_fewshot_dataset(list(ds_full.val), num_shots=min(shots, 4))
    return triples(train), triples(val)


def _cache(root, shots, seed, folder="dtd"):
    """The project's few-shot cache (its own name: CoOp's is for CoOp's format)."""
    return Path(root) / folder / "split_fewshot" / f"shot_{shots}-seed_{seed}.selftpt.pkl"


def _coop_cache(root, shots, seed, folder="dtd"):
    """CoOp's few-shot cache: a pickle of {"train": [Datum], "val": [Datum]}."""
    return Path(root) / folder / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"


@pytest.mark.parametrize("shots, counts", [(1, (5, 5)), (4, (20, 20)), (8, (40, 20)), (16, (50, 20))])
def test_fewshot_counts_and_dassl_sampling(tmp_path, shots, counts):
    # 5 classes of 10 train, 6 val, 3 test: val gets min(K, 4) per class; a short class keeps all
    L.make_split_dataset(tmp_path, "DescribableTextures", counts={"train": 10, "val": 6, "test": 3})
    full = load(tmp_path, "DescribableTextures")
    random.seed(123)
    state = random.getstate()
    ds = load(tmp_path, "DescribableTextures", shots=shots, seed=2)
    assert random.getstate() == state  # drawing does not disturb the run's random stream
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (*counts, 15)
    assert ds.classnames == full.classnames
    assert (triples(ds.train_x), triples(ds.val)) == _expected_fewshot(full, shots, seed=2)
    other = load(tmp_path, "DescribableTextures", shots=shots, seed=3)
    if shots in (4, 8):
        assert triples(other.train_x) != triples(ds.train_x)  # another seed, another subset


def test_fewshot_cache_is_relative_and_survives_moving_data(tmp_path, capsys):
    root = tmp_path / "data"
    L.make_split_dataset(root, "DescribableTextures")
    first = load(root, "DescribableTextures", shots=2, seed=1)
    cache = _cache(root, 2, 1)
    assert cache.is_file() and str(root).encode() not in cache.read_bytes()
    content = pickle.loads(cache.read_bytes())
    assert all(not os.path.isabs(rel) and rel.startswith("images/") for rel, _, _ in content["train"])

    moved = tmp_path / "elsewhere"
    shutil.move(str(root), moved)
    capsys.readouterr()
    random.seed(999)  # a different random state: only a cache hit can give the same subset
    second = load(moved, "DescribableTextures", shots=2, seed=1)
    out = capsys.readouterr().out
    assert "Loading preprocessed few-shot data" in out and "rebuilding" not in out
    assert triples(second.train_x, moved) == triples(first.train_x, root)
    assert all(os.path.isfile(d.impath) for d in second.train_x)


def _corrupt(cache: Path, kind: str) -> None:
    data = pickle.loads(cache.read_bytes())
    if kind == "garbage":
        cache.write_bytes(b"\x00not a pickle")
        return
    if kind == "truncated":
        cache.write_bytes(cache.read_bytes()[:40])
        return
    if kind == "missing_keys":
        del data["val"]
    elif kind == "wrong_class_count":
        data["train"] = [e for e in data["train"] if e[1] != 0]
    elif kind == "missing_image":
        data["train"][0][0] = "images/banded/gone.jpg"
    elif kind == "wrong_classname":
        data["train"][0][2] = "not a texture"
    cache.write_bytes(pickle.dumps(data))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing_keys", "wrong_class_count",
                                  "missing_image", "wrong_classname"])
def test_corrupt_or_stale_fewshot_cache_is_rebuilt(tmp_path, capsys, kind):
    L.make_split_dataset(tmp_path, "DescribableTextures")
    good = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    cache = _cache(tmp_path, 2, 1)
    _corrupt(cache, kind)
    capsys.readouterr()
    again = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    out = capsys.readouterr().out
    assert "rebuilding it" in out and str(cache) in out
    assert triples(again.train_x) == triples(good.train_x)  # same seed, same subset
    assert triples(again.val) == triples(good.val)
    load(tmp_path, "DescribableTextures", shots=2, seed=1)
    assert "rebuilding" not in capsys.readouterr().out  # the rewritten cache is valid


def test_reads_coop_legacy_cache_of_pickled_datums_from_an_old_root(tmp_path, monkeypatch, capsys):
    """CoOp's caches pickle Dassl ``Datum`` objects with absolute paths; they are read
    without dassl, even after ``$DATA`` moved, and their (non-fresh) subset is kept."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    full = load(tmp_path, "DescribableTextures")
    fake = types.ModuleType("dassl.data.datasets.base_dataset")

    class LegacyDatum:  # pickled under Dassl's module and class name
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    LegacyDatum.__name__ = LegacyDatum.__qualname__ = "Datum"
    LegacyDatum.__module__ = fake.__name__
    fake.Datum = LegacyDatum
    for mod in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    def legacy(items, n):  # the LAST n of each class: not what a fresh draw would give
        keep = [d for d in items if sum(e.label == d.label for e in items[items.index(d):]) <= n]
        old = "/old/mount/data/dtd/"
        return [LegacyDatum(old + os.path.relpath(d.impath, tmp_path / "dtd"), d.label, d.classname) for d in keep]

    cache = _coop_cache(tmp_path, 2, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps({"train": legacy(full.train_x, 2), "val": legacy(full.val, 2)}))
    monkeypatch.undo()  # unpickling must not need dassl
    capsys.readouterr()
    ds = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    assert "rebuilding" not in capsys.readouterr().out
    expected = [(os.path.relpath(d.impath, tmp_path), d.label, d.classname)
                for d in full.train_x if d.impath.endswith(("0003tr.jpg", "0004tr.jpg"))]
    assert triples(ds.train_x, tmp_path) == expected


# ----------------------------------------------------------------------------- stale few-shot caches


def _swap_train_and_test(root, classes=None):
    """Rebuild DTD's split file with the train and test images of ``classes`` (default: all)
    exchanged, as a re-made split would: the same images, other roles."""
    path = root / "dtd/split_zhou_DescribableTextures.json"
    split = json.loads(path.read_text())

    def swap(entry):
        return classes is None or entry[1] in classes

    train = [e for e in split["train"] if not swap(e)] + [e for e in split["test"] if swap(e)]
    test = [e for e in split["test"] if not swap(e)] + [e for e in split["train"] if swap(e)]
    L.write_json({"train": train, "val": split["val"], "test": test}, path)


def test_fewshot_cache_of_a_rebuilt_split_is_redrawn(tmp_path, capsys):
    """The cache is tied to the split it was drawn from: after the split file is rebuilt,
    cached training images may now be test images, so the subset is drawn again."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    old = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    _swap_train_and_test(tmp_path)
    full = load(tmp_path, "DescribableTextures")
    capsys.readouterr()
    ds = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    out = capsys.readouterr().out
    assert "drawn from another version of the split" in out and "rebuilding it" in out
    test_paths = {d.impath for d in ds.test}
    assert not test_paths & {d.impath for d in ds.train_x}  # no test image trained on
    assert test_paths >= {d.impath for d in old.train_x}  # (the old subset is all test now)
    assert (triples(ds.train_x), triples(ds.val)) == _expected_fewshot(full, 2, seed=1)
    load(tmp_path, "DescribableTextures", shots=2, seed=1)
    assert "rebuilding" not in capsys.readouterr().out  # the redrawn cache is kept


def test_fewshot_cache_survives_a_reformatted_split_file(tmp_path, capsys):
    """The fingerprint is of the lists, not the file's bytes: the same split re-saved with
    other whitespace (e.g. downloaded again) keeps the cache."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    first = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    path = tmp_path / "dtd/split_zhou_DescribableTextures.json"
    path.write_text(json.dumps(json.loads(path.read_text())))  # one line, no indentation
    capsys.readouterr()
    random.seed(999)
    again = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    out = capsys.readouterr().out
    assert "Loading preprocessed few-shot data" in out and "rebuilding" not in out
    assert triples(again.train_x) == triples(first.train_x)


def test_cache_files_never_run_code(tmp_path, capsys):
    """A cache in a shared $DATA is only data: a pickle naming any class but Datum is
    refused (and the subset rebuilt), never executed."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    good = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for cache in (_cache(tmp_path, 2, 1), _coop_cache(tmp_path, 2, 1)):
        cache.write_bytes(pickle.dumps({"train": [Payload()], "val": []}))
    capsys.readouterr()
    again = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    out = capsys.readouterr().out
    assert not marker.exists()
    assert "unreadable (UnpicklingError)" in out and "rebuilding it" in out
    assert triples(again.train_x) == triples(good.train_x)


# ----------------------------------------------------------------------------- caches shared with CoOp
# CoOp, CoCoOp, PromptSRC ... run on the same $DATA: CoOp's cache files hold pickled Dassl
# Datum objects (absolute paths) under fixed names, which those codebases load blindly.


def _coop_draw(full, shots, seed, with_val=True):
    """The subset CoOp draws (its train.py seeds, then the dataset calls Dassl's sampler)."""
    sampler = object.__new__(DatasetBase)
    random.seed(seed)
    train = sampler.generate_fewshot_dataset(list(full.train_x), num_shots=shots)
    val = sampler.generate_fewshot_dataset(list(full.val), num_shots=min(shots, 4)) if with_val else None
    return train, val


def coop_fewshot(root, folder, full, shots, seed, with_val=True):
    """CoOp's few-shot branch: load its cache if present (must not crash), else draw and
    write it, pickled Datums under its name (ImageNet: train only)."""
    path = _coop_cache(root, shots, seed, folder)
    keys = ("train", "val") if with_val else ("train",)
    if path.exists():
        data = L.coop_load(path, Datum, keys)
        return data["train"], data.get("val")
    train, val = _coop_draw(full, shots, seed, with_val)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(L.coop_pickle({"train": train, "val": val} if with_val else {"train": train}, Datum))
    return train, val


def coop_imagenet_listing(root, full):
    """CoOp's ImageNet: read preprocessed.pkl if present (must not crash), else list the
    files and pickle the Datums there."""
    path = Path(root) / "imagenet/preprocessed.pkl"
    if path.exists():
        data = L.coop_load(path, Datum, ("train", "test"))
        return data["train"], data["test"]
    path.write_bytes(L.coop_pickle({"train": list(full.train_x), "test": list(full.test)}, Datum))
    return list(full.train_x), list(full.test)


def test_coop_runs_after_the_project_on_the_same_data(tmp_path, capsys):
    """(b) After the project ran few-shot DTD and ImageNet on $DATA, CoOp's code reads (or
    writes) its own files without crashing; the project then reads CoOp's files and gets
    the subsets CoOp uses, which are the ones the project drew."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    L.make_imagenet(tmp_path)
    ours = {name: load(tmp_path, name, shots=2, seed=1) for name in ("DescribableTextures", "ImageNet")}
    full = {name: load(tmp_path, name) for name in ("DescribableTextures", "ImageNet")}

    coop_imagenet_listing(tmp_path, full["ImageNet"])  # CoOp's ImageNet, then its few-shot draws
    coop = {"DescribableTextures": coop_fewshot(tmp_path, "dtd", full["DescribableTextures"], 2, 1),
            "ImageNet": coop_fewshot(tmp_path, "imagenet", full["ImageNet"], 2, 1, with_val=False)}
    for name, (coop_train, _) in coop.items():  # same seed, same split: CoOp draws what the project drew
        assert triples(coop_train) == triples(ours[name].train_x)
    # a second CoOp run reads every file under CoOp's names
    coop_imagenet_listing(tmp_path, full["ImageNet"])
    coop_fewshot(tmp_path, "dtd", full["DescribableTextures"], 2, 1)
    coop_fewshot(tmp_path, "imagenet", full["ImageNet"], 2, 1, with_val=False)

    capsys.readouterr()
    again = {name: load(tmp_path, name, shots=2, seed=1) for name in ours}
    out = capsys.readouterr().out
    assert out.count("Loading CoOp's few-shot data") == 2 and "Loading CoOp's file listing" in out
    assert "rebuilding" not in out and "not using" not in out
    for name, ds in ours.items():
        assert triples(again[name].train_x) == triples(ds.train_x)
        assert triples(again[name].test) == triples(ds.test)


def test_coop_cache_written_before_the_project_is_used_as_is(tmp_path, capsys):
    """(a) A few-shot cache and an ImageNet listing that CoOp wrote (pickled Dassl Datums,
    absolute paths) are read without dassl and give exactly CoOp's subset; CoOp's files
    are left byte for byte."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    full = load(tmp_path, "DescribableTextures")
    last_two = [d for d in full.train_x if d.impath.endswith(("0003tr.jpg", "0004tr.jpg"))]  # not a fresh draw
    val = [d for d in full.val if d.impath.endswith("0000va.jpg")]
    cache = _coop_cache(tmp_path, 2, 1)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(L.coop_pickle({"train": last_two, "val": val}, Datum))
    assert L.DASSL_DATUM_MODULE.encode() in cache.read_bytes()  # Dassl's class path, as CoOp writes
    assert USING_DASSL or "dassl" not in sys.modules  # read below without dassl (engine backend)
    before = cache.read_bytes()

    L.make_imagenet(tmp_path)
    full_in = load(tmp_path, "ImageNet")
    (tmp_path / "imagenet/preprocessed.selftpt.pkl").unlink(missing_ok=True)  # only CoOp's listing
    listing = tmp_path / "imagenet/preprocessed.pkl"
    listing.unlink(missing_ok=True)
    coop_imagenet_listing(tmp_path, full_in)  # CoOp writes its listing

    capsys.readouterr()
    ds = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    imagenet = load(tmp_path, "ImageNet")
    out = capsys.readouterr().out
    assert f"Loading CoOp's few-shot data from {cache}" in out and f"Loading CoOp's file listing from {listing}" in out
    assert (triples(ds.train_x), triples(ds.val)) == (triples(last_two), triples(val))
    assert triples(imagenet.train_x) == triples(full_in.train_x) and triples(imagenet.test) == triples(full_in.test)
    assert cache.read_bytes() == before
    assert not _cache(tmp_path, 2, 1).exists()  # CoOp's subset is not copied into a second file
    L.coop_load(cache, Datum, ("train", "val"))
    L.coop_load(listing, Datum, ("train", "test"))


def test_stale_coop_cache_is_left_alone_and_not_used(tmp_path, capsys):
    """CoOp's cache drawn from an older split (its images now test images) is not used:
    the project draws from the current split, says why, and leaves CoOp's file as it is."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    full = load(tmp_path, "DescribableTextures")
    coop_fewshot(tmp_path, "dtd", full, 2, 1)
    cache = _coop_cache(tmp_path, 2, 1)
    before = cache.read_bytes()
    _swap_train_and_test(tmp_path, classes={0, 1})
    capsys.readouterr()
    ds = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    out = capsys.readouterr().out
    assert f"not using CoOp's few-shot data {cache}" in out and "is not in the split's train list" in out
    assert cache.read_bytes() == before
    assert not {d.impath for d in ds.test} & {d.impath for d in ds.train_x}
    assert (triples(ds.train_x), triples(ds.val)) == _expected_fewshot(load(tmp_path, "DescribableTextures"), 2, 1)


def _old_project_file(path, entries, **meta):
    """A cache as earlier versions of the project wrote it: its own format (entry lists,
    relative paths) under CoOp's file name."""
    data = {"format": "selftpt-cache-v1", **meta}
    data.update({k: [list(e) for e in v] for k, v in entries.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))


def test_files_of_earlier_versions_under_coops_names_are_moved_out_of_its_way(tmp_path, capsys):
    """Earlier versions wrote their own format under CoOp's names, and CoOp crashed on it
    ('list' object has no attribute 'label'). The project moves such a file to its own name
    (keeping the subset earlier runs used) and CoOp's reading code works again."""
    L.make_split_dataset(tmp_path, "DescribableTextures")
    full = load(tmp_path, "DescribableTextures")
    last_two = [d for d in full.train_x if d.impath.endswith(("0003tr.jpg", "0004tr.jpg"))]
    dtd = tmp_path / "dtd"
    old_fewshot = _coop_cache(tmp_path, 2, 1)
    _old_project_file(old_fewshot, {"train": triples(last_two, dtd), "val": triples(full.val[:5], dtd)},
                      dataset="DescribableTextures", num_shots=2, seed=1, num_classes=5)
    L.make_imagenet(tmp_path)
    full_in = load(tmp_path, "ImageNet")
    (tmp_path / "imagenet/preprocessed.selftpt.pkl").unlink(missing_ok=True)  # only CoOp's listing
    old_listing = tmp_path / "imagenet/preprocessed.pkl"
    imagenet_dir = tmp_path / "imagenet"
    _old_project_file(old_listing, {"train": triples(full_in.train_x, imagenet_dir),
                                    "test": triples(full_in.test, imagenet_dir)}, dataset="ImageNet")
    with pytest.raises(AttributeError, match="'list' object has no attribute 'label'"):
        L.coop_load(old_fewshot, Datum, ("train", "val"))  # what CoOp does with such a file

    capsys.readouterr()
    ds = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    imagenet = load(tmp_path, "ImageNet")
    out = capsys.readouterr().out
    assert f"removed {old_fewshot}" in out and f"removed {old_listing}" in out
    assert not old_fewshot.exists() and not old_listing.exists()
    assert _cache(tmp_path, 2, 1).is_file() and (imagenet_dir / "preprocessed.selftpt.pkl").is_file()
    assert triples(ds.train_x) == triples(last_two)  # the subset earlier runs used is kept
    assert triples(imagenet.train_x) == triples(full_in.train_x)

    # CoOp now finds no file of its own and writes one; both sides keep working
    coop_fewshot(tmp_path, "dtd", full, 2, 1)
    coop_fewshot(tmp_path, "dtd", full, 2, 1)
    coop_imagenet_listing(tmp_path, full_in)
    coop_imagenet_listing(tmp_path, full_in)
    load(tmp_path, "DescribableTextures", shots=2, seed=1)
    load(tmp_path, "ImageNet")


# ----------------------------------------------------------------------------- base / new


def test_subsample_classes_cuts_sorted_labels_at_ceil_half_and_relabels(tmp_path):
    paths = [str(L.image(tmp_path / f"{y}.jpg")) for y in (9, 0, 5, 2, 7)]
    items = [Datum(impath=p, label=y, classname=f"c{y}") for p, y in zip(paths, (9, 0, 5, 2, 7))]
    base, = subsample_classes(items, subsample="base")
    new, = subsample_classes(items, subsample="new")
    assert sorted((d.label, d.classname) for d in base) == [(0, "c0"), (1, "c2"), (2, "c5")]
    assert sorted((d.label, d.classname) for d in new) == [(0, "c7"), (1, "c9")]
    assert subsample_classes(items, subsample="all") == (items,)
    with pytest.raises(ValueError):
        subsample_classes(items, subsample="half")


def test_base_and_new_halves_share_the_fewshot_cache(tmp_path):
    L.make_split_dataset(tmp_path, "DescribableTextures")  # 5 classes -> 3 base, 2 new
    full = load(tmp_path, "DescribableTextures", shots=2, seed=1)
    base = load(tmp_path, "DescribableTextures", shots=2, seed=1, subsample="base")
    new = load(tmp_path, "DescribableTextures", shots=2, seed=1, subsample="new")
    assert base.classnames == ["banded", "blotchy", "braided"]
    assert new.classnames == ["bubbly", "bumpy"]
    assert {d.label for d in new.test} == {0, 1} and len(new.test) == 6 and len(base.test) == 9
    old_label = {d.impath: d.label for d in full.train_x}
    assert all(old_label[d.impath] == d.label + 3 for d in new.train_x)  # relabelled from 0
    assert {d.impath for d in base.train_x} | {d.impath for d in new.train_x} == set(old_label)
    assert len(list((tmp_path / "dtd/split_fewshot").iterdir())) == 1


# ----------------------------------------------------------------------------- bad inputs


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "OxfordPets")
    one_line_error(e, "OxfordPets", tmp_path / "oxford_pets", "DATASETS.md#oxfordpets", "--root")
    assert not (tmp_path / "oxford_pets").exists()  # nothing created for a missing dataset


def test_empty_root_is_an_error_not_the_working_directory():
    with pytest.raises(DatasetError) as e:
        load("", "EuroSAT")
    one_line_error(e, "EuroSAT", "--root")


def test_missing_image_folder(tmp_path):
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "EuroSAT")
    one_line_error(e, "EuroSAT", tmp_path / "eurosat" / "2750", "EuroSAT.zip")


def test_missing_split_file_names_file_folder_and_download_command(tmp_path):
    L.image(tmp_path / "oxford_pets/images/Abyssinian_1.jpg")
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "OxfordPets")
    one_line_error(e, "OxfordPets", "split_zhou_OxfordPets.json", tmp_path / "oxford_pets",
                   f"python prepare_data.py download --root {tmp_path} --datasets OxfordPets",
                   "https://drive.google.com/uc?id=1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs")


def test_image_listed_in_split_but_absent(tmp_path):
    L.make_split_dataset(tmp_path, "Food101")
    gone = tmp_path / "food-101/images/baklava/10201te.jpg"
    gone.unlink()
    (tmp_path / "food-101/images/baklava/10200te.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "Food101")
    msg = one_line_error(e, "Food101", "split_zhou_Food101.json", "and 1 more", "food-101.tar.gz")
    assert "baklava/1020" in msg


def test_class_without_training_image_after_fewshot(tmp_path):
    split = L.make_split_dataset(tmp_path, "DescribableTextures")
    split["train"] = [e for e in split["train"] if e[1] != 2]  # 'braided' only in val/test
    L.write_json(split, tmp_path / "dtd/split_zhou_DescribableTextures.json")
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "DescribableTextures", shots=4)
    one_line_error(e, "DescribableTextures", "class 2 ('braided')", "after 4-shot sampling",
                   "split_zhou_DescribableTextures.json", "prepare_data.py download")


def test_unreadable_split_file(tmp_path):
    L.make_split_dataset(tmp_path, "EuroSAT")
    path = tmp_path / "eurosat/split_zhou_EuroSAT.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "EuroSAT")
    one_line_error(e, "EuroSAT", "unreadable", path, "prepare_data.py download")


def test_imagenet_variant_folder_not_in_classnames(tmp_path):
    L.make_wnid_variant(tmp_path, "imagenet-adversarial", "imagenet-a", indices=(1, 2))
    L.image(tmp_path / "imagenet-adversarial/imagenet-a/n99999999/x.jpg")
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "ImageNetA")
    one_line_error(e, "ImageNetA", "n99999999", "classnames.txt")


def test_imagenet_classnames_with_wrong_class_count(tmp_path):
    L.make_wnid_variant(tmp_path, "imagenet-rendition", "imagenet-r", indices=(1, 2))
    L.write_classnames(tmp_path / "imagenet-rendition/classnames.txt", L.imagenet_classnames()[:200])
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "ImageNetR")
    one_line_error(e, "ImageNetR", "lists 200 classes", "prepare_data.py download")


def test_imagenetv2_missing_label_folder(tmp_path):
    d = tmp_path / "imagenetv2"
    L.write_classnames(d / "classnames.txt")
    for k in range(999):  # folder "999" absent
        (d / "imagenetv2-matched-frequency-format-val" / str(k)).mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "ImageNetV2")
    one_line_error(e, "ImageNetV2", os.path.join("imagenetv2-matched-frequency-format-val", "999"))


def _empty_folder(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


@pytest.mark.parametrize("name", ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"])
def test_imagenet_variant_with_an_empty_class_folder_is_refused(tmp_path, name):
    """An empty class folder made Dassl (which names classes from the labels present) drop
    the class and shift every later class name: label 500's prompt got class 501's name."""
    spec = CATALOG[name]
    if name == "ImageNetV2":
        L.make_imagenetv2(tmp_path)
        label, folder = 500, tmp_path / spec.folder / spec.image_dir / "500"
    else:
        indices = L.variant_indices(spec.num_classes)
        chosen = L.make_wnid_variant(tmp_path, spec.folder, spec.image_dir, indices=indices, per_class=1)
        label = spec.num_classes // 2
        folder = tmp_path / spec.folder / spec.image_dir / chosen[label][0]
    _empty_folder(folder)
    with pytest.raises(DatasetError) as e:
        load(tmp_path, name)
    one_line_error(e, name, folder, f"class {label} (", "folder is empty", spec.source.split()[0])


@pytest.mark.parametrize("name", ["ImageNetSketch", "ImageNetA", "ImageNetR"])
def test_imagenet_variant_with_a_missing_class_folder_is_refused(tmp_path, name):
    """ImageNet-A/-R (200 of ImageNet's classes, listed from disk) ran on 199 classes
    without a word when a class folder was missing; Sketch on 999."""
    spec = CATALOG[name]
    indices = L.variant_indices(spec.num_classes)
    del indices[17]
    L.make_wnid_variant(tmp_path, spec.folder, spec.image_dir, indices=indices, per_class=1)
    with pytest.raises(DatasetError) as e:
        load(tmp_path, name)
    one_line_error(e, name, tmp_path / spec.folder / spec.image_dir,
                   f"{spec.num_classes - 1} class folders found, {name} has {spec.num_classes}", spec.source.split()[0])


def test_imagenet_with_an_empty_class_folder_is_refused(tmp_path):
    L.make_imagenet(tmp_path)
    folder = tmp_path / "imagenet/images/val" / L.imagenet_classnames()[5][0]
    _empty_folder(folder)
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "ImageNet")
    one_line_error(e, "ImageNet", folder, "class 1 ('class 5')", "folder is empty")


# ----------------------------------------------------------------------------- checker


def _eurosat_ready(root):
    classes = [(k, v) for k, v in __import__("datasets.eurosat", fromlist=["x"]).NEW_CNAMES.items()]
    return L.make_split_dataset(root, "EuroSAT", counts={"train": 1, "val": 1, "test": 1}, classes=classes)


def test_checker_verdicts(tmp_path, v2_root):
    _eurosat_ready(tmp_path)
    L.make_aircraft(tmp_path, variants=[f"variant {i}" for i in range(100)], per_split=1)
    assert check_dataset(CATALOG["EuroSAT"], tmp_path).status == "ready"
    assert check_dataset(CATALOG["FGVCAircraft"], tmp_path).status == "ready"
    assert check_dataset(CATALOG["ImageNetV2"], v2_root[0]).status == "ready"

    missing = check_dataset(CATALOG["Food101"], tmp_path)
    assert missing.status == "missing" and "dataset folder food-101/" in missing.details

    L.make_wnid_variant(tmp_path, "imagenet-adversarial", "imagenet-a", indices=(1, 2, 3))
    partial = check_dataset(CATALOG["ImageNetA"], tmp_path)
    assert partial.status == "missing" and "197 of 200 class folders" in partial.details

    (tmp_path / "eurosat/2750/Forest/Forest_0te.jpg").unlink()
    gone = check_dataset(CATALOG["EuroSAT"], tmp_path)
    assert gone.status == "missing" and "1 of 30 images listed in split_zhou_EuroSAT.json" in gone.details

    L.make_split_dataset(tmp_path, "DescribableTextures")  # 5 classes, DTD has 47
    wrong = check_dataset(CATALOG["DescribableTextures"], tmp_path)
    assert wrong.status == "malformed" and "5 classes, expected 47" in wrong.details

    (tmp_path / "dtd/split_zhou_DescribableTextures.json").write_text("{not json")
    assert check_dataset(CATALOG["DescribableTextures"], tmp_path).status == "malformed"

    (tmp_path / "dtd/split_zhou_DescribableTextures.json").unlink()
    no_split = check_dataset(CATALOG["DescribableTextures"], tmp_path)
    assert no_split.status == "missing" and "split_zhou_DescribableTextures.json" in no_split.details


def test_checker_flags_corrupt_image_and_bad_classnames(tmp_path):
    _eurosat_ready(tmp_path)
    (tmp_path / "eurosat/2750/River/River_0tr.jpg").write_bytes(b"not an image")
    assert check_dataset(CATALOG["EuroSAT"], tmp_path).status == "ready"  # cheap check: files exist
    deep = check_dataset(CATALOG["EuroSAT"], tmp_path, verify_images=True)
    assert deep.status == "malformed" and "corrupt image" in deep.details and "River_0tr.jpg" in deep.details

    L.make_wnid_variant(tmp_path, "imagenet-sketch", "images", indices=(1,))
    L.write_lines(["n01440764 tench"] * 3, tmp_path / "imagenet-sketch/classnames.txt")
    bad = check_dataset(CATALOG["ImageNetSketch"], tmp_path)
    assert bad.status == "malformed" and "classnames.txt" in bad.details


def test_check_command_prints_a_table_and_exit_status(tmp_path, capsys):
    _eurosat_ready(tmp_path)
    assert prepare_data.main(["check", "--root", str(tmp_path), "--datasets", "eurosat"]) == 0
    out = capsys.readouterr().out
    assert "EuroSAT" in out and "ready" in out and "1/1 ready" in out
    assert prepare_data.main(["check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("missing") >= 14 and "1/15 ready" in out
    assert prepare_data.main(["check", "--root", str(tmp_path), "--datasets", "NoSuchSet"]) == 2


# ----------------------------------------------------------------------------- download


def _valid_split_for(spec):
    return {k: [[f"c{y}/{k}.jpg", y, f"c{y}"] for y in range(spec.num_classes)] for k in ("train", "val", "test")}


def _fake_drive(calls, offline=()):
    by_id = {r.drive_id: (spec, r) for spec in CATALOG.values() for r in spec.remote}

    def download(drive_id, output):
        calls.append(drive_id)
        spec, remote = by_id[drive_id]
        if spec.name in offline:
            raise ConnectionError("Failed to resolve 'drive.google.com'")
        if spec.name == "OxfordPets":  # Drive's quota page instead of the file
            Path(output).write_text("<html>Google Drive - Quota exceeded</html>")
        elif remote.kind == "split":
            Path(output).write_text(json.dumps(_valid_split_for(spec)))
        elif remote.kind == "cat_to_name":
            Path(output).write_text(json.dumps({str(i): f"flower {i}" for i in range(1, 103)}))
        else:
            Path(output).write_text("".join(f"{w} {c}\n" for w, c in L.imagenet_classnames()))

    return download


def test_download_verifies_installs_atomically_and_reports_failures(tmp_path):
    calls = []
    specs = [CATALOG[n] for n in ("EuroSAT", "OxfordPets", "DescribableTextures", "OxfordFlowers")]
    results = {(r.dataset, r.remote.filename): r
               for r in download_files(str(tmp_path), specs, _fake_drive(calls, offline={"DescribableTextures"}))}
    ok = results[("EuroSAT", "split_zhou_EuroSAT.json")]
    assert ok.status == "downloaded" and len(ok.sha256) == 64
    assert split_problems(json.loads((tmp_path / "eurosat/split_zhou_EuroSAT.json").read_text()), 10) == []
    assert results[("OxfordPets", "split_zhou_OxfordPets.json")].status == "invalid"
    assert not (tmp_path / "oxford_pets/split_zhou_OxfordPets.json").exists()
    failed = results[("DescribableTextures", "split_zhou_DescribableTextures.json")]
    assert failed.status == "failed" and "ConnectionError" in failed.detail
    assert results[("OxfordFlowers", "cat_to_name.json")].status == "downloaded"
    assert not list(tmp_path.rglob("*.part"))  # nothing half-written left behind

    calls.clear()
    again = download_files(str(tmp_path), [CATALOG["EuroSAT"]], _fake_drive(calls))
    assert again[0].status == "present" and calls == []


def test_download_fetches_classnames_once_for_the_imagenet_family(tmp_path):
    calls = []
    specs = [CATALOG[n] for n in ("ImageNet", "ImageNetA", "ImageNetR", "ImageNetV2", "ImageNetSketch")]
    results = download_files(str(tmp_path), specs, _fake_drive(calls))
    assert len(calls) == 1 and [r.status for r in results] == ["downloaded"] + ["copied"] * 4
    texts = {(tmp_path / s.folder / "classnames.txt").read_text() for s in specs}
    assert len(texts) == 1


def test_hashes_command_prints_lines_for_the_sha256_table(tmp_path, capsys):
    result, = download_files(str(tmp_path), [CATALOG["EuroSAT"]], _fake_drive([]))
    assert prepare_data.main(["hashes", "--root", str(tmp_path), "--datasets", "EuroSAT"]) == 0
    assert capsys.readouterr().out.strip() == f'"split_zhou_EuroSAT.json": "{result.sha256}",'


def test_download_checks_recorded_sha256(tmp_path, monkeypatch):
    monkeypatch.setitem(SHA256, "split_zhou_EuroSAT.json", "0" * 64)
    result, = download_files(str(tmp_path), [CATALOG["EuroSAT"]], _fake_drive([]))
    assert result.status == "invalid" and "SHA-256" in result.detail
    assert not (tmp_path / "eurosat/split_zhou_EuroSAT.json").exists()


def test_download_command_offline_says_what_to_fetch_and_where(tmp_path, monkeypatch, capsys):
    import datasets.prepare as prepare

    monkeypatch.setattr(prepare, "gdown_download", _fake_drive([], offline=set(CATALOG)))
    code = prepare_data.main(["download", "--root", str(tmp_path), "--datasets", "EuroSAT", "oxford_flowers"])
    out = capsys.readouterr().out
    assert code == 1 and "Traceback" not in out
    for spec_name in ("EuroSAT", "OxfordFlowers"):
        for remote in CATALOG[spec_name].remote:
            dst = tmp_path / CATALOG[spec_name].folder / remote.filename
            assert f"https://drive.google.com/uc?id={remote.drive_id}  ->  {dst}" in out
