"""CLIP with a learnable text prompt (CoOp's ``CustomCLIP``), shared by the prompt trainers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selftpt.prompt_learner import PromptLearner
from selftpt.text_encoder import TextEncoder


class PromptedCLIP(nn.Module):
    """Frozen CLIP encoders around a ``PromptLearner``; logits = scale x cosine similarity.

    Args:
        prompt_learner: the learnable prompt over the current class names.
        clip_model: the frozen CLIP model (OpenAI's, or an open_clip one as ``open_clip_backend.OpenClipModel``).
        grad_checkpoint: checkpoint the text transformer (memory for many classes).
    """

    def __init__(self, prompt_learner: PromptLearner, clip_model: nn.Module,
                 grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.prompt_learner = prompt_learner
        self.image_encoder = clip_model.visual
        self.text_encoder = TextEncoder(clip_model, grad_checkpoint=grad_checkpoint)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D) L2-normalised image features."""
        return F.normalize(self.image_encoder(images.type(self.dtype)), dim=-1)

    def text_features(self, position: str | None = None, ctx: torch.Tensor | None = None,
                      indices: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """(n, D) features of the prompt in one layout (see ``PromptLearner.forward``)."""
        learner = self.prompt_learner
        prompts = learner(position, ctx=ctx, indices=indices)  # (n, L, d)
        tokens = learner.tokenized_prompts if indices is None else learner.tokenized_prompts[indices]
        feats = self.text_encoder(prompts, tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B, D) x (n_cls, D) normalised features -> (B, n_cls) logits."""
        return self.logit_scale.exp() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(images), self.text_features())
