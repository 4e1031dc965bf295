"""CLIP's text tower applied to prompt embeddings (CoOp's ``TextEncoder``), written once."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class TextEncoder(nn.Module):
    """Encode token *embeddings* (so learnable context vectors can be inserted) with CLIP.

    Args:
        clip_model: an OpenAI ``clip.model.CLIP``; its text tower is shared, not copied.
        grad_checkpoint: recompute each residual block in backward to bound memory when
            many prompts are encoded with gradients (e.g. 1000 class names x 4 CPT views).
    """

    def __init__(self, clip_model: nn.Module, grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype
        self.grad_checkpoint = grad_checkpoint

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        """Args: prompts (n, L, d) embeddings; tokenized_prompts (n, L) ids, EOT = max id.

        Returns: (n, embed_dim) text features, not normalised.
        """
        x = prompts + self.positional_embedding.type(self.dtype)  # (n, L, d)
        x = x.permute(1, 0, 2)  # (L, n, d): OpenAI's transformer is sequence-first
        if self.grad_checkpoint and torch.is_grad_enabled():
            for block in self.transformer.resblocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.transformer(x)
        x = x.permute(1, 0, 2)  # (n, L, d)
        x = self.ln_final(x).type(self.dtype)
        eot = tokenized_prompts.argmax(dim=-1)  # the end-of-text token has the largest id
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
