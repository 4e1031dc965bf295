"""CoCoOp: conditional prompt learning for vision-language models (Zhou et al., CVPR 2022).

A light meta-net turns each image's feature into a shift of the shared context, so every
image gets its own prompt set: ``ctx_i = ctx + meta_net(f(x_i))``. Trained with
cross-entropy as CoOp; the registered ``prompt_learner`` holds ``ctx`` and ``meta_net.*``
under CoCoOp's state-dict keys, so CoCoOp's released checkpoints load directly.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from selftpt.prompt_learner import PromptLearner
from selftpt.prompted_clip import PromptedCLIP
from selftpt.toolbox import TRAINER_REGISTRY
from selftpt.trainer_base import ClipTrainer

# Prompts sent through the text encoder in one call (images x classes) when no gradient is
# needed; bounds memory at test time while batching the per-image prompt sets.
MAX_PROMPTS_PER_CALL = 1024


class ConditionalPromptLearner(PromptLearner):
    """CoOp's prompt plus CoCoOp's meta-net: Linear(vis, vis/16) -> ReLU -> Linear(-> ctx_dim).

    Args:
        classnames, clip_model, n_ctx, ctx_init: as ``PromptLearner`` (shared context only).
    """

    def __init__(self, classnames: list[str], clip_model: nn.Module, n_ctx: int = 16,
                 ctx_init: str = "") -> None:
        super().__init__(classnames, clip_model, n_ctx=n_ctx, ctx_init=ctx_init)
        vis_dim = clip_model.visual.output_dim
        ctx_dim = clip_model.ln_final.weight.shape[0]
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
        ]))  # fp32 master weights whatever CLIP's dtype (selftpt/precision.py)

    def conditional_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised image features -> (B, n_ctx, d) per-image contexts."""
        bias = self.meta_net(image_features.float())  # (B, d)
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (1, n_ctx, d) + (B, 1, d)


class CoCoOpCLIP(PromptedCLIP):
    """CLIP whose prompt is conditioned on each image (one prompt set per image)."""

    def text_features_per_image(self, contexts: torch.Tensor) -> torch.Tensor:
        """(B, n_ctx, d) contexts -> (B, n_cls, D) normalised text features.

        The prompt sets of several images go through the text encoder together (at most
        ``MAX_PROMPTS_PER_CALL`` prompts) when no gradient is kept, one image at a time
        otherwise (as CoCoOp: training memory grows with batch x classes).
        """
        learner = self.prompt_learner
        n_cls = learner.n_cls
        per_call = max(1, MAX_PROMPTS_PER_CALL // n_cls) if not torch.is_grad_enabled() else 1
        feats = []
        for start in range(0, contexts.shape[0], per_call):
            chunk = contexts[start:start + per_call]  # (b, n_ctx, d)
            prompts = torch.cat([learner(ctx=c) for c in chunk])  # (b * n_cls, L, d)
            tokens = learner.tokenized_prompts.repeat(chunk.shape[0], 1)  # (b * n_cls, L)
            out = self.text_encoder(prompts, tokens)  # (b * n_cls, D)
            feats.append(F.normalize(out, dim=-1).view(chunk.shape[0], n_cls, -1))
        return torch.cat(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_image(images)  # (B, D)
        contexts = self.prompt_learner.conditional_context(image_features)  # (B, n_ctx, d)
        text_features = self.text_features_per_image(contexts)  # (B, n_cls, D)
        # logits[b, c] = scale * <f_b, t_{b,c}>
        return self.logit_scale.exp() * torch.einsum("bd,bcd->bc", image_features, text_features)


@TRAINER_REGISTRY.register()
class CoCoOp(ClipTrainer):
    """Trains the shared context and the meta-net with cross-entropy (any batch size)."""

    CFG_NODE = "COCOOP"
    TABLE_ORDER = 40
    REFERENCE_CONFIGS = {"CoCoOp": ("vit_b16_c4_ep10_batch1_ctxv1", ())}

    def build_model(self) -> None:
        node = self.node
        clip_model = self.load_clip_model()
        print("Building custom CLIP")
        learner = ConditionalPromptLearner(self.classnames, clip_model, n_ctx=node.N_CTX,
                                           ctx_init=node.CTX_INIT)
        self.model = CoCoOpCLIP(learner, clip_model)
        self.setup_prompt_training(self.model)
