"""Zero-shot CLIP (Radford et al., 2021) with the dataset's hand-crafted prompt
(``ZeroshotCLIP``) or with a prompt ensemble (``ZeroshotCLIP2``)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from selftpt.clip_loader import text_tokenizer, tokenize
from selftpt.prompt_learner import clean_classname
from selftpt.templates import ensemble_templates, template_for
from selftpt.text_encoder import encode_in_chunks
from selftpt.toolbox import TRAINER_REGISTRY
from selftpt.trainer_base import ClipTrainer


@torch.no_grad()
def encode_class_prompts(clip_model: torch.nn.Module, template: str, classnames: list[str]) -> torch.Tensor:
    """(n_cls, D) normalised text features of ``template`` filled with each class name."""
    device = clip_model.token_embedding.weight.device
    prompts = [template.format(clean_classname(c)) for c in classnames]
    feats = encode_in_chunks(
        lambda texts: clip_model.encode_text(
            tokenize(texts, clip_model.context_length, text_tokenizer(clip_model)).to(device)), prompts)
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def encode_prompt_ensemble(clip_model: torch.nn.Module, templates: Sequence[str],
                           classnames: list[str]) -> torch.Tensor:
    """(n_cls, D) class features of a prompt ensemble: each template's normalised text
    features, averaged over the templates, normalised again; in the model's dtype."""
    if not templates:
        raise ValueError("a prompt ensemble needs at least one template")
    total = None
    for template in templates:
        feats = encode_class_prompts(clip_model, template, classnames)
        # summed in fp32: with fp16 weights, 80 fp16 additions would round the mean at every step
        total = feats.float() if total is None else total + feats.float()
    return F.normalize(total / len(templates), dim=-1).to(feats.dtype)


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(ClipTrainer):
    """Classifies with CLIP and one hand-crafted prompt per class; nothing is trained."""

    CFG_NODE = "ZSCLIP"
    TRAINS = False  # train.py evaluates directly
    DETERMINISTIC = True  # no random draw anywhere: one unseeded run stands for every seed
    TABLE_ORDER = 10
    REFERENCE_CONFIGS = {"ZeroshotCLIP": ("vit_b16", ())}

    def build_model(self) -> None:
        self.clip_model = self.load_clip_model().to(self.device)
        self.template = template_for(self.cfg.DATASET.NAME)
        print(f'Prompt template: "{self.template}"')

    def prepare_for_test(self) -> None:
        """Encode the class prompts once per evaluation (the method's one-time cost)."""
        self.text_features = encode_class_prompts(self.clip_model, self.template, self.classnames)

    def image_encoder_for_cache(self) -> torch.nn.Module:
        return self.clip_model.visual

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised image features."""
        with self.autocast():
            return F.normalize(self.clip_model.encode_image(images.type(self.clip_model.dtype)), dim=-1)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.clip_model.logit_scale.exp() * features @ self.text_features.t()

    def model_inference(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.encode_images(images))


@TRAINER_REGISTRY.register()
class ZeroshotCLIP2(ZeroshotCLIP):
    """Zero-shot CLIP with a prompt ensemble; nothing is trained.

    CoOp's ``ZeroshotCLIP2`` (KaiyangZhou/CoOp, ``trainers/zsclip.py``): each class is the mean
    of the normalised text features of several hand-crafted templates, re-normalised.
    ``TRAINER.ZSCLIP.ENSEMBLE`` picks the templates (``selftpt.templates.ENSEMBLES``):
    ``coop_select`` is CoOp's set, ``clip80`` CLIP's 80 ImageNet templates (the "Ensembled
    prompt" baseline of TPT's results). The image side is ZeroshotCLIP's one encoder pass, so
    ``TEST.FEATURE_CACHE`` applies unchanged.
    """

    TABLE_ORDER = 20
    REFERENCE_CONFIGS = {"ZeroshotCLIP2": ("vit_b16", ())}

    def build_model(self) -> None:
        self.clip_model = self.load_clip_model().to(self.device)
        ensemble = self.node.ENSEMBLE
        self.templates = ensemble_templates(self.cfg.DATASET.NAME, ensemble)
        print(f"Prompt ensemble {ensemble} (n={len(self.templates)}): {self.templates}")
        self.result_extra = {"prompt_ensemble": ensemble, "num_templates": len(self.templates)}

    def prepare_for_test(self) -> None:
        """Encode the class prompts of every template once per evaluation (the one-time cost)."""
        self.text_features = encode_prompt_ensemble(self.clip_model, self.templates, self.classnames)
