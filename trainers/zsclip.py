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
        template = template_for(self.cfg.DATASET.NAME)
        print(f'Prompt template: "{template}"')
        self.text_features = encode_class_prompts(self.clip_model, template, self.classnames)

    def model_inference(self, images: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(self.clip_model.encode_image(images.type(self.clip_model.dtype)), dim=-1)
        return self.clip_model.logit_scale.exp() * feats @ self.text_features.t()
