"""Trainers (Dassl's ``dassl.engine``): ``TrainerBase`` (model bookkeeping and the loop),
``SimpleTrainer`` (data, evaluator, checkpoints, test), ``TrainerX`` (labelled data only),
plus ``TRAINER_REGISTRY`` and ``build_trainer``.

Hooks a trainer overrides: ``check_cfg``, ``build_data_loader``, ``build_model``,
``forward_backward``, ``parse_batch_train``, ``parse_batch_test``, ``model_inference``,
``test`` (or just ``test_step`` / ``get_test_loader``), ``load_model``.
"""
from __future__ import annotations

import datetime
import os.path as osp
import time
from collections import OrderedDict
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import (
    EPOCH_CHECKPOINT,
    IncompleteCheckpointError,
    checkpoint_epochs,
    get_rng_state,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_pointer,
    restore_checkpoint,
    save_checkpoint,
)
from .data import DataManager
from .evaluation import build_evaluator
from .meters import AverageMeter, MetricMeter
from .registry import Registry, check_availability
from .utils import mkdir_if_missing, tolist_if_not

__all__ = ["TRAINER_REGISTRY", "build_trainer", "TrainerBase", "SimpleTrainer", "TrainerX"]

TRAINER_REGISTRY = Registry("TRAINER")


def build_trainer(cfg) -> "TrainerBase":
    """Instantiate the trainer registered as ``cfg.TRAINER.NAME``."""
    check_availability(cfg.TRAINER.NAME, TRAINER_REGISTRY.registered_names(), kind="trainer")
    if cfg.VERBOSE:
        print(f"Loading trainer: {cfg.TRAINER.NAME}")
    return TRAINER_REGISTRY.get(cfg.TRAINER.NAME)(cfg)


def _make_summary_writer(log_dir: str) -> Optional[Any]:
    """A tensorboard ``SummaryWriter``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or a broken tensorboard install
        return None
    mkdir_if_missing(log_dir)
    return SummaryWriter(log_dir=log_dir)


class TrainerBase:
    """Registered models with their optimisers/schedulers, and the generic epoch loop."""

    def __init__(self) -> None:
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._optims: OrderedDict[str, Optional[torch.optim.Optimizer]] = OrderedDict()
        self._scheds: OrderedDict[str, Optional[Any]] = OrderedDict()
        self._writer: Optional[Any] = None

    # ------------------------------------------------------------ model bookkeeping
    def register_model(self, name: str = "model", model: Optional[nn.Module] = None,
                       optim: Optional[torch.optim.Optimizer] = None,
                       sched: Optional[Any] = None) -> None:
        """Register a module (with its optimiser and scheduler) under a unique ``name``;
        it is then switched by ``set_model_mode``, stepped, saved and loaded by the trainer."""
        if self.__dict__.get("_models") is None:
            raise AttributeError("Cannot assign model before super().__init__() call")
        if name in self._models:
            raise KeyError(f"Found duplicate model name {name!r}")
        self._models[name] = model
        self._optims[name] = optim
        self._scheds[name] = sched

    def get_model_names(self, names: Union[str, list[str], None] = None) -> list[str]:
        """All registered names, or ``names`` (a name or a list) after checking them."""
        registered = list(self._models.keys())
        if names is None:
            return registered
        names = tolist_if_not(names)
        for name in names:
            if name not in registered:
                raise KeyError(f"No registered model named {name!r}; registered: {registered}")
        return names

    def set_model_mode(self, mode: str = "train", names: Union[str, list[str], None] = None):
        """Switch the registered modules (only those) to ``train`` or ``test``/``eval`` mode."""
        if mode not in ("train", "test", "eval"):
            raise KeyError(f"Unknown model mode {mode!r}; use 'train', 'test' or 'eval'")
        for name in self.get_model_names(names):
            self._models[name].train(mode == "train")

    def update_lr(self, names: Union[str, list[str], None] = None) -> None:
        """Step the schedulers (once per epoch: trainers call it on the last batch)."""
        for name in self.get_model_names(names):
            if self._scheds[name] is not None:
                self._scheds[name].step()

    def get_current_lr(self, names: Union[str, list[str], None] = None) -> float:
        """The lr of the first param group of the first (named) model's optimiser."""
        name = self.get_model_names(names)[0]
        return self._optims[name].param_groups[0]["lr"]

    # ------------------------------------------------------------ checkpoints
    def training_state(self) -> dict:
        """Trainer state beyond the registered models, optimisers, schedulers and RNGs that a
        resumed run needs to continue exactly (e.g. moving averages, private generators).

        Saved with every checkpoint under ``training_state`` and handed back to
        ``load_training_state`` on resume. Default: nothing.
        """
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore what ``training_state`` returned (default: nothing to restore)."""

    def save_model(self, epoch: int, directory: str, is_best: bool = False,
                   val_result: Optional[float] = None, model_name: str = "") -> None:
        """Save every registered model to ``directory/<name>/model.pth.tar-<epoch + 1>``
        (or ``model_name``), with optimiser, scheduler, val result, RNG states and the
        trainer's ``training_state``.

        An epoch checkpoint (no ``model_name``) then prunes the older epoch checkpoints to the
        newest ``TRAIN.KEEP_CHECKPOINTS`` per model (absent or 0: keep all, as Dassl), and only
        after the whole set is written: an interrupt between two models' saves leaves the
        previous epoch complete for ``resume_model_if_exist``.
        """
        rng_state = get_rng_state()
        training_state = self.training_state()
        names = self.get_model_names()
        for name in names:
            optim, sched = self._optims[name], self._scheds[name]
            save_checkpoint(
                {
                    "state_dict": self._models[name].state_dict(),
                    "epoch": epoch + 1,
                    "optimizer": optim.state_dict() if optim is not None else None,
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "val_result": val_result,
                    "rng_state": rng_state,
                    "training_state": training_state,
                },
                osp.join(directory, name),
                is_best=is_best,
                model_name=model_name,
            )
        if not model_name:
            cfg = getattr(self, "cfg", None)
            keep = int(cfg.TRAIN.get("KEEP_CHECKPOINTS", 0)) if cfg is not None else 0
            for name in names:
                prune_checkpoints(osp.join(directory, name), keep)

    def resume_model_if_exist(self, directory: str) -> int:
        """Resume every registered model from ``directory/<name>/`` if all have a saved
        checkpoint there; return the epoch to start from (0 = from scratch).

        The models of one epoch are saved one after the other, so a run killed between two
        saves leaves ``checkpoint`` files that name different epochs. Such a set is resumed
        from the last epoch that every model has, with a line saying so. The trainer's
        ``training_state`` comes from the first model's checkpoint (every model's holds it).
        """
        names = self.get_model_names()
        folders = {name: osp.join(directory, name) for name in names}
        if not all(osp.isfile(osp.join(folder, "checkpoint")) for folder in folders.values()):
            print("No checkpoint found, train from scratch")
            return 0
        files = self._resumable_set(folders)
        print(f"Found checkpoint at {directory} (will resume training)")
        start_epoch, first = 0, None
        for name in names:
            fpath = osp.join(folders[name], files[name])
            print(f'Loading checkpoint from "{fpath}"')
            checkpoint = load_checkpoint(fpath)
            start_epoch = restore_checkpoint(checkpoint, self._models[name], self._optims[name],
                                             self._scheds[name])
            if first is None:
                first = (fpath, checkpoint)
        if first is not None:
            fpath, checkpoint = first
            if checkpoint.get("training_state") is None:
                print(f"{fpath} holds no training_state (saved by Dassl or an older version of this "
                      "project): models, optimisers, schedulers and RNGs resumed; the trainer's own "
                      "training state starts afresh")
            else:
                self.load_training_state(checkpoint["training_state"])
                print("Restored the trainer's training state")
        return start_epoch

    @staticmethod
    def _resumable_set(folders: dict[str, str]) -> dict[str, str]:
        """The checkpoint file to resume each model from: the one its ``checkpoint`` file
        names when all name the same epoch, else ``model.pth.tar-<E>`` with E the last epoch
        saved for every model (see ``resume_model_if_exist``)."""
        pointed = {name: read_checkpoint_pointer(folder) for name, folder in folders.items()}
        epochs = {}
        for name, fname in pointed.items():
            match = EPOCH_CHECKPOINT.fullmatch(fname)
            epochs[name] = (int(match.group(1)) if match
                            else load_checkpoint(osp.join(folders[name], fname))["epoch"])
        if len(set(epochs.values())) <= 1:
            return pointed
        saved = [set(checkpoint_epochs(folder)) for folder in folders.values()]
        common = [e for e in set.intersection(*saved) if e <= min(epochs.values())]
        found = ", ".join(f"{name} at epoch {epoch}" for name, epoch in epochs.items())
        if not common:
            raise IncompleteCheckpointError(
                f"The checkpoints under {osp.dirname(next(iter(folders.values())))} are from different "
                f"epochs ({found}) and no epoch is saved for every model; delete those folders to train "
                "from scratch"
            )
        epoch = max(common)
        print(f"Checkpoints are from different epochs ({found}; the run was stopped while saving): "
              f"resuming from epoch {epoch}, the last epoch saved for every model")
        return {name: f"model.pth.tar-{epoch}" for name in folders}

    def load_model(self, directory: str, epoch: Optional[int] = None) -> None:
        """Load ``directory/<name>/model-best.pth.tar`` (or ``model.pth.tar-<epoch>``) into
        every registered model, strictly."""
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given "
                  "(ignore this if it's done on purpose)")
            return
        model_file = "model-best.pth.tar" if epoch is None else f"model.pth.tar-{epoch}"
        for name in self.get_model_names():
            model_path = osp.join(directory, name, model_file)
            if not osp.exists(model_path):
                raise FileNotFoundError(f"No model at {model_path}")
            checkpoint = load_checkpoint(model_path)
            print(f"Load {model_path} to {name} ({self._describe_checkpoint(checkpoint)})")
            self._models[name].load_state_dict(checkpoint["state_dict"])

    @staticmethod
    def _describe_checkpoint(checkpoint: dict) -> str:
        """``epoch=E, val_result=V`` (``val_result=None`` does not crash, unlike Dassl)."""
        val_result = checkpoint.get("val_result")
        val = "None" if val_result is None else f"{val_result:.1f}"
        return f"epoch={checkpoint.get('epoch')}, val_result={val}"

    # ------------------------------------------------------------ tensorboard
    def init_writer(self, log_dir: str) -> None:
        """Start a tensorboard writer (silently skipped when tensorboard is missing)."""
        if self.__dict__.get("_writer") is None:
            self._writer = _make_summary_writer(log_dir)
            if self._writer is not None:
                print(f"Initialize tensorboard (log_dir={log_dir})")

    def close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write_scalar(self, tag: str, scalar_value: float, global_step: Optional[int] = None):
        if self._writer is not None:
            self._writer.add_scalar(tag, scalar_value, global_step)

    # ------------------------------------------------------------ loop
    def train(self, start_epoch: int, max_epoch: int) -> None:
        """``before_train``; per epoch ``before_epoch``, ``run_epoch``, ``after_epoch``;
        ``after_train``."""
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        self.before_train()
        for self.epoch in range(self.start_epoch, self.max_epoch):  # noqa: B020  (Dassl's hooks read self.epoch)
            self.before_epoch()
            self.run_epoch()
            self.after_epoch()
        self.after_train()

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def run_epoch(self) -> None:
        raise NotImplementedError

    def test(self, split: Optional[str] = None) -> float:
        raise NotImplementedError

    def parse_batch_train(self, batch: dict) -> Any:
        raise NotImplementedError

    def parse_batch_test(self, batch: dict) -> Any:
        raise NotImplementedError

    def forward_backward(self, batch: dict) -> dict:
        raise NotImplementedError

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ optimisation steps
    def detect_anomaly(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise FloatingPointError("Loss is infinite or NaN!")

    def model_zero_grad(self, names: Union[str, list[str], None] = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].zero_grad()

    def model_backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; raises ``FloatingPointError`` on a non-finite loss."""
        self.detect_anomaly(loss)
        loss.backward()

    def model_update(self, names: Union[str, list[str], None] = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].step()

    def model_backward_and_update(self, loss: torch.Tensor,
                                  names: Union[str, list[str], None] = None) -> None:
        self.model_zero_grad(names)
        self.model_backward(loss)
        self.model_update(names)


class SimpleTrainer(TrainerBase):
    """Builds data loaders, model and evaluator from ``cfg``; saves, resumes and tests."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.check_cfg(cfg)
        if torch.cuda.is_available() and cfg.USE_CUDA:
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
        self.start_epoch = self.epoch = 0
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.output_dir = cfg.OUTPUT_DIR
        self.cfg = cfg
        self.build_data_loader()
        self.build_model()
        self.evaluator = build_evaluator(cfg, lab2cname=self.lab2cname)
        self.best_result = -np.inf

    def check_cfg(self, cfg) -> None:
        """Check trainer-specific config values (optional hook)."""

    def build_data_loader(self) -> None:
        """Create ``dm``, ``train_loader_x``, ``train_loader_u``, ``val_loader``,
        ``test_loader``, ``num_classes``, ``num_source_domains``, ``lab2cname``."""
        dm = DataManager(self.cfg)
        self.train_loader_x = dm.train_loader_x
        self.train_loader_u = dm.train_loader_u  # may be None
        self.val_loader = dm.val_loader  # may be None
        self.test_loader = dm.test_loader
        self.num_classes = dm.num_classes
        self.num_source_domains = dm.num_source_domains
        self.lab2cname = dm.lab2cname
        self.dm = dm

    def build_model(self) -> None:
        """Build and register the model(s); trainers must override it (the engine has no
        backbone zoo, unlike Dassl's default ``SimpleNet``)."""
        raise NotImplementedError(
            f"{type(self).__name__}.build_model() must build and register its model "
            "(the built-in engine has no default backbone model)"
        )

    def train(self) -> None:  # type: ignore[override]
        super().train(self.start_epoch, self.max_epoch)

    def before_train(self) -> None:
        directory = self.cfg.RESUME or self.cfg.OUTPUT_DIR
        self.start_epoch = self.resume_model_if_exist(directory)
        self.init_writer(osp.join(self.output_dir, "tensorboard"))
        self.time_start = time.time()

    def after_train(self) -> None:
        print("Finish training")
        if not self.cfg.TEST.NO_TEST:
            if self.cfg.TEST.FINAL_MODEL == "best_val":
                print("Deploy the model with the best val performance")
                self.load_model(self.output_dir)
            else:
                print("Deploy the last-epoch model")
            self.test()
        elapsed = str(datetime.timedelta(seconds=round(time.time() - self.time_start)))
        print(f"Elapsed: {elapsed}")
        self.close_writer()

    def after_epoch(self) -> None:
        last_epoch = (self.epoch + 1) == self.max_epoch
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        meet_checkpoint_freq = freq > 0 and (self.epoch + 1) % freq == 0
        if not self.cfg.TEST.NO_TEST and self.cfg.TEST.FINAL_MODEL == "best_val":
            curr_result = self.test(split="val")
            if curr_result > self.best_result:
                self.best_result = curr_result
                self.save_model(self.epoch, self.output_dir, val_result=curr_result,
                                model_name="model-best.pth.tar")
        if meet_checkpoint_freq or last_epoch:
            self.save_model(self.epoch, self.output_dir)

    # ------------------------------------------------------------ evaluation
    def get_test_loader(self, split: Optional[str] = None) -> tuple[str, Any]:
        """Return ``(split, loader)``: ``cfg.TEST.SPLIT`` by default; ``"val"`` falls back
        to the test set when there is no val loader."""
        split = split or self.cfg.TEST.SPLIT
        if split == "val" and self.val_loader is not None:
            return "val", self.val_loader
        return "test", self.test_loader

    def test_step(self, batch: dict) -> None:
        """Evaluate one batch: parse, infer, feed the evaluator."""
        input, label = self.parse_batch_test(batch)
        output = self.model_inference(input)
        self.evaluator.process(output, label)

    @torch.no_grad()
    def test(self, split: Optional[str] = None) -> float:
        """Evaluate on ``split`` under ``torch.no_grad()``; return the first metric.

        Subclasses that adapt at test time can run their adaptation (with
        ``torch.enable_grad()``) and then call ``super().test(split)``, or override
        ``test_step``.
        """
        self.set_model_mode("eval")
        self.evaluator.reset()
        split, data_loader = self.get_test_loader(split)
        print(f"Evaluate on the *{split}* set")
        for batch in tqdm(data_loader):
            self.test_step(batch)
        results = self.evaluator.evaluate()
        for k, v in results.items():
            self.write_scalar(f"{split}/{k}", v, self.epoch)
        return list(results.values())[0]

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)

    def parse_batch_test(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["img"].to(self.device), batch["label"].to(self.device)


class TrainerX(SimpleTrainer):
    """Trainer on labelled data only (``train_loader_x``)."""

    def run_epoch(self) -> None:
        """One pass over ``train_loader_x``; prints a Dassl >= 0.6.1 progress line every
        ``TRAIN.PRINT_FREQ`` batches (every batch when the epoch has fewer)."""
        self.set_model_mode("train")
        losses = MetricMeter()
        batch_time = AverageMeter()
        data_time = AverageMeter()
        self.num_batches = len(self.train_loader_x)
        print_freq = self.cfg.TRAIN.PRINT_FREQ

        end = time.time()
        for self.batch_idx, batch in enumerate(self.train_loader_x):  # noqa: B020  (as Dassl: hooks read it)
            data_time.update(time.time() - end)
            loss_summary = self.forward_backward(batch)
            batch_time.update(time.time() - end)
            losses.update(loss_summary)

            meet_freq = print_freq > 0 and (self.batch_idx + 1) % print_freq == 0
            if meet_freq or self.num_batches < print_freq:
                nb_remain = (self.num_batches - self.batch_idx - 1) + (
                    self.max_epoch - self.epoch - 1
                ) * self.num_batches
                eta = str(datetime.timedelta(seconds=int(batch_time.avg * nb_remain)))
                print(" ".join([
                    f"epoch [{self.epoch + 1}/{self.max_epoch}]",
                    f"batch [{self.batch_idx + 1}/{self.num_batches}]",
                    f"time {batch_time.val:.3f} ({batch_time.avg:.3f})",
                    f"data {data_time.val:.3f} ({data_time.avg:.3f})",
                    f"{losses}",
                    f"lr {self.get_current_lr():.4e}",
                    f"eta {eta}",
                ]))

            n_iter = self.epoch * self.num_batches + self.batch_idx
            for name, meter in losses.meters.items():
                self.write_scalar("train/" + name, meter.avg, n_iter)
            self.write_scalar("train/lr", self.get_current_lr(), n_iter)
            end = time.time()

    def parse_batch_train(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (batch["img"].to(self.device), batch["label"].to(self.device),
                batch["domain"].to(self.device))
