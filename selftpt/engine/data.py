"""Datasets and data loading (Dassl's ``dassl.data``): ``Datum``, ``DatasetBase``, the
dataset registry, ``DatasetWrapper``, ``build_data_loader`` and ``DataManager``."""
from __future__ import annotations

import os
import os.path as osp
import random
import tarfile
import zipfile
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torchvision.transforms as T
from tabulate import tabulate
from torch.utils.data import DataLoader, Dataset

from .registry import Registry, check_availability
from .samplers import build_sampler
from .transforms import INTERPOLATION_MODES, build_transform
from .utils import check_isfile, read_image

__all__ = [
    "Datum",
    "DatasetBase",
    "MissingImageFileError",
    "DATASET_REGISTRY",
    "build_dataset",
    "DatasetWrapper",
    "build_data_loader",
    "DataManager",
    "build_sampler",
]

DATASET_REGISTRY = Registry("DATASET")


class MissingImageFileError(FileNotFoundError, AssertionError):
    """A ``Datum`` was built for a path that is not a file (an ``AssertionError`` in Dassl)."""


class Datum:
    """One labelled image: read-only ``impath``, ``label``, ``domain``, ``classname``.

    Args:
        impath: image path; must be an existing file.
        label: class label.
        domain: domain label.
        classname: class name.
    """

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = ""):
        if not isinstance(impath, str):
            raise TypeError(f"Datum impath must be a str, got {type(impath).__name__}")
        if not check_isfile(impath):
            raise MissingImageFileError(f"Datum image file not found: {impath!r}")
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname

    @property
    def impath(self) -> str:
        return self._impath

    @property
    def label(self) -> int:
        return self._label

    @property
    def domain(self) -> int:
        return self._domain

    @property
    def classname(self) -> str:
        return self._classname

    def __repr__(self) -> str:
        return (f"Datum(impath={self._impath!r}, label={self._label}, "
                f"domain={self._domain}, classname={self._classname!r})")


class DatasetBase:
    """A dataset as lists of ``Datum``: ``train_x`` (labelled), ``train_u`` (unlabelled,
    optional), ``val`` (optional), ``test``.

    ``num_classes``, ``lab2cname`` and ``classnames`` are computed from ``train_x`` only,
    so every class must appear there.
    """

    dataset_dir = ""  # folder of the dataset under DATASET.ROOT
    domains: list = []  # names of the domains, for multi-domain datasets

    def __init__(
        self,
        train_x: Optional[list] = None,
        train_u: Optional[list] = None,
        val: Optional[list] = None,
        test: Optional[list] = None,
    ) -> None:
        self._train_x = train_x
        self._train_u = train_u
        self._val = val
        self._test = test
        self._num_classes = self.get_num_classes(train_x)
        self._lab2cname, self._classnames = self.get_lab2cname(train_x)

    @property
    def train_x(self) -> Optional[list]:
        return self._train_x

    @property
    def train_u(self) -> Optional[list]:
        return self._train_u

    @property
    def val(self) -> Optional[list]:
        return self._val

    @property
    def test(self) -> Optional[list]:
        return self._test

    @property
    def lab2cname(self) -> dict:
        return self._lab2cname

    @property
    def classnames(self) -> list:
        return self._classnames

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @staticmethod
    def get_num_classes(data_source: Sequence[Datum]) -> int:
        """Number of classes = largest label + 1."""
        if not data_source:
            raise ValueError("Cannot count classes: train_x is empty (or None)")
        return max(item.label for item in data_source) + 1

    @staticmethod
    def get_lab2cname(data_source: Sequence[Datum]) -> tuple[dict, list]:
        """Return ``({label: classname}, [classname sorted by label])``."""
        mapping = {item.label: item.classname for item in data_source}
        labels = sorted(mapping)
        return mapping, [mapping[label] for label in labels]

    def check_input_domains(self, source_domains: Sequence[str], target_domains: Sequence[str]):
        """Check that both domain lists are non-empty and known to the dataset."""
        if len(source_domains) == 0:
            raise ValueError("source_domains (list) is empty")
        if len(target_domains) == 0:
            raise ValueError("target_domains (list) is empty")
        self.is_input_domain_valid(source_domains)
        self.is_input_domain_valid(target_domains)

    def is_input_domain_valid(self, input_domains: Sequence[str]) -> None:
        for domain in input_domains:
            if domain not in self.domains:
                raise ValueError(f"Input domain must belong to {self.domains}, but got [{domain}]")

    def download_data(self, url: str, dst: str, from_gdrive: bool = True) -> None:
        """Download ``url`` to ``dst`` (Google Drive via gdown) and extract zip/tar/tar.gz."""
        os.makedirs(osp.dirname(dst), exist_ok=True)
        if not from_gdrive:
            raise NotImplementedError("Only Google Drive downloads are supported")
        import gdown  # imported here: only needed when downloading

        gdown.download(url, dst, quiet=False)
        print("Extracting file ...")
        folder = osp.dirname(dst)
        if dst.endswith(".zip"):
            with zipfile.ZipFile(dst, "r") as zf:
                zf.extractall(folder)
        elif dst.endswith(".tar") or dst.endswith(".tar.gz"):
            with tarfile.open(dst, "r:gz" if dst.endswith(".gz") else "r:") as tf:
                tf.extractall(folder)
        else:
            raise NotImplementedError(f"Cannot extract {dst}: not .zip, .tar or .tar.gz")
        print(f"File extracted to {folder}")

    def generate_fewshot_dataset(
        self, *data_sources: list, num_shots: int = -1, repeat: bool = False
    ) -> Union[list, tuple, list[list]]:
        """Sample ``num_shots`` items per class from each data source.

        Uses Python's global ``random`` (so the subset is a function of the seed):
        ``random.sample`` per class; a class with fewer items keeps them all, or, with
        ``repeat=True``, is filled with ``random.choices`` (with replacement).

        Returns:
            The inputs unchanged if ``num_shots < 1``; a list for one source; else a list
            of lists.
        """
        if num_shots < 1:
            return data_sources[0] if len(data_sources) == 1 else data_sources

        print(f"Creating a {num_shots}-shot dataset")
        output = []
        for data_source in data_sources:
            dataset = []
            for items in self.split_dataset_by_label(data_source).values():
                if len(items) >= num_shots:
                    dataset.extend(random.sample(items, num_shots))
                elif repeat:
                    dataset.extend(random.choices(items, k=num_shots))
                else:
                    dataset.extend(items)
            output.append(dataset)
        return output[0] if len(output) == 1 else output

    def split_dataset_by_label(self, data_source: Sequence[Datum]) -> defaultdict:
        """Group items by label (in order of first appearance)."""
        output: defaultdict[int, list] = defaultdict(list)
        for item in data_source:
            output[item.label].append(item)
        return output

    def split_dataset_by_domain(self, data_source: Sequence[Datum]) -> defaultdict:
        """Group items by domain (in order of first appearance)."""
        output: defaultdict[int, list] = defaultdict(list)
        for item in data_source:
            output[item.domain].append(item)
        return output


def build_dataset(cfg) -> DatasetBase:
    """Instantiate the dataset registered as ``cfg.DATASET.NAME``."""
    check_availability(cfg.DATASET.NAME, DATASET_REGISTRY.registered_names(), kind="dataset")
    if cfg.VERBOSE:
        print(f"Loading dataset: {cfg.DATASET.NAME}")
    return DATASET_REGISTRY.get(cfg.DATASET.NAME)(cfg)


class DatasetWrapper(Dataset):
    """Torch dataset over a list of ``Datum``; items are dicts with ``label``, ``domain``,
    ``impath``, ``index`` and ``img`` (``img2``, ``img3``... for a list of transforms;
    ``img0`` = resize + tensor (+ normalize) when ``DATALOADER.RETURN_IMG0``).

    With ``DATALOADER.K_TRANSFORMS > 1`` (train only) each ``img*`` is a list of K views.
    """

    def __init__(self, cfg, data_source: Sequence[Datum], transform: Any = None,
                 is_train: bool = False) -> None:
        self.cfg = cfg
        self.data_source = data_source
        self.transform = transform  # a transform, or a list/tuple of them
        self.is_train = is_train
        self.k_tfm = cfg.DATALOADER.K_TRANSFORMS if is_train else 1
        self.return_img0 = cfg.DATALOADER.RETURN_IMG0
        if self.k_tfm > 1 and transform is None:
            raise ValueError(f"Cannot augment the image {self.k_tfm} times because transform is None")

        to_tensor = [
            T.Resize(cfg.INPUT.SIZE, interpolation=INTERPOLATION_MODES[cfg.INPUT.INTERPOLATION]),
            T.ToTensor(),
        ]
        if "normalize" in cfg.INPUT.TRANSFORMS:
            to_tensor.append(T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD))
        self.to_tensor = T.Compose(to_tensor)

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, idx: int) -> dict:
        item = self.data_source[idx]
        output = {"label": item.label, "domain": item.domain, "impath": item.impath, "index": idx}
        img0 = read_image(item.impath)
        if self.transform is None:
            output["img"] = img0
        elif isinstance(self.transform, (list, tuple)):
            for i, tfm in enumerate(self.transform):
                output["img" if i == 0 else f"img{i + 1}"] = self._transform_image(tfm, img0)
        else:
            output["img"] = self._transform_image(self.transform, img0)
        if self.return_img0:
            output["img0"] = self.to_tensor(img0)  # without augmentation
        return output

    def _transform_image(self, tfm: Callable, img0: Any) -> Any:
        views = [tfm(img0) for _ in range(self.k_tfm)]
        return views[0] if len(views) == 1 else views


def build_data_loader(
    cfg,
    sampler_type: str = "SequentialSampler",
    data_source: Optional[Sequence[Datum]] = None,
    batch_size: int = 64,
    n_domain: int = 0,
    n_ins: int = 2,
    tfm: Any = None,
    is_train: bool = True,
    dataset_wrapper: Optional[type] = None,
) -> DataLoader:
    """Build a ``DataLoader`` over ``data_source`` wrapped in ``dataset_wrapper``.

    ``drop_last`` only when training and the source holds at least one full batch;
    ``pin_memory`` only when CUDA is available and ``cfg.USE_CUDA``.
    """
    if not data_source:
        raise ValueError("Cannot build a data loader: the data source is empty (or None)")
    sampler = build_sampler(sampler_type, cfg=cfg, data_source=data_source,
                            batch_size=batch_size, n_domain=n_domain, n_ins=n_ins)
    wrapper = dataset_wrapper if dataset_wrapper is not None else DatasetWrapper
    loader = DataLoader(
        wrapper(cfg, data_source, transform=tfm, is_train=is_train),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        drop_last=is_train and len(data_source) >= batch_size,
        pin_memory=torch.cuda.is_available() and cfg.USE_CUDA,
    )
    if len(loader) == 0:
        raise ValueError(
            f"Empty data loader: {len(data_source)} items, batch size {batch_size}, "
            f"sampler {sampler_type}"
        )
    return loader


class DataManager:
    """Builds the dataset, its transforms and the loaders ``train_loader_x``,
    ``train_loader_u`` (if ``train_u``), ``val_loader`` (if ``val``) and ``test_loader``.

    Args:
        cfg: the config.
        custom_tfm_train / custom_tfm_test: transforms (or lists of them) replacing the
            ones built from ``cfg.INPUT``.
        dataset_wrapper: a ``DatasetWrapper`` subclass to use instead of the default.
    """

    def __init__(self, cfg, custom_tfm_train: Any = None, custom_tfm_test: Any = None,
                 dataset_wrapper: Optional[type] = None) -> None:
        dataset = build_dataset(cfg)

        if custom_tfm_train is None:
            tfm_train = build_transform(cfg, is_train=True)
        else:
            print("* Using custom transform for training")
            tfm_train = custom_tfm_train
        if custom_tfm_test is None:
            tfm_test = build_transform(cfg, is_train=False)
        else:
            print("* Using custom transform for testing")
            tfm_test = custom_tfm_test

        def loader(split: str, data_source, **kwargs) -> DataLoader:
            if not data_source:
                raise ValueError(
                    f"Dataset {cfg.DATASET.NAME!r}: the {split} split is empty; check "
                    f"DATASET.ROOT ({cfg.DATASET.ROOT!r}), the split file and NUM_SHOTS/"
                    f"SUBSAMPLE_CLASSES"
                )
            return build_data_loader(cfg, data_source=data_source,
                                     dataset_wrapper=dataset_wrapper, **kwargs)

        dl = cfg.DATALOADER
        train_loader_x = loader(
            "train_x", dataset.train_x, sampler_type=dl.TRAIN_X.SAMPLER,
            batch_size=dl.TRAIN_X.BATCH_SIZE, n_domain=dl.TRAIN_X.N_DOMAIN,
            n_ins=dl.TRAIN_X.N_INS, tfm=tfm_train, is_train=True,
        )
        train_loader_u = None
        if dataset.train_u:
            u = dl.TRAIN_X if dl.TRAIN_U.SAME_AS_X else dl.TRAIN_U
            train_loader_u = loader(
                "train_u", dataset.train_u, sampler_type=u.SAMPLER, batch_size=u.BATCH_SIZE,
                n_domain=u.N_DOMAIN, n_ins=u.N_INS, tfm=tfm_train, is_train=True,
            )
        val_loader = None
        if dataset.val:
            val_loader = loader(
                "val", dataset.val, sampler_type=dl.TEST.SAMPLER,
                batch_size=dl.TEST.BATCH_SIZE, tfm=tfm_test, is_train=False,
            )
        test_loader = loader(
            "test", dataset.test, sampler_type=dl.TEST.SAMPLER,
            batch_size=dl.TEST.BATCH_SIZE, tfm=tfm_test, is_train=False,
        )

        self._num_classes = dataset.num_classes
        self._num_source_domains = len(cfg.DATASET.SOURCE_DOMAINS)
        self._lab2cname = dataset.lab2cname
        self.dataset = dataset
        self.train_loader_x = train_loader_x
        self.train_loader_u = train_loader_u
        self.val_loader = val_loader
        self.test_loader = test_loader
        if cfg.VERBOSE:
            self.show_dataset_summary(cfg)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_source_domains(self) -> int:
        return self._num_source_domains

    @property
    def lab2cname(self) -> dict:
        return self._lab2cname

    def show_dataset_summary(self, cfg) -> None:
        """Print the Dataset / # classes / # train_x / # val / # test table."""
        table = [["Dataset", cfg.DATASET.NAME]]
        if cfg.DATASET.SOURCE_DOMAINS:
            table.append(["Source", cfg.DATASET.SOURCE_DOMAINS])
        if cfg.DATASET.TARGET_DOMAINS:
            table.append(["Target", cfg.DATASET.TARGET_DOMAINS])
        table.append(["# classes", f"{self.num_classes:,}"])
        table.append(["# train_x", f"{len(self.dataset.train_x):,}"])
        if self.dataset.train_u:
            table.append(["# train_u", f"{len(self.dataset.train_u):,}"])
        if self.dataset.val:
            table.append(["# val", f"{len(self.dataset.val):,}"])
        table.append(["# test", f"{len(self.dataset.test):,}"])
        print(tabulate(table))
