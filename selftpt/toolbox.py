"""The backend switch: Dassl's toolbox names (registries, configs, trainer loop, data,
checkpoints) from real Dassl or from the built-in engine, chosen once per process.

This is the single place that imports them. Trainers and datasets take every Dassl name from
here, never from ``dassl`` directly, so that the same code runs on a real Dassl install
(``pip install -e Dassl.pytorch``) and, where Dassl is absent, on the project's own
Dassl-compatible engine (``selftpt.engine``). It is named after Dassl's word for these names;
``selftpt.trainer_facts`` finds the registry as ``sys.modules["selftpt.toolbox"]``, and every
trainer, dataset and test imports it by that name.

Backend choice: the environment variable ``SELFTPT_BACKEND`` = ``auto`` (default: real
Dassl when it imports, else the engine, with a warning if Dassl is installed but broken),
``dassl`` (require real Dassl) or ``engine``.

Compatibility fixes applied on the real-Dassl path (the user's install is never edited;
``docs/real_dassl.md`` lists them with the symptoms they prevent):
- ``build_lr_scheduler`` is the engine's: Dassl 0.6.3's warm-up schedulers pass ``verbose``
  positionally to ``torch.optim.lr_scheduler.LRScheduler.__init__`` and crash with torch
  >= 2.2. The engine's version has Dassl's keys and per-epoch semantics.
- ``setup_logger`` is the engine's: Dassl's ``Logger.close()`` (also run from ``__del__``
  when the tee is garbage-collected) closes the console it wraps, i.e. the real
  ``sys.stdout`` (or pytest's capture), so a second run in one process, or anything printed
  after the log is closed, fails with "I/O operation on closed file". Dassl's tee also leaves
  ``stderr`` (tracebacks, warnings) out of ``log.txt``. Same file naming as Dassl's.
- Checkpoint I/O is the engine's (``save_checkpoint``, ``load_checkpoint``,
  ``resume_from_checkpoint``, ``load_pretrained_weights``, and the trainers' ``save_model``,
  ``resume_model_if_exist``, ``load_model``), same files and keys as Dassl's:
  * Dassl's ``load_checkpoint`` calls ``torch.load`` with torch >= 2.6's default
    ``weights_only=True``, which refuses the checkpoints Dassl itself writes with a warm-up
    scheduler (they pickle the successor scheduler object), e.g. CoOp's released weights;
  * Dassl's checkpoints carry no RNG state, so a resumed run drew other random crops and
    batch orders than an uninterrupted one; the engine's add ``rng_state`` (ignored by Dassl);
  * Dassl's ``load_model`` crashes with ``TypeError`` when ``val_result`` is None (Dassl #56),
    and its ``resume_model_if_exist`` crashes on a model folder that has no ``checkpoint``
    file yet; its ``save_checkpoint`` is not atomic (an interrupt can leave a torn file);
  * Dassl's checkpoints hold only the registered models, so trainer state such as Self-TPT's
    gradient EMA was lost on resume; the engine's add the trainer's ``training_state`` (the
    ``training_state`` / ``load_training_state`` hooks), resume a set interrupted mid-save from
    the last epoch every model has, and prune old epoch files (``TRAIN.KEEP_CHECKPOINTS``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

_CHOICES = ("auto", "dassl", "engine")
_requested = os.environ.get("SELFTPT_BACKEND", "auto").strip().lower() or "auto"
if _requested not in _CHOICES:
    raise ValueError(
        f"SELFTPT_BACKEND={_requested!r} is not one of {_CHOICES}; unset it or pick one of these"
    )
_INSTALL_HINT = ("install Dassl and its requirements (git clone https://github.com/KaiyangZhou/Dassl.pytorch "
                 "&& pip install -r Dassl.pytorch/requirements.txt && pip install -e Dassl.pytorch; "
                 "see docs/real_dassl.md)")


def _dassl_import_error() -> ImportError | None:
    """Why ``dassl`` cannot be used (not installed, or one of its imports fails), or None.

    ``dassl.engine`` pulls in the whole package (config, data with ``wilds``, evaluation with
    ``sklearn``, tensorboard), so a partial install is caught here rather than mid-import.
    """
    if importlib.util.find_spec("dassl") is None:
        return ImportError("the 'dassl' package is not installed")
    try:
        importlib.import_module("dassl.engine")
    except ImportError as exc:
        return exc
    return None


_dassl_error = None if _requested == "engine" else _dassl_import_error()
if _requested == "dassl" and _dassl_error is not None:
    raise ImportError(
        f"SELFTPT_BACKEND=dassl but Dassl cannot be imported ({_dassl_error}); {_INSTALL_HINT}, "
        "or unset SELFTPT_BACKEND to use the built-in engine"
    ) from _dassl_error
if _requested == "auto" and _dassl_error is not None and importlib.util.find_spec("dassl") is not None:
    warnings.warn(f"Dassl is installed but cannot be imported ({_dassl_error}); using the built-in "
                  f"engine instead. To use Dassl, {_INSTALL_HINT}; to silence this, set "
                  "SELFTPT_BACKEND=engine", stacklevel=2)

USING_DASSL: bool = _requested != "engine" and _dassl_error is None

if USING_DASSL:
    from dassl.config import get_cfg_default
    from dassl.data import DataManager, DatasetWrapper
    from dassl.data.data_manager import build_data_loader
    from dassl.data.datasets import DATASET_REGISTRY, DatasetBase, Datum, build_dataset
    from dassl.data.transforms import build_transform
    from dassl.engine import TRAINER_REGISTRY, build_trainer
    from dassl.engine import SimpleTrainer as _DasslSimpleTrainer
    from dassl.engine import TrainerX as _DasslTrainerX
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
        mkdir_if_missing,
        read_image,
        read_json,
        set_random_seed,
        write_json,
    )

    # Project-side replacements for Dassl names that misbehave; see the module docstring.
    from selftpt.engine.checkpoint import (
        load_checkpoint,
        load_pretrained_weights,
        resume_from_checkpoint,
        save_checkpoint,
    )
    from selftpt.engine.logger import setup_logger
    from selftpt.engine.optim import build_lr_scheduler
    from selftpt.engine.trainer import TrainerBase as _EngineTrainerBase

    class _EngineCheckpoints:
        """The engine's checkpoint methods, put before Dassl's in the trainers' MRO.

        They use the same attributes as Dassl's (``_models``, ``_optims``, ``_scheds``) and
        write the same files; see the module docstring for what they fix.
        """

        save_model = _EngineTrainerBase.save_model
        resume_model_if_exist = _EngineTrainerBase.resume_model_if_exist
        load_model = _EngineTrainerBase.load_model
        training_state = _EngineTrainerBase.training_state
        load_training_state = _EngineTrainerBase.load_training_state
        _resumable_set = staticmethod(_EngineTrainerBase._resumable_set)
        _describe_checkpoint = staticmethod(_EngineTrainerBase._describe_checkpoint)

    class SimpleTrainer(_EngineCheckpoints, _DasslSimpleTrainer):
        """Dassl's ``SimpleTrainer`` with the engine's checkpoint I/O."""

    class TrainerX(_EngineCheckpoints, _DasslTrainerX):
        """Dassl's ``TrainerX`` with the engine's checkpoint I/O."""

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
