"""Where each of CoOp's 15 datasets lives under ``$DATA`` and where its files come from.

Plain data (no torch import): the dataset classes, ``prepare_data.py`` (download / check)
and ``DATASETS.md`` all describe the same layouts, taken from CoOp's ``DATASETS.md``. Names,
config stems, templates and protocol roles are the library's (``selftpt.dataset_catalog``);
this file adds each dataset's layout, keyed by its registered name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from selftpt import dataset_catalog

__all__ = ["RemoteFile", "DatasetSpec", "CATALOG", "SHA256", "get_spec", "drive_url"]


def drive_url(drive_id: str) -> str:
    """Direct-download URL of a Google Drive file."""
    return f"https://drive.google.com/uc?id={drive_id}"


@dataclass(frozen=True)
class RemoteFile:
    """A small file the download command fetches into ``$DATA/<folder>/<filename>``.

    ``kind`` selects the format check: ``split`` (CoOp split JSON), ``cat_to_name``
    (Flowers' label -> name JSON) or ``classnames`` (ImageNet's ``classnames.txt``).
    """

    filename: str
    drive_id: str
    kind: str

    @property
    def url(self) -> str:
        return drive_url(self.drive_id)


@dataclass(frozen=True)
class DatasetSpec:
    """The on-disk layout of one dataset (CoOp's), relative to ``$DATA``.

    Attributes:
        name: registry name (``DATASET.NAME``).
        stem: config stem, ``configs/datasets/<stem>.yaml``.
        folder: the dataset folder under ``$DATA``.
        image_dir: folder (under ``folder``) that split paths are relative to; "" = ``folder``.
        num_classes: number of classes.
        data_dirs: image folders that must exist (relative to ``folder``).
        split_file: CoOp's fixed split file, "" if the dataset has none.
        raw_files: files a split is built from when ``split_file`` is absent (or, for
            datasets without a split file, always read).
        required_files: files needed whatever the split (e.g. ``classnames.txt``).
        remote: files the download command fetches.
        source: where to get the images, for messages.
        anchor: section of DATASETS.md.
        test_only: an evaluation-only set (ImageNet variants).
    """

    name: str
    stem: str
    folder: str
    image_dir: str
    num_classes: int
    data_dirs: tuple[str, ...]
    source: str
    anchor: str
    split_file: str = ""
    raw_files: tuple[str, ...] = ()
    required_files: tuple[str, ...] = ()
    remote: tuple[RemoteFile, ...] = field(default_factory=tuple)
    test_only: bool = False

    def setup_fix(self, root: str = "$DATA") -> str:
        """How to obtain the dataset's images, as one sentence."""
        return (f"get {self.source} and arrange it as {root}/{self.folder}/ (see DATASETS.md#{self.anchor}), "
                f"or point --root at the folder that holds '{self.folder}/'")

    def download_fix(self, root: str = "$DATA") -> str:
        """How to obtain the dataset's small files (split JSON, class names)."""
        manual = "; ".join(f"{r.filename} from {r.url}" for r in self.remote)
        return (f"run `python prepare_data.py download --root {root} --datasets {self.name}` "
                f"(offline: fetch {manual} into {root}/{self.folder}/)")


_CLASSNAMES = RemoteFile("classnames.txt", "1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF", "classnames")


def _split(name: str, drive_id: str) -> RemoteFile:
    return RemoteFile(f"split_zhou_{name}.json", drive_id, "split")


def _coop(name: str, **layout) -> DatasetSpec:
    """The layout of a dataset of ``selftpt.dataset_catalog`` (which gives its config stem)."""
    return DatasetSpec(name=name, stem=dataset_catalog.by_name(name).stem, **layout)


_SPECS = [
    _coop(
        "ImageNet", folder="imagenet", image_dir="images", num_classes=1000, data_dirs=("images/train", "images/val"),
        source="ImageNet-1k (ILSVRC2012 train and val, val sorted into wnid folders) from https://image-net.org",
        anchor="imagenet", required_files=("classnames.txt",), remote=(_CLASSNAMES,),
    ),
    _coop(
        "Caltech101", folder="caltech-101", image_dir="101_ObjectCategories", num_classes=100,
        data_dirs=("101_ObjectCategories",),
        source="101_ObjectCategories.tar.gz from https://data.caltech.edu/records/mzrjq-6wc02",
        anchor="caltech101", split_file="split_zhou_Caltech101.json",
        remote=(_split("Caltech101", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),),
    ),
    _coop(
        "OxfordPets", folder="oxford_pets", image_dir="images", num_classes=37, data_dirs=("images",),
        source="images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/",
        anchor="oxfordpets", split_file="split_zhou_OxfordPets.json",
        raw_files=("annotations/trainval.txt", "annotations/test.txt"),
        remote=(_split("OxfordPets", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),),
    ),
    _coop(
        "StanfordCars", folder="stanford_cars", image_dir="", num_classes=196, data_dirs=("cars_train", "cars_test"),
        source="cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat "
               "from https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        anchor="stanfordcars", split_file="split_zhou_StanfordCars.json",
        raw_files=("devkit/cars_train_annos.mat", "devkit/cars_meta.mat", "cars_test_annos_withlabels.mat"),
        remote=(_split("StanfordCars", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),),
    ),
    _coop(
        "OxfordFlowers", folder="oxford_flowers", image_dir="jpg", num_classes=102, data_dirs=("jpg",),
        source="102flowers.tgz and imagelabels.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        anchor="oxfordflowers", split_file="split_zhou_OxfordFlowers.json",
        raw_files=("imagelabels.mat", "cat_to_name.json"),
        remote=(_split("OxfordFlowers", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
                RemoteFile("cat_to_name.json", "1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0", "cat_to_name")),
    ),
    _coop(
        "Food101", folder="food-101", image_dir="images", num_classes=101, data_dirs=("images",),
        source="food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        anchor="food101", split_file="split_zhou_Food101.json",
        remote=(_split("Food101", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),),
    ),
    _coop(
        "FGVCAircraft", folder="fgvc_aircraft", image_dir="images", num_classes=100, data_dirs=("images",),
        source="fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ "
               "(keep its data/ folder, renamed to fgvc_aircraft/)",
        anchor="fgvcaircraft",
        raw_files=("variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"),
    ),
    _coop(
        "SUN397", folder="sun397", image_dir="SUN397", num_classes=397, data_dirs=("SUN397",),
        source="SUN397.tar.gz and Partitions.zip from https://vision.princeton.edu/projects/2010/SUN/",
        anchor="sun397", split_file="split_zhou_SUN397.json",
        raw_files=("ClassName.txt", "Training_01.txt", "Testing_01.txt"),
        remote=(_split("SUN397", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),),
    ),
    _coop(
        "DescribableTextures", folder="dtd", image_dir="images", num_classes=47, data_dirs=("images",),
        source="dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        anchor="dtd", split_file="split_zhou_DescribableTextures.json",
        remote=(_split("DescribableTextures", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),),
    ),
    _coop(
        "EuroSAT", folder="eurosat", image_dir="2750", num_classes=10, data_dirs=("2750",),
        source="EuroSAT.zip (RGB) from https://github.com/phelber/EuroSAT",
        anchor="eurosat", split_file="split_zhou_EuroSAT.json",
        remote=(_split("EuroSAT", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),),
    ),
    _coop(
        "UCF101", folder="ucf101", image_dir="UCF-101-midframes", num_classes=101, data_dirs=("UCF-101-midframes",),
        source="UCF-101-midframes.zip from https://drive.google.com/uc?id=10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O",
        anchor="ucf101", split_file="split_zhou_UCF101.json",
        raw_files=("ucfTrainTestlist/classInd.txt", "ucfTrainTestlist/trainlist01.txt",
                   "ucfTrainTestlist/testlist01.txt"),
        remote=(_split("UCF101", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),),
    ),
    _coop(
        "ImageNetV2", folder="imagenetv2", image_dir="imagenetv2-matched-frequency-format-val", num_classes=1000,
        data_dirs=("imagenetv2-matched-frequency-format-val",),
        source="imagenetv2-matched-frequency.tar.gz from https://github.com/modestyachts/ImageNetV2",
        anchor="imagenetv2", required_files=("classnames.txt",), remote=(_CLASSNAMES,), test_only=True,
    ),
    _coop(
        "ImageNetSketch", folder="imagenet-sketch", image_dir="images", num_classes=1000, data_dirs=("images",),
        source="ImageNet-Sketch from https://github.com/HaohanWang/ImageNet-Sketch",
        anchor="imagenet-sketch", required_files=("classnames.txt",), remote=(_CLASSNAMES,), test_only=True,
    ),
    _coop(
        "ImageNetA", folder="imagenet-adversarial", image_dir="imagenet-a", num_classes=200, data_dirs=("imagenet-a",),
        source="imagenet-a.tar from https://github.com/hendrycks/natural-adv-examples",
        anchor="imagenet-a", required_files=("classnames.txt",), remote=(_CLASSNAMES,), test_only=True,
    ),
    _coop(
        "ImageNetR", folder="imagenet-rendition", image_dir="imagenet-r", num_classes=200, data_dirs=("imagenet-r",),
        source="imagenet-r.tar from https://github.com/hendrycks/imagenet-r",
        anchor="imagenet-r", required_files=("classnames.txt",), remote=(_CLASSNAMES,), test_only=True,
    ),
]

CATALOG: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}

# Expected SHA-256 of each downloaded file, keyed by file name. NOT FILLED: the build machine
# has no internet, and a made-up hash would reject the real file. Fill them on a machine with
# internet from `python prepare_data.py hashes --root $DATA` after a verified download. Until
# then each file is checked by format (valid JSON, train/val/test keys, the class count; or
# 102 flower names; or 1000 ImageNet class names) and its hash is printed for the record.
SHA256: dict[str, Optional[str]] = {
    remote.filename: None for spec in _SPECS for remote in spec.remote
}


def get_spec(name: str) -> DatasetSpec:
    """Spec of a dataset by registry name, config stem or alias, ignoring case, "_" and "-"
    (so ``imagenetv2`` finds ImageNetV2)."""
    info = dataset_catalog.find(name, dataset_catalog.PAPER)
    if info is None:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(CATALOG)}")
    return CATALOG[info.name]
