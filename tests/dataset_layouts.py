"""Miniatures of the 15 datasets' real on-disk layouts (CoOp's), for tests/test_datasets.py.

Each builder writes tiny images plus the dataset's own index files in their real formats
(CoOp's split JSON, the raw txt lists, the ``.mat`` files via ``scipy.io.savemat``) under a
``$DATA``-like root, and returns what a correct loader must produce.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from scipy.io import savemat


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def image(path: Path) -> Path:
    """Write a 4x4 JPEG at ``path`` (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(JPEG)
    return path


def write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4))
    return path


def write_lines(lines, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# ----------------------------------------------------------------------------- CoOp split JSONs

# Per class: 5 train, 2 val, 3 test images listed in the split JSON.
SPLIT_COUNTS = {"train": 5, "val": 2, "test": 3}


def _split_case(folder: str, prefix: str, split_file: str, classes: list[tuple[str, str]],
                relpath: Callable[[str, int, str, int], str]) -> dict:
    return dict(folder=folder, prefix=prefix, split_file=split_file, classes=classes, relpath=relpath)


# registry name -> (dataset folder, folder the JSON paths start from, split file, classes as
# (raw folder/key, class name as in CoOp's JSON), relpath(split, label, key, i)), with
# relpaths shaped like the real JSONs' entries.
SPLIT_CASES = {
    "Caltech101": _split_case(
        "caltech-101", "caltech-101/101_ObjectCategories", "split_zhou_Caltech101.json",
        [("Faces", "face"), ("Leopards", "leopard"), ("accordion", "accordion")],
        lambda s, y, k, i: f"{k}/image_{y}{i:03d}{s[:2]}.jpg"),
    "OxfordPets": _split_case(
        "oxford_pets", "oxford_pets/images", "split_zhou_OxfordPets.json",
        [("Abyssinian", "abyssinian"), ("keeshond", "keeshond"), ("american_bulldog", "american_bulldog")],
        lambda s, y, k, i: f"{k}_{i}{s[:2]}.jpg"),
    "StanfordCars": _split_case(
        "stanford_cars", "stanford_cars", "split_zhou_StanfordCars.json",
        [("a", "2000 AM General Hummer SUV"), ("b", "2012 Tesla Model S Sedan"), ("c", "2012 Volvo C30 Hatchback")],
        lambda s, y, k, i: f"cars_{'test' if s == 'test' else 'train'}/{y:02d}{i:02d}{s[:2]}.jpg"),
    "OxfordFlowers": _split_case(
        "oxford_flowers", "oxford_flowers/jpg", "split_zhou_OxfordFlowers.json",
        [("1", "pink primrose"), ("2", "hard-leaved pocket orchid"), ("3", "canterbury bells")],
        lambda s, y, k, i: f"image_{y}{i:02d}{s[:2]}.jpg"),
    "Food101": _split_case(
        "food-101", "food-101/images", "split_zhou_Food101.json",
        [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava")],
        lambda s, y, k, i: f"{k}/10{y}{i:02d}{s[:2]}.jpg"),
    "SUN397": _split_case(
        "sun397", "sun397/SUN397", "split_zhou_SUN397.json",
        [("a/abbey", "abbey"), ("a/apartment_building/outdoor", "outdoor apartment_building"),
         ("b/bakery/shop", "shop bakery")],
        lambda s, y, k, i: f"{k}/sun_{i}{s[:2]}.jpg"),
    "DescribableTextures": _split_case(
        "dtd", "dtd/images", "split_zhou_DescribableTextures.json",
        [("banded", "banded"), ("blotchy", "blotchy"), ("braided", "braided"), ("bubbly", "bubbly"),
         ("bumpy", "bumpy")],
        lambda s, y, k, i: f"{k}/{k}_{i:04d}{s[:2]}.jpg"),
    "EuroSAT": _split_case(
        "eurosat", "eurosat/2750", "split_zhou_EuroSAT.json",
        [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("SeaLake", "Sea or Lake")],
        lambda s, y, k, i: f"{k}/{k}_{i}{s[:2]}.jpg"),
    "UCF101": _split_case(
        "ucf101", "ucf101/UCF-101-midframes", "split_zhou_UCF101.json",
        [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Basketball", "Basketball"), ("Yo_Yo", "Yo_Yo")],
        lambda s, y, k, i: f"{k}/v_{k.replace('_', '')}_g{i:02d}_c01{s[:2]}.jpg"),
}


def make_split_dataset(root: Path, name: str, counts: dict | None = None,
                       classes: list[tuple[str, str]] | None = None) -> dict:
    """Write the images and CoOp's split JSON of ``name``; return the JSON content."""
    case = SPLIT_CASES[name]
    counts = counts or SPLIT_COUNTS
    classes = classes or case["classes"]
    prefix = root / case["prefix"]
    split = {}
    for s in ("train", "val", "test"):
        split[s] = []
        for y, (key, cname) in enumerate(classes):
            for i in range(counts[s]):
                rel = case["relpath"](s, y, key, i)
                image(prefix / rel)
                split[s].append([rel, y, cname])
    write_json(split, root / case["folder"] / case["split_file"])
    return split


# ----------------------------------------------------------------------------- raw layouts
# Each returns (expected class names by label, expected (n_train, n_val, n_test)).


def _class_folders(base: Path, folders: list[str], n: int) -> None:
    for folder in folders:
        for i in range(n):
            image(base / folder / f"{folder.lower()}_{i:04d}.jpg")


def raw_caltech101(root: Path):
    # folders sort as BACKGROUND_Google, Faces, Faces_easy, Leopards, Motorbikes, accordion, airplanes
    _class_folders(root / "caltech-101/101_ObjectCategories",
                   ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes"], 10)
    return ["face", "leopard", "motorbike", "accordion", "airplane"], (25, 10, 15)


def raw_oxford_pets(root: Path):
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    d = root / "oxford_pets"
    trainval, test = [], []
    for cid, breed in enumerate(breeds, start=1):
        species = 1 if breed[0].isupper() else 2  # cats are capitalised in the real files
        for i in range(1, 8):
            image(d / "images" / f"{breed}_{i}.jpg")
            (trainval if i <= 5 else test).append(f"{breed}_{i} {cid} {species} {cid}")
    write_lines(trainval, d / "annotations/trainval.txt")
    write_lines(test, d / "annotations/test.txt")
    return ["abyssinian", "american_bulldog", "bengal"], (12, 3, 6)


def _mat_annotations(entries: list[tuple[str, int]]) -> np.ndarray:
    """A MATLAB struct array like the Cars devkit's ``annotations`` (1 x N, fields incl.
    ``fname`` and 1-based ``class``)."""
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    arr = np.zeros((1, len(entries)), dtype=dtype)
    for j, (fname, cls) in enumerate(entries):
        box = (np.array([[0]]), np.array([[0]]), np.array([[3]]), np.array([[3]]))
        arr[0, j] = (*box, np.array([[cls]]), np.array([fname]))
    return arr


def raw_stanford_cars(root: Path):
    d = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Tesla Model S Sedan 2012", "Volvo C30 Hatchback 2012"]
    meta = np.empty((1, len(names)), dtype=object)
    for j, n in enumerate(names):
        meta[0, j] = np.array([n])
    (d / "devkit").mkdir(parents=True)
    savemat(str(d / "devkit/cars_meta.mat"), {"class_names": meta})
    train, test = [], []
    for cls in range(1, 4):
        for i in range(5):
            train.append((f"{cls:02d}{i:03d}.jpg", cls))
            image(d / "cars_train" / train[-1][0])
        for i in range(2):
            test.append((f"{cls:02d}{i:03d}.jpg", cls))
            image(d / "cars_test" / test[-1][0])
    savemat(str(d / "devkit/cars_train_annos.mat"), {"annotations": _mat_annotations(train)})
    savemat(str(d / "cars_test_annos_withlabels.mat"), {"annotations": _mat_annotations(test)})
    return ["2000 AM General Hummer SUV", "2012 Tesla Model S Sedan", "2012 Volvo C30 Hatchback"], (12, 3, 6)


def raw_oxford_flowers(root: Path):
    d = root / "oxford_flowers"
    labels = [1 + (i % 3) for i in range(30)]  # interleaved, as in the real imagelabels.mat
    for i in range(30):
        image(d / "jpg" / f"image_{i + 1:05d}.jpg")
    savemat(str(d / "imagelabels.mat"), {"labels": np.array([labels], dtype=np.uint8)})
    names = {"1": "pink primrose", "2": "hard-leaved pocket orchid", "3": "canterbury bells"}
    write_json(names, d / "cat_to_name.json")
    return ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"], (15, 6, 9)


def raw_food101(root: Path):
    _class_folders(root / "food-101/images", ["apple_pie", "baby_back_ribs", "baklava"], 10)
    return ["apple_pie", "baby_back_ribs", "baklava"], (15, 6, 9)


def raw_sun397(root: Path):
    d = root / "sun397"
    cats = ["a/abbey", "a/apartment_building/outdoor", "b/bakery/shop"]
    write_lines([f"/{c}" for c in cats], d / "ClassName.txt")
    train, test = [], []
    for c in cats:
        for i in range(7):
            image(d / "SUN397" / c / f"sun_{i:04d}.jpg")
            (train if i < 5 else test).append(f"/{c}/sun_{i:04d}.jpg")
    write_lines(train, d / "Training_01.txt")
    write_lines(test, d / "Testing_01.txt")
    return ["abbey", "outdoor apartment_building", "shop bakery"], (12, 3, 6)


def raw_dtd(root: Path):
    _class_folders(root / "dtd/images", ["banded", "blotchy", "braided"], 10)
    return ["banded", "blotchy", "braided"], (15, 6, 9)


def raw_eurosat(root: Path):
    _class_folders(root / "eurosat/2750", ["AnnualCrop", "Forest", "HerbaceousVegetation", "SeaLake"], 10)
    return ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Sea or Lake"], (20, 8, 12)


def raw_ucf101(root: Path):
    d = root / "ucf101"
    actions = ["ApplyEyeMakeup", "Basketball", "YoYo"]
    write_lines([f"{i} {a}" for i, a in enumerate(actions, start=1)], d / "ucfTrainTestlist/classInd.txt")
    train, test = [], []
    for label, action in enumerate(actions, start=1):
        folder = {"ApplyEyeMakeup": "Apply_Eye_Makeup", "YoYo": "Yo_Yo"}.get(action, action)
        for g in range(1, 8):
            video = f"v_{action}_g{g:02d}_c01"
            image(d / "UCF-101-midframes" / folder / f"{video}.jpg")
            if g <= 5:
                train.append(f"{action}/{video}.avi {label}")
            else:
                test.append(f"{action}/{video}.avi")
    write_lines(train, d / "ucfTrainTestlist/trainlist01.txt")
    write_lines(test, d / "ucfTrainTestlist/testlist01.txt")
    return ["Apply_Eye_Makeup", "Basketball", "Yo_Yo"], (12, 3, 6)


RAW_BUILDERS = {
    "Caltech101": raw_caltech101,
    "OxfordPets": raw_oxford_pets,
    "StanfordCars": raw_stanford_cars,
    "OxfordFlowers": raw_oxford_flowers,
    "Food101": raw_food101,
    "SUN397": raw_sun397,
    "DescribableTextures": raw_dtd,
    "EuroSAT": raw_eurosat,
    "UCF101": raw_ucf101,
}


def make_aircraft(root: Path, variants: list[str] | None = None, per_split: int = 2) -> list[str]:
    """``fgvc_aircraft/`` as the archive's data/ folder: variants.txt, images_variant_*.txt."""
    d = root / "fgvc_aircraft"
    variants = variants or ["707-320", "A300B4", "Cessna 172"]
    write_lines(variants, d / "variants.txt")
    n = 0
    for s in ("train", "val", "test"):
        lines = []
        for v in variants:
            for _ in range(per_split):
                n += 1
                image(d / "images" / f"{1000000 + n}.jpg")
                lines.append(f"{1000000 + n} {v}")
        write_lines(lines, d / f"images_variant_{s}.txt")
    return variants


# ----------------------------------------------------------------------------- ImageNet family


def imagenet_classnames(n: int = 1000) -> list[tuple[str, str]]:
    """1000 ``(wnid, name)`` pairs sorted by wnid, some names with spaces (as CLIP's)."""
    pairs = [(f"n{1440764 + 37 * i:08d}", f"class {i}" if i % 2 else f"name{i}") for i in range(n)]
    pairs[0] = ("n01440764", "tench")
    return pairs


def write_classnames(path: Path, pairs=None) -> list[tuple[str, str]]:
    pairs = imagenet_classnames() if pairs is None else pairs
    write_lines([f"{w} {c}" for w, c in pairs], path)
    return pairs


def make_imagenet(root: Path, indices=(0, 5, 999), n_train: int = 4, n_val: int = 2) -> list[tuple[str, str]]:
    """``imagenet/images/{train,val}/<wnid>/`` for the classes at ``indices`` + classnames.txt."""
    d = root / "imagenet"
    pairs = write_classnames(d / "classnames.txt")
    for idx in indices:
        wnid = pairs[idx][0]
        for i in range(n_train):
            image(d / "images/train" / wnid / f"{wnid}_{i}.JPEG")
        for i in range(n_val):
            image(d / "images/val" / wnid / f"ILSVRC2012_val_{idx:05d}{i}.JPEG")
    return [pairs[i] for i in indices]


def variant_indices(num_classes: int, must: Sequence[int] = (3, 400, 998)) -> list[int]:
    """``num_classes`` sorted ImageNet class indices including ``must``: a complete
    ImageNet-A/-R (200) or ImageNet-Sketch (1000) miniature, as the loaders require."""
    if num_classes >= 1000:
        return list(range(1000))
    rest = [i for i in range(1000) if i not in must][:: 1000 // num_classes]
    return sorted(set(must) | set(rest[: num_classes - len(set(must))]))


def make_wnid_variant(root: Path, folder: str, image_dir: str, indices, readme: bool = True, per_class: int = 2):
    """ImageNet-Sketch/-A/-R: ``<folder>/<image_dir>/<wnid>/`` for ``indices`` + classnames.txt."""
    d = root / folder
    pairs = write_classnames(d / "classnames.txt")
    for idx in indices:
        for i in range(per_class):
            image(d / image_dir / pairs[idx][0] / f"{i}.png")
    if readme:
        write_lines(["ImageNet-A/R readme"], d / image_dir / "README.txt")
    return [pairs[i] for i in indices]


def make_imagenetv2(root: Path) -> list[tuple[str, str]]:
    """``imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/`` + classnames.txt.

    Folder ``k`` holds one image named ``k_<i>.jpeg`` (two in folders 10 and 100), so a
    test can tell from a file's name which folder, i.e. which label, it came from.
    """
    d = root / "imagenetv2"
    pairs = write_classnames(d / "classnames.txt")
    base = d / "imagenetv2-matched-frequency-format-val"
    for k in range(1000):
        for i in range(2 if k in (10, 100) else 1):
            image(base / str(k) / f"{k}_{i}.jpeg")
    return pairs


# ----------------------------------------------------------------------------- CoOp's cache files

DASSL_DATUM_MODULE = "dassl.data.datasets.base_dataset"  # where real Dassl defines Datum


@contextlib.contextmanager
def as_dassl_datum(datum_cls: type) -> Iterator[None]:
    """Within the block, ``datum_cls`` pickles as ``dassl.data.datasets.base_dataset.Datum``
    (what CoOp's caches name) and that name unpickles to ``datum_cls``: CoOp's environment.

    With the real-Dassl backend the toolbox's ``Datum`` already is that class and nothing
    changes; with the engine its ``Datum`` (same ``_impath``/``_label``/``_domain``/
    ``_classname`` state as Dassl's) is put under Dassl's name for the block's duration.
    """
    if datum_cls.__module__ == DASSL_DATUM_MODULE:
        yield
        return
    names = ("dassl", "dassl.data", "dassl.data.datasets", DASSL_DATUM_MODULE)
    saved = {name: sys.modules.get(name) for name in names}
    home = datum_cls.__module__
    try:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        sys.modules[DASSL_DATUM_MODULE].Datum = datum_cls
        datum_cls.__module__ = DASSL_DATUM_MODULE
        yield
    finally:
        datum_cls.__module__ = home
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def coop_pickle(obj: Any, datum_cls: type) -> bytes:
    """``obj`` pickled as CoOp writes its caches (``pickle.HIGHEST_PROTOCOL``, Datum objects
    under Dassl's class name)."""
    with as_dassl_datum(datum_cls):
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    assert DASSL_DATUM_MODULE.encode() in data or b"Datum" not in data
    return data


def coop_load(path: Path, datum_cls: type, keys: Sequence[str]) -> dict[str, list]:
    """What CoOp's dataset code does with one of its cache files: ``pickle.load`` it (Dassl
    importable) and use every item of ``keys`` as a ``Datum``. Raises as CoOp would (e.g.
    ``AttributeError: 'list' object has no attribute 'label'``)."""
    with as_dassl_datum(datum_cls), open(path, "rb") as f:
        data = pickle.load(f)
    for key in keys:
        for item in data[key]:
            item.label, item.impath, item.classname  # noqa: B018  (CoOp's accesses)
    return {key: data[key] for key in keys}
