"""PromptAlign: test-time prompting with distribution alignment (Abdul Samadh et al., NeurIPS 2023).

MaPLe+TPT (``trainers/maple_tpt.py``: a trained MaPLe model, every prompt parameter tuned per
image by one AdamW step, reset per image) whose loss adds the alignment of the test views' token
statistics to the source data's (``selftpt/token_stats.py``):

    L = H(mean prediction of the confident views)
        + ALIGN_WEIGHT / (ALIGN_LAYER_TO - ALIGN_LAYER_FROM)
          * sum_l [0.5 |mu_l(views) - mu_l(source)|_1 + 0.5 |var_l(views) - var_l(source)|_1]

over the ViT layers l = ALIGN_LAYER_FROM .. ALIGN_LAYER_TO - 2, the statistics of the views being
taken over the ALIGN_SELECTION_P most confident of them. The layer range and the divisor are
those of the released code (``jameelhassan/PromptAlign``, ``distr_align_loss``, whose loop
stops one layer before ALIGN_LAYER_TO), so its published settings mean the same here.

Source statistics: mean and variance, over the source images (ImageNet in the paper, "" = the
dataset the loaded MaPLe model was trained on, read from its ``results.json``), of the tokens of
the aligned layers of the clean (resize + centre-crop) images, with the loaded prompts. They are
computed once, by the first PromptAlign run that needs them, and stored next to the model
(``<model-dir>/MultiModalPromptLearner/promptalign_source_stats-<epoch>.pt``; without
``--model-dir`` in the run's folder; ``SOURCE_STATS`` names another path); later runs reuse the
file, and one made for other settings (weights, prompts, images, transform, layers) is refused in
one line. How the released statistics were computed is not in the released code: this procedure
is our reading of the paper ([ours] keys in ``selftpt/config.py``, ``docs/method.md``).
"""
from __future__ import annotations

import json
import os.path as osp
from pathlib import Path
from typing import Any

import torch

from selftpt.deep_prompts import vision_depth
from selftpt.errors import ConfigError
from selftpt.losses import marginal_entropy, select_confident
from selftpt.maple_prompts import CHECKPOINT_NAME
from selftpt.results import RESULTS_FILENAME
from selftpt.safe_data import SafeDatasetWrapper, drop_skipped
from selftpt.token_stats import (
    alignment_loss,
    load_or_compute_source_stats,
    recording_tokens,
    source_moments,
    stats_path_for,
    tensor_digest,
    token_moments,
)
from selftpt.toolbox import TRAINER_REGISTRY, build_data_loader, build_dataset, build_transform
from trainers.maple_tpt import MaPLeTPT


@TRAINER_REGISTRY.register()
class PromptAlign(MaPLeTPT):
    """MaPLe+TPT with the alignment of per-layer token statistics to the source's."""

    CFG_NODE = "PROMPTALIGN"
    TABLE_ORDER = 54
    PROMPTED_NAME = "PromptAlign"  # the paper's row (parse_results.py --reference matches it)
    REFERENCE_CONFIGS = {"PromptAlign": ("dg_vit_b16_c2_ep5_batch4_2ctx_cross_datasets", ())}

    def build_model(self) -> None:
        super().build_model()
        node = self.node
        layers = vision_depth(self.model.visual)
        wanted = list(range(node.ALIGN_LAYER_FROM, node.ALIGN_LAYER_TO - 1))
        self.align_layers = [layer for layer in wanted if layer < layers]
        if node.ALIGN and not self.align_layers:
            raise ConfigError(
                f"TRAINER.PROMPTALIGN.ALIGN_LAYER_FROM {node.ALIGN_LAYER_FROM} / ALIGN_LAYER_TO "
                f"{node.ALIGN_LAYER_TO} align no layer of this {layers}-layer ViT (layers FROM..TO-2 are "
                f"aligned, as in the released code); set ALIGN_LAYER_TO >= FROM + 2 and FROM < {layers}")
        if self.align_layers != wanted:
            print(f"Note: aligning layers {self.align_layers} of the {layers} this ViT has "
                  f"(ALIGN_LAYER_FROM..ALIGN_LAYER_TO-2 = {wanted})")
        self.align_weight = node.ALIGN_WEIGHT / (node.ALIGN_LAYER_TO - node.ALIGN_LAYER_FROM)
        self.stats_path: Path | None = None
        self._model_dir, self._loaded_epoch = "", None  # set by load_model (--model-dir)

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        super().load_model(directory, epoch)
        if directory:
            self._loaded_epoch = (getattr(self, "_loaded_model", None) or {}).get("epoch")
            self._model_dir = directory

    # --------------------------------------------------------------- source statistics
    def source_dataset(self) -> str:
        """SOURCE_DATASET, else the dataset the loaded model was trained on, else this run's."""
        node = self.node
        if node.SOURCE_DATASET:
            return node.SOURCE_DATASET
        results = Path(self._model_dir) / RESULTS_FILENAME if self._model_dir else None
        if results is not None and results.is_file():
            try:
                dataset = json.loads(results.read_text()).get("dataset", "")
            except (ValueError, AttributeError):
                dataset = ""
            if dataset:
                return dataset
        print(f"Note: TRAINER.PROMPTALIGN.SOURCE_DATASET is empty and no trained model names its dataset; "
              f"source statistics from {self.cfg.DATASET.NAME}'s {node.SOURCE_SPLIT} split")
        return self.cfg.DATASET.NAME

    def source_cfg(self) -> Any:
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATASET.NAME = self.source_dataset()
        cfg.DATASET.SUBSAMPLE_CLASSES = "all"
        cfg.freeze()
        return cfg

    def stats_fingerprint(self, cfg: Any) -> dict[str, Any]:
        """Everything the source statistics depend on."""
        node, learner = self.node, self.model.prompt_learner
        visual = self.model.visual
        return {
            "backbone": tensor_digest(visual.state_dict().items()),
            "precision": self.precision,
            "prompts": tensor_digest((k, v) for k, v in learner.named_parameters()),
            "source_dataset": cfg.DATASET.NAME,
            "source_split": node.SOURCE_SPLIT,
            "num_shots": int(cfg.DATASET.NUM_SHOTS),
            "max_images": int(node.SOURCE_MAX_IMAGES),
            "input": [list(cfg.INPUT.SIZE), cfg.INPUT.INTERPOLATION, list(cfg.INPUT.PIXEL_MEAN),
                      list(cfg.INPUT.PIXEL_STD)],
            "layers": list(self.align_layers),
        }

    def _source_batches(self, cfg: Any):
        node = self.node
        dataset = build_dataset(cfg)
        split = {"train": dataset.train_x, "val": dataset.val, "test": dataset.test}[node.SOURCE_SPLIT]
        items = list(split or [])
        if node.SOURCE_MAX_IMAGES > 0:
            items = items[:node.SOURCE_MAX_IMAGES]
        loader = build_data_loader(cfg, sampler_type="SequentialSampler", data_source=items,
                                   batch_size=cfg.DATALOADER.TEST.BATCH_SIZE, tfm=build_transform(cfg, is_train=False),
                                   is_train=False, dataset_wrapper=SafeDatasetWrapper)
        print(f"PromptAlign: computing source token statistics on {len(items)} {cfg.DATASET.NAME} "
              f"{node.SOURCE_SPLIT} images (once; stored in {self.stats_path})")
        skipped: set[str] = set()
        for batch in loader:
            yield drop_skipped(batch, skipped)["img"].to(self.device)

    def source_statistics(self) -> dict[str, Any]:
        """The stored statistics, computed first if no file exists (see the module docstring)."""
        node = self.node
        self.stats_path = Path(node.SOURCE_STATS) if node.SOURCE_STATS else \
            stats_path_for(self._model_dir, CHECKPOINT_NAME, self._loaded_epoch, self.output_dir)
        cfg = self.source_cfg()
        fingerprint = self.stats_fingerprint(cfg)

        def encode(images: torch.Tensor) -> None:
            with self.autocast():
                self.model.image_encoder(images.type(self.model.dtype))

        def compute():
            with torch.no_grad():
                return source_moments(encode, self.model.visual, self.align_layers, self._source_batches(cfg))

        payload, computed = load_or_compute_source_stats(self.stats_path, fingerprint, compute)
        if not computed:
            print(f"PromptAlign: source token statistics from {self.stats_path} "
                  f"({payload['num_images']} {fingerprint['source_dataset']} images)")
        self.stats_computed = computed
        return payload

    # ------------------------------------------------------------------------ evaluation
    def prepare_for_test(self) -> None:
        super().prepare_for_test()
        node = self.node
        self.result_extra.update({"align": bool(node.ALIGN), "tpt_loss": bool(node.TPT_LOSS),
                                  "align_layers": list(self.align_layers), "align_weight": self.align_weight})
        if not node.ALIGN:
            return
        self.reset()  # statistics of the loaded prompts, never of a tuned state
        payload = self.source_statistics()
        self.source_mean = payload["mean"].to(self.device)
        self.source_var = payload["var"].to(self.device)
        self.result_extra.update({"source_stats": osp.abspath(self.stats_path),
                                  "source_stats_computed": self.stats_computed,
                                  "source_images": payload["num_images"],
                                  "source_dataset": payload["fingerprint"]["source_dataset"]})

    def choose_views(self, logits: torch.Tensor) -> None:
        """The entropy term's views (SELECTION_P) and the statistics' views (ALIGN_SELECTION_P),
        both the lowest-entropy ones, chosen once; the step encodes their union."""
        super().choose_views(logits)
        self.align_selected = select_confident(logits.detach(), self.node.ALIGN_SELECTION_P)
        self.rows = torch.unique(torch.cat([self.selected, self.align_selected]))  # sorted
        self.entropy_rows = torch.searchsorted(self.rows, self.selected)
        self.align_rows = torch.searchsorted(self.rows, self.align_selected)

    def loss_on_views(self, views: torch.Tensor) -> torch.Tensor:
        node = self.node
        layers = self.align_layers if node.ALIGN else []
        with recording_tokens(self.model.visual, layers) as tokens:
            logits = self.model(views[self.rows])
        loss = marginal_entropy(logits[self.entropy_rows]) if node.TPT_LOSS else logits.new_zeros((), dtype=torch.float)
        if node.ALIGN:
            moments = {layer: token_moments(tokens[layer], self.align_rows) for layer in layers}
            loss = loss + alignment_loss(moments, self.source_mean, self.source_var, layers, self.align_weight)
        return loss
