"""Zero-shot CLIP (Radford et al., 2021) with the dataset's hand-crafted prompt."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selftpt.clip_loader import tokenize
from selftpt.prompt_learner import clean_classname
from selftpt.templates import template_for
from selftpt.toolbox import TRAINER_REGISTRY
from selftpt.trainer_base import ClipTrainer


@torch.no_grad()
def encode_class_prompts(clip_model: torch.nn.Module, template: str, classnames: list[str],
                         chunk: int = 256) -> torch.Tensor:
    """(n_cls, D) normalised text features of ``template`` filled with each class name."""
    device = clip_model.token_embedding.weight.device
    prompts = [template.format(clean_classname(c)) for c in classnames]
    feats = [clip_model.encode_text(tokenize(prompts[i:i + chunk], clip_model.context_length).to(device))
             for i in range(0, len(prompts), chunk)]
    return F.normalize(torch.cat(feats), dim=-1)


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(ClipTrainer):
    """Classifies with CLIP and one hand-crafted prompt per class; nothing is trained."""

    CFG_NODE = "ZSCLIP"
    TRAINS = False  # train.py evaluates directly

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
