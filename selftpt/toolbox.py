"""The single place that imports the Dassl toolbox names.

Trainers and datasets take every Dassl name from here, never from ``dassl`` directly, so
that the same code runs on a real Dassl install (``pip install -e Dassl.pytorch``) and,
where Dassl is absent, on the project's own Dassl-compatible engine (``selftpt.engine``).

Backend choice: the environment variable ``SELFTPT_BACKEND`` = ``auto`` (default: real
Dassl when importable, else the engine), ``dassl`` (require real Dassl) or ``engine``.

Compatibility fixes applied on the real-Dassl path (the user's install is never edited):
- ``build_lr_scheduler`` is the engine's: Dassl 0.6.3's warm-up schedulers pass ``verbose``
  positionally to ``torch.optim.lr_scheduler.LRScheduler.__init__`` and crash with torch
  >= 2.2. The engine's version has Dassl's keys and per-epoch semantics.
"""
from __future__ import annotations

import importlib.util
import os

_CHOICES = ("auto", "dassl", "engine")
_requested = os.environ.get("SELFTPT_BACKEND", "auto").strip().lower() or "auto"
if _requested not in _CHOICES:
    raise ValueError(
        f"SELFTPT_BACKEND={_requested!r} is not one of {_CHOICES}; unset it or pick one of these"
    )
if _requested == "dassl" and importlib.util.find_spec("dassl") is None:
    raise ImportError(
        "SELFTPT_BACKEND=dassl but the 'dassl' package is not importable; install Dassl "
        "(git clone https://github.com/KaiyangZhou/Dassl.pytorch && pip install -e Dassl.pytorch) "
        "or unset SELFTPT_BACKEND to use the built-in engine"
    )

USING_DASSL: bool = _requested == "dassl" or (
    _requested == "auto" and importlib.util.find_spec("dassl") is not None
)

if USING_DASSL:
    from dassl.config import get_cfg_default
    from dassl.data import DataManager, DatasetWrapper
    from dassl.data.data_manager import build_data_loader
    from dassl.data.datasets import DATASET_REGISTRY, DatasetBase, Datum, build_dataset
    from dassl.data.transforms import build_transform
    from dassl.engine import TRAINER_REGISTRY, SimpleTrainer, TrainerX, build_trainer
    from dassl.evaluation import EVALUATOR_REGISTRY, build_evaluator
    from dassl.metrics import compute_accuracy
    from dassl.optim import build_optimizer
    from dassl.utils import (
        AverageMeter,
        MetricMeter,
        Registry,
        check_availability,
        check_isfile,
        collect_env_info,
        count_num_param,
        listdir_nohidden,
        load_checkpoint,
        load_pretrained_weights,
        mkdir_if_missing,
        read_image,
        read_json,
        resume_from_checkpoint,
        save_checkpoint,
        set_random_seed,
        setup_logger,
        write_json,
    )

    from selftpt.engine.optim import build_lr_scheduler  # see module docstring
else:
    from selftpt.engine import (  # noqa: F401  (re-exported)
        DATASET_REGISTRY,
        EVALUATOR_REGISTRY,
        TRAINER_REGISTRY,
        AverageMeter,
        DataManager,
        DatasetBase,
        DatasetWrapper,
        Datum,
        MetricMeter,
        Registry,
        SimpleTrainer,
        TrainerX,
        build_data_loader,
        build_dataset,
        build_evaluator,
        build_lr_scheduler,
        build_optimizer,
        build_trainer,
        build_transform,
        check_availability,
        check_isfile,
        collect_env_info,
        compute_accuracy,
        count_num_param,
        get_cfg_default,
        listdir_nohidden,
        load_checkpoint,
        load_pretrained_weights,
        mkdir_if_missing,
        read_image,
        read_json,
        resume_from_checkpoint,
        save_checkpoint,
        set_random_seed,
        setup_logger,
        write_json,
    )

BACKEND: str = "dassl" if USING_DASSL else "engine"

__all__ = [
    "BACKEND", "USING_DASSL",
    "DATASET_REGISTRY", "EVALUATOR_REGISTRY", "TRAINER_REGISTRY", "Registry",
    "AverageMeter", "MetricMeter", "DataManager", "DatasetBase", "DatasetWrapper", "Datum",
    "SimpleTrainer", "TrainerX", "build_data_loader", "build_dataset", "build_evaluator",
    "build_lr_scheduler", "build_optimizer", "build_trainer", "build_transform",
    "check_availability", "check_isfile", "collect_env_info", "compute_accuracy",
    "count_num_param", "get_cfg_default", "listdir_nohidden", "load_checkpoint",
    "load_pretrained_weights", "mkdir_if_missing", "read_image", "read_json",
    "resume_from_checkpoint", "save_checkpoint", "set_random_seed", "setup_logger", "write_json",
]
