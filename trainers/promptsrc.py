"""PromptSRC: self-regulating prompts (Khattak et al., ICCV 2023).

Independent deep vision and language prompts (IVLP, ``selftpt.promptsrc``) trained with
cross-entropy plus three self-consistency terms against frozen CLIP (muzairkhattak/PromptSRC,
``trainers/promptsrc.py``):

    L = CE + TEXT_LOSS_WEIGHT x L1(text, frozen text) + IMAGE_LOSS_WEIGHT x L1(image, frozen image)
           + KL(frozen logits || prompted logits)

The frozen text features are CLIP's, averaged over 60 ImageNet templates per class (textual
diversity; computed once per class set, when training starts); the frozen image features and
logits come from CLIP's own image encoder with no prompts on the same batch. After every epoch
the prompts are added to a running Gaussian-weighted sum (GPA: epoch e weighs N(e; GPA_MEAN,
GPA_STD), normalised over the epochs); at the end of the last epoch the prompts are replaced by
that sum, so the last checkpoint and the evaluation use the aggregated prompts, as the original.

Checkpoints follow the original: one Dassl model ``VLPromptLearner`` whose keys are the
original ``CustomCLIP``'s prompt keys (``prompt_learner.ctx``, ``image_encoder.VPT``,
``*.transformer.resblocks.<i>.VPT_shallow``); a released checkpoint (the whole ``CustomCLIP``)
loads with ``--model-dir``, its frozen CLIP weights ignored. Deep prompts need ViT layers (OpenAI's,
or open_clip's ViTs with class-token pooling): a ResNet backbone (the CPU benchmark's Bench-RN-*),
an EVA (timm) tower or an attentional pooler is refused in one line.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from selftpt.deep_prompts import require_vit_backbone
from selftpt.errors import UserError
from selftpt.promptsrc import (
    IVLPClip,
    IVLPPrompts,
    frozen_text_features,
    gaussian_epoch_weights,
    self_consistency_losses,
)
from selftpt.text_encoder import encode_in_chunks
from selftpt.toolbox import TRAINER_REGISTRY, build_lr_scheduler, build_optimizer, compute_accuracy
from selftpt.trainer_base import PromptedClipTrainer

MODEL_NAME = "VLPromptLearner"  # the original's registered model: checkpoints under VLPromptLearner/


def check_ivlp_cfg(cfg: Any, trainer: str) -> None:
    """One-line errors before any work: a backbone whose image tower cannot take deep prompts (a
    ResNet known by name, an open_clip tower by its config: ``require_vit_backbone``), or a CTX_INIT
    whose word count is not N_CTX_TEXT (the deep text tokens replace exactly the context's positions)."""
    require_vit_backbone(trainer, cfg.MODEL.BACKBONE.NAME)
    p = cfg.TRAINER.PROMPTSRC
    words = len(p.CTX_INIT.replace("_", " ").split())
    if words and words != p.N_CTX_TEXT:
        raise UserError(f'TRAINER.PROMPTSRC.CTX_INIT "{p.CTX_INIT}" has {words} words but '
                        f"TRAINER.PROMPTSRC.N_CTX_TEXT is {p.N_CTX_TEXT}; make them agree")


def build_ivlp(trainer: PromptedClipTrainer, grad_checkpoint: bool = False) -> IVLPClip:
    """Frozen CLIP of ``trainer``'s config with IVLP prompts from TRAINER.PROMPTSRC."""
    clip_model = trainer.load_clip_model()
    require_vit_backbone(type(trainer).__name__, trainer.cfg.MODEL.BACKBONE.NAME, clip_model.visual)
    p = trainer.cfg.TRAINER.PROMPTSRC
    prompts = IVLPPrompts(trainer.classnames, clip_model, p.N_CTX_TEXT, p.N_CTX_VISION, p.PROMPT_DEPTH_TEXT,
                          p.PROMPT_DEPTH_VISION, p.CTX_INIT)
    for tower, asked, used in (("text", p.PROMPT_DEPTH_TEXT, prompts.depth_text),
                               ("vision", p.PROMPT_DEPTH_VISION, prompts.depth_vision)):
        if used < asked:
            print(f"Note: {tower} prompt depth {asked} > the backbone's {used} layers: every layer is prompted")
    print(f"IVLP prompts: text {p.N_CTX_TEXT} tokens x {prompts.depth_text} layers "
          f'(context from "{p.CTX_INIT}"), vision {p.N_CTX_VISION} tokens x {prompts.depth_vision} layers')
    return IVLPClip(prompts, clip_model, grad_checkpoint=grad_checkpoint)


@TRAINER_REGISTRY.register()
class PromptSRC(PromptedClipTrainer):
    """IVLP prompts with self-consistency to frozen CLIP and Gaussian prompt aggregation."""

    CFG_NODE = "PROMPTSRC"
    TABLE_ORDER = 46  # after CoOp and CoCoOp, before the test-time methods
    REFERENCE_CONFIGS = {"PromptSRC": ("vit_b16_c2_ep20_batch4_4+4ctx", ())}

    def check_cfg(self, cfg: Any) -> None:
        super().check_cfg(cfg)
        check_ivlp_cfg(cfg, type(self).__name__)
        node = cfg.TRAINER.PROMPTSRC
        gaussian_epoch_weights(cfg.OPTIM.MAX_EPOCH, node.GPA_MEAN, node.GPA_STD)  # refuses weights that vanish

    def build_model(self) -> None:
        cfg, node = self.cfg, self.node
        print("Building IVLP CLIP")
        self.model = build_ivlp(self)
        self.freeze_except(self.model, ("prompts.",))
        self.model.to(self.device)
        prompts = self.model.prompts
        self.optim = build_optimizer(prompts, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model(MODEL_NAME, prompts, self.optim, self.sched)
        self.scaler = self.make_grad_scaler()
        self.gpa_weights = gaussian_epoch_weights(cfg.OPTIM.MAX_EPOCH, node.GPA_MEAN, node.GPA_STD)
        self.gpa_sum: dict[str, torch.Tensor] | None = None  # running sum of weight_e x prompts_e
        self.frozen_text: torch.Tensor | None = None  # template-averaged, computed when training starts

    # -------------------------------------------------------------------------- training
    def forward_backward(self, batch: dict) -> dict[str, float]:
        images, labels = self.parse_batch_train(batch)
        node, model = self.node, self.model
        if self.frozen_text is None:
            learner = model.prompt_learner
            self.frozen_text = frozen_text_features(model.text_encoder, learner._token_embedding, self.classnames,
                                                    tokenizer=learner.tokenizer).to(self.device)
        with self.autocast():
            text = model.text_features()
            image = model.encode_image(images)
            logits = model.logits(image, text)
            with torch.no_grad():
                frozen_image = model.encode_image_frozen(images)
                frozen_logits = model.logits(frozen_image, self.frozen_text.to(frozen_image.dtype))
            ce = F.cross_entropy(logits.float(), labels)
            scl = self_consistency_losses(text, self.frozen_text, image, frozen_image, logits, frozen_logits,
                                          node.TEXT_LOSS_WEIGHT, node.IMAGE_LOSS_WEIGHT)
            loss = ce + scl["logits"] + scl["text"] + scl["image"]
        self.step(loss, scaler=self.scaler)
        summary = {"loss": loss.item(), "loss_ce": ce.item(), "loss_scl_text": scl["text"].item(),
                   "loss_scl_image": scl["image"].item(), "loss_scl_logits": scl["logits"].item(),
                   "acc": compute_accuracy(logits, labels)[0].item()}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
            self.aggregate_epoch()
        return summary

    def aggregate_epoch(self) -> None:
        """GPA after an epoch: add weight_e x the prompts to the running sum; after the last
        epoch, replace the prompts by the sum (saved as the last checkpoint, then evaluated)."""
        weight = float(self.gpa_weights[self.epoch])
        current = {k: p.detach().float() for k, p in self.model.prompts.prompt_parameters().items()}
        if self.gpa_sum is None:
            self.gpa_sum = {k: weight * v for k, v in current.items()}
        else:
            self.gpa_sum = {k: self.gpa_sum[k] + weight * v for k, v in current.items()}
        if self.epoch + 1 == self.max_epoch:
            print("Using the GPA prompts (Gaussian-weighted over epochs) from now on")
            with torch.no_grad():
                for key, param in self.model.prompts.prompt_parameters().items():
                    param.copy_(self.gpa_sum[key])
            self.result_extra["gpa"] = {"mean": float(self.node.GPA_MEAN), "std": float(self.node.GPA_STD),
                                        "epochs": int(self.max_epoch)}

    def training_state(self) -> dict:
        state = super().training_state()
        state["gpa_sum"] = None if self.gpa_sum is None else {k: v.cpu() for k, v in self.gpa_sum.items()}
        return state

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        if state.get("gpa_sum") is not None:
            self.gpa_sum = {k: v.to(self.device) for k, v in state["gpa_sum"].items()}

    # ------------------------------------------------------------------------ evaluation
    def prepare_for_test(self) -> None:
        """The prompts are fixed during evaluation: encode the class prompts once."""
        with torch.no_grad(), self.autocast():
            classes = torch.arange(self.model.prompt_learner.n_cls, device=self.device)
            self.eval_text_features = encode_in_chunks(lambda c: self.model.text_features(indices=c), classes)

