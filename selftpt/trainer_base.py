"""What every CLIP trainer of this project shares: loading CLIP, precision, the evaluation
loop (accuracy, macro-F1 and calibration), and CoOp-style checkpoint loading.

Trainers subclass ``ClipTrainer`` and stay thin: ``build_model``, ``forward_backward`` and,
for test-time methods, ``prepare_for_test`` / ``model_inference``.
"""
from __future__ import annotations

import copy
import os
import os.path as osp
import time
from collections import OrderedDict
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from selftpt.calibration import expected_calibration_error
from selftpt.clip_loader import load_clip
from selftpt.config import validate_cfg
from selftpt.engine.checkpoint import IncompleteCheckpointError
from selftpt.errors import UserError
from selftpt.feature_cache import cached_eval_logits
from selftpt.precision import autocast, make_grad_scaler, resolve_precision
from selftpt.prompt_learner import PromptLearner
from selftpt.safe_data import drop_skipped
from selftpt.shards import Shard, ShardError, shard_loader
from selftpt.text_encoder import encode_in_chunks
from selftpt.toolbox import (
    DataManager,
    TrainerX,
    build_lr_scheduler,
    build_optimizer,
    compute_accuracy,
    load_checkpoint,
    load_pretrained_weights,
)
from selftpt.views import ItemSeededDatasetWrapper

# Buffers that depend on the class names: rebuilt for the current classes, never loaded.
CLASS_DEPENDENT_KEYS = ("token_prefix", "token_suffix", "tokenized_prompts")


class CheckpointError(UserError):
    """A checkpoint that is missing or does not fit the model built from the config."""


class ClipTrainer(TrainerX):
    """Base of the CLIP trainers; ``CFG_NODE`` names the ``TRAINER.<NODE>`` config sub-node."""

    CFG_NODE = "COOP"
    # What the trainer is, declared once here and read from the registry
    # (selftpt.trainer_facts) by sweeps, tables, result collection, the efficiency benchmark,
    # the GPU check and the tests; a subclass overrides what differs.
    TRAINS = True  # False: nothing to train, train.py evaluates directly
    DETERMINISTIC = False  # the same result for every seed: sweeps run it once, unseeded
    PER_IMAGE = False  # tunes on each test image: timed at batch 1, its test set can be sharded
    TABLE_ORDER = 1000  # rank of its rows in tables; rows named by TRAINER.METHOD_NAME follow their trainer's
    # Table name of its sweep runs that start from another method's prompts (PROMPTS_FROM), as the
    # paper names that row; "" = "<Trainer>+<source trainer>" (TPT from CoOp's prompts: TPT+CoOp).
    PROMPTED_NAME = ""
    # Display name -> (config stem under configs/trainers/<Trainer>/, extra KEY VALUE options):
    # the paper settings the efficiency benchmark times and the GPU check runs, one per row
    # either tool reports (a variant such as Self-TPT-v is its own entry). Empty: neither runs it.
    REFERENCE_CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {}
    # What PREC "auto" means on CUDA: CoOp's fp16 weights; TPT uses "amp" (fp32 + autocast).
    # Other devices run fp32 under "auto"; see selftpt/precision.py for the whole policy.
    AUTO_CUDA_PRECISION = "fp16"

    def __init__(self, cfg: Any) -> None:
        # What the run records beside its metrics: results.json's "extra" (adaptation time,
        # CPT losses, ...). Set before Dassl's __init__ so build_model may replace or fill it.
        self.result_extra: dict[str, Any] = {}
        super().__init__(cfg)

    @property
    def node(self) -> Any:
        return self.cfg.TRAINER[self.CFG_NODE]

    @property
    def classnames(self) -> list[str]:
        return list(self.dm.dataset.classnames)

    def check_cfg(self, cfg: Any) -> None:
        """Dassl's hook: the same validation ``train.py`` runs before any work (``validate_cfg``)."""
        validate_cfg(cfg, trains=self.TRAINS)

    # ------------------------------------------------------------------------------ data
    def custom_test_transform(self) -> Any:
        """A test transform replacing Dassl's (e.g. TPT's 64 views); None keeps Dassl's."""
        return None

    def build_data_loader(self, cfg: Any = None) -> None:
        """Dassl's ``SimpleTrainer.build_data_loader`` with ``custom_test_transform`` and a
        wrapper that reports (or, with DATASET.SKIP_CORRUPT_IMAGES, skips) unreadable images and
        draws each test item's random views from its own seed (``views.ItemSeededDatasetWrapper``).

        Args:
            cfg: a variant of ``self.cfg`` for the loaders (e.g. another test batch size).
        """
        dm = DataManager(cfg or self.cfg, custom_tfm_test=self.custom_test_transform(),
                         dataset_wrapper=ItemSeededDatasetWrapper)
        self.dm = dm
        shard = Shard.parse((cfg or self.cfg).TEST.SHARD)
        if shard is not None and not shard.items(len(dm.test_loader.dataset), dm.test_loader.batch_size):
            batches = len(dm.test_loader)
            raise ShardError(f"TEST.SHARD {shard}: the test set has only {batches} batch(es) of "
                             f"{dm.test_loader.batch_size}, so shard {shard.index} would be empty; use at most "
                             f"{batches} shards")
        self.train_loader_x, self.train_loader_u = dm.train_loader_x, dm.train_loader_u
        self.val_loader, self.test_loader = dm.val_loader, dm.test_loader
        self.num_classes, self.num_source_domains = dm.num_classes, dm.num_source_domains
        self.lab2cname = dm.lab2cname

    def _batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) on the device, without the placeholders of skipped images."""
        batch = drop_skipped(batch, self.skipped_images)
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def parse_batch_train(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(batch)

    def parse_batch_test(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(batch)

    @property
    def skipped_images(self) -> set[str]:
        """Paths of unreadable images skipped so far (DATASET.SKIP_CORRUPT_IMAGES)."""
        if not hasattr(self, "_skipped_images"):
            self._skipped_images: set[str] = set()
        return self._skipped_images

    # ----------------------------------------------------------------------------- model
    def load_clip_model(self) -> nn.Module:
        """Load the configured CLIP backbone on CPU in the run's precision (``selftpt.precision``)."""
        cfg = self.cfg
        self.precision = resolve_precision(self.node.PREC, self.device, self.AUTO_CUDA_PRECISION)
        name = cfg.MODEL.BACKBONE.NAME
        print(f"Loading CLIP (backbone: {name}, precision: {self.precision})")
        clip_model = load_clip(name, cfg.MODEL.BACKBONE.PATH, device="cpu", precision=self.precision)
        if getattr(clip_model, "preprocess", None) is not None:  # open_clip: size, mean/std, interpolation
            from selftpt.open_clip_backend import check_input
            check_input(clip_model.preprocess, cfg.INPUT, name)
        resolution = clip_model.visual.input_resolution
        if tuple(cfg.INPUT.SIZE) != (resolution, resolution):
            raise UserError(
                f"INPUT.SIZE is {tuple(cfg.INPUT.SIZE)} but backbone {name} expects "
                f"({resolution}, {resolution}); set INPUT.SIZE [{resolution}, {resolution}]"
            )
        return clip_model

    def build_prompt_learner(self, clip_model: nn.Module) -> PromptLearner:
        """CoOp's ``PromptLearner`` from this trainer's node (N_CTX, CTX_INIT, CSC, position)."""
        node = self.node
        return PromptLearner(
            self.classnames, clip_model, n_ctx=node.N_CTX, ctx_init=node.CTX_INIT, csc=node.get("CSC", False),
            class_token_position=node.get("CLASS_TOKEN_POSITION", "end"), config_node=f"TRAINER.{self.CFG_NODE}",
        )

    @staticmethod
    def freeze_except(model: nn.Module, trainable: tuple[str, ...]) -> list[str]:
        """Freeze every parameter whose name does not start with one of ``trainable``."""
        names = []
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(trainable))
            if param.requires_grad:
                names.append(name)
        print(f"Parameters to be updated: {sorted(names)}")
        return names

    def load_init_weights(self, module: nn.Module) -> None:
        """MODEL.INIT_WEIGHTS (Dassl's key): start ``module`` from the file's tensors that fit it."""
        if self.cfg.MODEL.INIT_WEIGHTS:
            load_pretrained_weights(module, self.cfg.MODEL.INIT_WEIGHTS)

    def setup_prompt_training(self, model: nn.Module) -> None:
        """CoOp's recipe around a model with a ``prompt_learner``: freeze everything else, load
        MODEL.INIT_WEIGHTS, move to the device, register ``prompt_learner`` with Dassl's
        optimiser and scheduler, and make the GradScaler for amp."""
        cfg = self.cfg
        self.model = model
        self.freeze_except(model, ("prompt_learner",))
        self.load_init_weights(model.prompt_learner)
        model.to(self.device)
        self.optim = build_optimizer(model.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", model.prompt_learner, self.optim, self.sched)
        self.scaler = self.make_grad_scaler()

    def make_grad_scaler(self, init_scale: float = 2.0 ** 10) -> torch.amp.GradScaler | None:
        """Dynamic loss scaling in fp16 and amp (tuned parameters are fp32 master copies).

        Prompt gradients are large next to a network's weight gradients: torch's default scale
        (2^16) overflows fp16 at first and would skip the first steps of a short run.
        """
        return make_grad_scaler(self.device, self.precision, init_scale)

    def autocast(self) -> torch.autocast:
        """Autocast to float16 when PREC is amp (on any device); a no-op context otherwise."""
        return autocast(self.device, self.precision)

    def step(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
        """Backward and update of every registered model; through the GradScaler in fp16/amp
        (a step whose gradients overflowed is skipped and the scale backs off)."""
        if scaler is None:
            self.model_backward_and_update(loss)
            return
        self.detect_anomaly(loss)
        self.model_zero_grad()
        scaler.scale(loss).backward()
        for name in self.get_model_names():
            scaler.step(self._optims[name])
        scaler.update()

    def forward_backward(self, batch: dict) -> dict[str, float]:
        """One cross-entropy step of ``self.model``'s logits on a labelled batch (CoOp, CoCoOp,
        MaPLe); the learning rate follows the schedule per epoch, as in Dassl's trainers.
        Trainers with another objective (Self-TPT, PromptSRC) override it."""
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels)
        self.step(loss, scaler=self.scaler)
        summary = {"loss": loss.item(), "acc": compute_accuracy(logits, labels)[0].item()}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    # ------------------------------------------------------------------------ evaluation
    def prepare_for_test(self) -> None:
        """Hook run before the evaluation loop, with gradients enabled (e.g. adaptation)."""

    def progress_postfix(self) -> dict[str, str]:
        """Extra fields for the evaluation progress bar, beside the running accuracy."""
        return {}

    def image_encoder_for_cache(self) -> nn.Module | None:
        """The frozen image encoder behind ``encode_images``, when ``test`` may reuse cached
        image features (``TEST.FEATURE_CACHE``); None (default) = not cacheable (the method
        tunes or augments per image). Trainers that return a module also implement
        ``encode_images(images) -> features`` (L2-normalised CLIP image features) and
        ``logits_from_features(features)``; their ``model_inference`` is the composition.
        The module's digest is the cache key's: with deep vision prompts, return a module that
        holds them (``selftpt.deep_prompts.PromptedImageEncoder``)."""
        return None

    def eval_logits(self, split: str, data_loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, labels) of each test batch, through the image-feature cache when enabled."""
        cache_dir = self.cfg.TEST.FEATURE_CACHE
        if cache_dir and self.cfg.TEST.SHARD:
            print("TEST.FEATURE_CACHE: not used for a shard (the cache holds whole test sets)")
        elif cache_dir and self.image_encoder_for_cache() is not None:
            yield from cached_eval_logits(self, split, data_loader, cache_dir)
            return
        elif cache_dir:
            print(f"TEST.FEATURE_CACHE: {type(self).__name__} does not use the cache (its image side "
                  "is not a fixed encoder pass)")
        for batch in data_loader:
            images, labels = self.parse_batch_test(batch)
            yield self.model_inference(images), labels

    def test(self, split: str | None = None) -> float:
        """Dassl's evaluation loop, plus ECE and wall times; keeps the full metrics in ``self.test_result``.

        Timing: ``prepare_seconds`` is the one-time cost per class set (text features; Self-TPT's
        class-name adaptation), ``eval_seconds`` the loop over the images, data loading and
        test-time views included, i.e. what a user waits for.

        With ``TEST.SHARD i/n`` only that shard of the test split is evaluated
        (``selftpt.shards``) and its per-image logits are kept in ``test_result["predictions"]``.
        """
        self.set_model_mode("eval")
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        if split == "val" and self.val_loader is not None:
            data_loader = self.val_loader
        else:
            split, data_loader = "test", self.test_loader
        shard = Shard.parse(self.cfg.TEST.SHARD)
        if shard is not None:
            num_items = len(data_loader.dataset)
            data_loader, items = shard_loader(data_loader, shard)
            print(f"Shard {shard}: items {items.start}-{items.stop - 1} of {num_items}")
            kept_logits, kept_labels = [], []
        started = time.perf_counter()
        self.prepare_for_test()
        prepared = time.perf_counter()
        print(f"Evaluate on the *{split}* set")
        confidences, hits = [], []
        n_correct = n_seen = 0
        with torch.no_grad():
            bar = tqdm(self.eval_logits(split, data_loader), total=len(data_loader), desc=f"eval {split}",
                       dynamic_ncols=True)
            for logits, labels in bar:
                if shard is not None:
                    kept_logits.append(logits.cpu())
                    kept_labels.append(labels.cpu())
                self.evaluator.process(logits, labels)
                probs = F.softmax(logits.float(), dim=-1)
                conf, pred = probs.max(dim=-1)
                confidences.append(conf.cpu())
                hits.append((pred == labels).cpu())
                n_correct += int(hits[-1].sum())
                n_seen += hits[-1].numel()
                bar.set_postfix(acc=f"{100.0 * n_correct / n_seen:.1f}%", **self.progress_postfix(),
                                refresh=False)
        finished = time.perf_counter()
        metrics = OrderedDict(self.evaluator.evaluate())
        ece = expected_calibration_error(torch.cat(confidences), torch.cat(hits),
                                         n_bins=self.cfg.TEST.ECE_BINS)
        print(f"* ece: {ece:.1f}%")
        metrics["ece"] = ece
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.write_scalar(f"{split}/{key}", value, self.epoch)
        timing = {"prepare_seconds": round(prepared - started, 3), "eval_seconds": round(finished - prepared, 3),
                  "seconds_per_image": round((finished - prepared) / max(n_seen, 1), 5)}
        print(f"* time: {timing['prepare_seconds']:.1f}s one-time, {timing['eval_seconds']:.1f}s for {n_seen} "
              f"images ({1000 * timing['seconds_per_image']:.1f} ms per image)")
        self.test_result = {"split": split, "metrics": metrics, "num_images": n_seen, "timing": timing}
        if shard is not None:
            self.test_result["predictions"] = {"logits": torch.cat(kept_logits), "labels": torch.cat(kept_labels),
                                               "items": (items.start, items.stop), "num_items": num_items}
        if self.skipped_images:
            print(f"Skipped {len(self.skipped_images)} unreadable images (DATASET.SKIP_CORRUPT_IMAGES), "
                  f"e.g. {sorted(self.skipped_images)[0]}")
            self.test_result["skipped_images"] = sorted(self.skipped_images)
        return list(metrics.values())[0]

    # ----------------------------------------------------------------------- checkpoints
    def training_state(self) -> dict:
        """What a resumed run needs besides the registered models, optimisers, schedulers and
        RNG states (saved in every checkpoint by ``save_model``): the best val result so far
        (``TEST.FINAL_MODEL best_val``), the GradScaler's loss scale in fp16/amp, and what
        training recorded for ``results.json`` (``result_extra``: a run resumed after its last
        epoch, e.g. a shard of its test, records what the unbroken run records).
        Trainers with more state extend the dict (``super().training_state()``)."""
        state: dict[str, Any] = {"best_result": float(self.best_result),
                                 "result_extra": copy.deepcopy(self.result_extra)}
        scaler = getattr(self, "scaler", None)
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        return state

    def load_training_state(self, state: dict) -> None:
        """Restore ``training_state`` (keys it lacks keep their fresh values)."""
        if "best_result" in state:
            self.best_result = state["best_result"]
        self.result_extra.update(copy.deepcopy(state.get("result_extra", {})))
        scaler = getattr(self, "scaler", None)
        if scaler is not None and state.get("grad_scaler"):  # {} = saved by a disabled scaler
            scaler.load_state_dict(state["grad_scaler"])

    def resume_model_if_exist(self, directory: str) -> int:
        """Resume as the toolbox's trainer does (models, optimisers, schedulers, RNGs and
        ``training_state``) and remember it for ``model_record``; returns the start epoch."""
        try:
            start_epoch = super().resume_model_if_exist(directory)
        except IncompleteCheckpointError as exc:
            raise CheckpointError(str(exc)) from None
        if self.cfg.TEST.SHARD and self.cfg.TEST.FINAL_MODEL == "best_val":  # loaded from the shard's folder
            raise ShardError(f"TEST.SHARD {self.cfg.TEST.SHARD} with TEST.FINAL_MODEL best_val: shard the "
                             "evaluation of the best model instead (--eval-only --model-dir RUN --load-epoch E)")
        if self.cfg.TEST.SHARD and start_epoch < self.max_epoch:  # each shard would train a model of its own
            raise ShardError(f"TEST.SHARD {self.cfg.TEST.SHARD} evaluates a trained model, but {directory} holds "
                             f"{start_epoch} of {self.max_epoch} epochs: train it first (the same command "
                             "without TEST.SHARD, with TEST.NO_TEST True), then run each shard with --resume "
                             "pointing at that folder")
        self._resumed_from = {"directory": osp.abspath(directory), "epoch": start_epoch} if start_epoch else None
        self._trained_in_run = True
        return start_epoch

    def model_record(self) -> dict[str, Any]:
        """Which model the evaluation used, for ``results.json``'s ``model`` key.

        ``source`` is ``trained`` (trained in this run; ``resumed_from`` names the checkpoint
        it continued, if any), ``checkpoint`` (loaded by ``load_model``: ``--model-dir``) or
        ``none`` (a training-free method evaluated without trained weights).
        """
        loaded = getattr(self, "_loaded_model", None)
        if getattr(self, "_trained_in_run", False):
            if loaded is not None:  # TEST.FINAL_MODEL best_val: the best checkpoint was reloaded
                files, epoch = loaded["files"], loaded["epoch"]
            else:  # the last epoch's model, in memory and saved as model.pth.tar-<MAX_EPOCH>
                epoch = self.max_epoch
                files = {name: osp.abspath(osp.join(self.output_dir, name, f"model.pth.tar-{epoch}"))
                         for name in self.get_model_names()}
                files = {name: path for name, path in files.items() if osp.isfile(path)}
            return {"source": "trained", "directory": osp.abspath(self.output_dir), "epoch": epoch,
                    "files": files, "resumed_from": getattr(self, "_resumed_from", None)}
        if loaded is not None:
            return loaded
        return {"source": "none",
                "note": f"{type(self).__name__} is training-free; no trained weights were loaded"}

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        """Load the registered models from ``directory`` as CoOp does, with clear errors.

        The class-name buffers are dropped (the current class set is kept), a missing file
        names the path it looked for, and a tensor of another shape names both shapes.
        ``epoch=None`` takes ``model-best.pth.tar`` if present, else the latest checkpoint.
        A trainer without registered models (zero-shot CLIP) says the folder is not used.
        """
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given")
            return
        if not self.get_model_names():  # e.g. zero-shot CLIP: no weights to load into
            print(f"Note: {type(self).__name__} has no trained weights; --model-dir {directory} is not used")
            return
        files: dict[str, str] = {}
        epochs: list[int | None] = []
        for name in self.get_model_names():
            path = self._checkpoint_path(directory, name, epoch)
            checkpoint = load_checkpoint(path)
            state_dict = {k: v for k, v in checkpoint["state_dict"].items()
                          if k.rsplit(".", 1)[-1] not in CLASS_DEPENDENT_KEYS}
            own = self._models[name].state_dict()
            for key, value in state_dict.items():
                if key in own and own[key].shape != value.shape:
                    raise CheckpointError(
                        f"Checkpoint {path} holds {name}.{key} of shape {tuple(value.shape)} but the model "
                        f"built from this config expects {tuple(own[key].shape)} (check N_CTX, CTX_INIT, "
                        f"CSC, HEAD and the backbone)"
                    )
            print(f'Load {path} to {name} (epoch={checkpoint.get("epoch")})')
            missing = [k for k in own if k not in state_dict and k.rsplit(".", 1)[-1] not in CLASS_DEPENDENT_KEYS]
            if missing:
                raise CheckpointError(f"Checkpoint {path} lacks {missing} needed by {name}")
            self._models[name].load_state_dict(state_dict, strict=False)
            files[name] = osp.abspath(path)
            epochs.append(checkpoint.get("epoch"))
        self._loaded_model = {"source": "checkpoint", "directory": osp.abspath(directory),
                              "epoch": epochs[0], "files": files}

    @staticmethod
    def _checkpoint_path(directory: str, name: str, epoch: int | None) -> str:
        folder = osp.join(directory, name)
        if epoch is not None:
            path = osp.join(folder, f"model.pth.tar-{epoch}")
        elif osp.isfile(osp.join(folder, "model-best.pth.tar")):
            path = osp.join(folder, "model-best.pth.tar")
        elif osp.isfile(osp.join(folder, "checkpoint")):
            with open(osp.join(folder, "checkpoint")) as f:
                path = osp.join(folder, f.readline().strip())
        else:
            path = osp.join(folder, "model-best.pth.tar")
        if not osp.isfile(path):
            found = sorted(os.listdir(folder)) if osp.isdir(folder) else []
            hint = f" (found: {', '.join(found)})" if found else " (the folder has no checkpoints)"
            raise CheckpointError(
                f"No checkpoint at {path}{hint}; check --model-dir and --load-epoch"
            )
        return path


class PromptedClipTrainer(ClipTrainer):
    """A trainer whose ``self.model`` is a ``PromptedCLIP`` and whose evaluation classifies
    with text features computed once (``self.eval_text_features``, set in
    ``prepare_for_test``): one image-encoder pass per image, so the feature cache applies."""

    def prepare_for_test(self) -> None:
        """The prompts are fixed during evaluation: encode the class prompts once, not per batch
        (``self.model.text_features(indices=...)``, in chunks of ``PROMPT_CHUNK`` classes)."""
        with torch.no_grad(), self.autocast():
            classes = torch.arange(self.model.prompt_learner.n_cls, device=self.device)
            self.eval_text_features = encode_in_chunks(lambda c: self.model.text_features(indices=c), classes)

    def image_encoder_for_cache(self) -> nn.Module | None:
        return self.model.image_encoder

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised image features."""
        with self.autocast():
            return self.model.encode_image(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.logits(features, self.eval_text_features)

    def model_inference(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.encode_images(images))
