"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023).

Deep language prompts in the first ``PROMPT_DEPTH`` layers of CLIP's text tower, each coupled
to the same layer of the ViT by a linear projection (``selftpt.maple_prompts``), trained with
cross-entropy on labelled few-shot images as CoOp. The paper's setting is the original code's
``vit_b16_c2_ep5_batch4_2ctx``: 2 context tokens from "a photo of a", depth 9, SGD lr 0.0035,
5 epochs, batch 4, cosine with one constant warm-up epoch at 1e-5, fp16 on a GPU.

Checkpoints are the original's: ``MultiModalPromptLearner/model.pth.tar-<epoch>`` whose
state_dict keys are ``prompt_learner.ctx``, ``prompt_learner.proj.*``,
``prompt_learner.compound_prompts_text.<i>``, ``prompt_learner.compound_prompt_projections.<i>.*``
(and the class-name buffers, rebuilt rather than loaded), so released MaPLe weights load with
``--model-dir``. Here only the prompt learner is saved; the original also saved the frozen CLIP,
whose keys are ignored on loading.

Precision: the tuned tensors are fp32 master copies in every precision and fp16/amp steps go
through a GradScaler (``selftpt/precision.py``); the original trained fp16 tensors directly.
"""
from __future__ import annotations

from typing import Any

from selftpt.deep_prompts import require_vit_backbone
from selftpt.maple_prompts import (
    CHECKPOINT_NAME,
    MaPLeCheckpoint,
    MaPLeCLIP,
    MultiModalPromptLearner,
    effective_depth,
)
from selftpt.toolbox import (
    TRAINER_REGISTRY,
    build_lr_scheduler,
    build_optimizer,
)
from selftpt.trainer_base import PromptedClipTrainer


class MaPLeModelMixin:
    """Building the MaPLe model from a ``TRAINER.<NODE>`` with N_CTX, CTX_INIT, PROMPT_DEPTH
    (shared with MaPLe+TPT and PromptAlign, which tune the same prompts at test time)."""

    def check_cfg(self, cfg: Any) -> None:
        super().check_cfg(cfg)
        require_vit_backbone(type(self).__name__, cfg.MODEL.BACKBONE.NAME)  # a known ResNet / unfit tower, unloaded

    def build_maple_model(self, grad_checkpoint: bool = False) -> MaPLeCLIP:
        node, name = self.node, f"TRAINER.{self.CFG_NODE}"
        clip_model = self.load_clip_model()
        require_vit_backbone(type(self).__name__, self.cfg.MODEL.BACKBONE.NAME, clip_model.visual)
        depth = effective_depth(node.PROMPT_DEPTH, clip_model, name)
        learner = MultiModalPromptLearner(self.classnames, clip_model, n_ctx=node.N_CTX, ctx_init=node.CTX_INIT,
                                          depth=depth, config_node=name)
        print(f'MaPLe prompts: {learner.n_ctx} context tokens from "{learner.prompt_prefix}", layers '
              f"0..{depth - 1} of both towers")
        model = MaPLeCLIP(learner, clip_model, grad_checkpoint=grad_checkpoint)
        self.freeze_except(model, ("prompt_learner",))
        self.checkpoint_module = MaPLeCheckpoint(learner)
        self.load_init_weights(self.checkpoint_module)
        return model.to(self.device)


@TRAINER_REGISTRY.register()
class MaPLe(MaPLeModelMixin, PromptedClipTrainer):
    """Learns coupled language and vision prompts with cross-entropy on labelled few-shot images."""

    CFG_NODE = "MAPLE"
    TABLE_ORDER = 42
    REFERENCE_CONFIGS = {"MaPLe": ("vit_b16_c2_ep5_batch4_2ctx", ())}

    def build_model(self) -> None:
        self.model = self.build_maple_model()
        self.optim = build_optimizer(self.checkpoint_module, self.cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
        self.register_model(CHECKPOINT_NAME, self.checkpoint_module, self.optim, self.sched)
        self.scaler = self.make_grad_scaler()
