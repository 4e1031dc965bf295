"""CLIP's text tower applied to prompt embeddings (CoOp's ``TextEncoder``), written once.

Prompts are cut after the longest prompt's end-of-text token before the transformer runs.
That is exact, not an approximation: CLIP's causal mask means no position ever attends to a
later one, so the padding after EOT cannot change the EOT feature. A CoOp prompt ("X X X X
red triangle.") fills 8-20 of CLIP's 77 positions, so trimming makes every prompt-learning
step (CoOp, CPT, TPT's per-image step) several times cheaper.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# Prompts per text-encoder call when class prompts are encoded without gradients (evaluation
# classifiers, CPT's hand-crafted view, zero-shot prompts): enough tokens per matmul (256 x 77)
# to keep a GPU busy, while a call's largest activation, the text MLP's hidden layer, stays
# near 80 MB for ViT-B/16 (256 x 77 x 2048 fp16 values), where ImageNet's 1000 classes in one
# call would need four times that.
PROMPT_CHUNK = 256

Items = TypeVar("Items", list, torch.Tensor)


def encode_in_chunks(encode: Callable[[Items], torch.Tensor], items: Items,
                     chunk: int = PROMPT_CHUNK) -> torch.Tensor:
    """``encode`` of consecutive slices of at most ``chunk`` items, concatenated along dim 0.

    Args:
        encode: maps a slice of ``items`` to its (n, D) features.
        items: a list of texts, or a 1-D tensor of class indices (sliced, so still a tensor).
    """
    return torch.cat([encode(items[i:i + chunk]) for i in range(0, len(items), chunk)])


# The switches that ``torch.nn.attention.sdpa_kernel`` flips, per attention backend.
_SDPA_SWITCHES = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
}


class _AttentionKernels:
    """Re-enterable ``sdpa_kernel(backends)``: a checkpointed block may be recomputed more than
    once (once per backward, and double backward is one more)."""

    def __init__(self, backends: list[SDPBackend]) -> None:
        self.backends = backends
        self._active: list[contextlib.AbstractContextManager] = []

    def __enter__(self) -> None:
        self._active.append(sdpa_kernel(self.backends))
        self._active[-1].__enter__()

    def __exit__(self, *exc: object) -> None:
        self._active.pop().__exit__(*exc)


def same_attention_kernels() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``checkpoint``'s ``context_fn``: recompute a block with the attention kernels that its
    forward ran with. Self-TPT's gradient matching runs the CPT forward under the math kernel
    (the fused ones have no double backward); a recompute with the default fused kernel
    would save other tensors, which checkpointing refuses."""
    enabled = [backend for backend, is_on in _SDPA_SWITCHES.items() if is_on()]
    return contextlib.nullcontext(), _AttentionKernels(enabled)


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """CLIP's additive attention mask for ``length`` positions (-inf above the diagonal)."""
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


def residual_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One ``clip.model.ResidualAttentionBlock`` on a sequence-first ``x`` with an explicit mask
    (the block's own mask is sized for the full context length)."""
    h = block.ln_1(x)
    x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask.to(x.dtype))[0]
    return x + block.mlp(block.ln_2(x))


def trimmed_length(tokens: torch.Tensor) -> int:
    """Positions needed to reach the last EOT token (EOT has the largest id in CLIP's vocabulary)."""
    return int(tokens.argmax(dim=-1).max()) + 1


@dataclass(frozen=True)
class TextLayout:
    """How a text tower other than OpenAI's runs (an open_clip model's ``text_layout``).

    OpenAI's CLIP has none: sequence-first blocks, a causal mask, pooling at the EOT token
    (the largest id). open_clip's towers may differ in each (``open_clip.transformer``).

    Args:
        batch_first: the blocks take (n, L, d) (open_clip's default) rather than (L, n, d).
        causal: a causal attention mask (else bidirectional attention).
        pool: the position pooled: ``argmax`` (largest id = EOT), ``eos`` (first ``eos_id``),
            ``first`` or ``last`` (open_clip's ``text_global_pool``).
        eos_id: the end token for ``eos`` pooling.
        pad_id: masks padding keys (bidirectional towers with ``use_pad_mask``); None: no mask.
        heads: attention heads (a padding mask is per head).
    """

    batch_first: bool = True
    causal: bool = True
    pool: str = "argmax"
    eos_id: int | None = None
    pad_id: int | None = None
    heads: int = 1

    def pooled_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) position pooled in each prompt of (n, L) token ids."""
        n, length = tokens.shape
        if self.pool == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        position = 0 if self.pool == "first" else length - 1
        return torch.full((n,), position, dtype=torch.long, device=tokens.device)

    def length(self, tokens: torch.Tensor) -> int:
        """Positions to run: up to the last pooled token under a causal mask (exact, as for
        OpenAI's CLIP), else all (bidirectional attention and 'last' pooling see the padding)."""
        if self.causal and self.pool in ("argmax", "eos"):
            return int(self.pooled_index(tokens).max()) + 1
        return int(tokens.shape[1])


def text_layout(clip_model: nn.Module) -> TextLayout | None:
    """The text tower's layout; None for OpenAI's CLIP (the encoder's original path)."""
    return getattr(clip_model, "text_layout", None)


def encode_text_tokens(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip_model.encode_text`` on token ids, trimmed after the longest prompt's EOT."""
    layout = text_layout(clip_model)
    length = trimmed_length(tokens) if layout is None else layout.length(tokens)
    prompts = clip_model.token_embedding(tokens[:, :length]).type(clip_model.dtype)
    return TextEncoder(clip_model)(prompts, tokens[:, :length])


def open_clip_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """One open_clip residual block (its own forward: layer scale, custom attention) on a
    sequence-first ``x``, so that hook points see the same (L, n, d) tensors as OpenAI's."""
    if batch_first:
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return block(x, attn_mask=mask)


class TextEncoder(nn.Module):
    """Encode token *embeddings* (so learnable context vectors can be inserted) with CLIP.

    Args:
        clip_model: an OpenAI ``clip.model.CLIP``, or an ``open_clip_backend.OpenClipModel`` (its
            ``text_layout`` says how its tower masks and pools); the text tower is shared, not copied.
        grad_checkpoint: recompute each residual block in backward to bound memory when
            many prompts are encoded with gradients (e.g. 1000 class names x 4 CPT views).

    ``layer_inputs[i]`` is an identity that the sequence-first (L, n, d) tensor entering block i
    passes through: a hook point. The blocks run through ``residual_block`` (their own mask is
    sized for the full context), which bypasses hooks on the blocks themselves, so forward hooks
    on these identities are how the input of a layer is read or replaced (deep prompts:
    ``selftpt.deep_prompts``). Hooks there touch this encoder only, not CLIP's ``encode_text``.
    """

    def __init__(self, clip_model: nn.Module, grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype
        self.grad_checkpoint = grad_checkpoint
        self.layer_inputs = nn.ModuleList(nn.Identity() for _ in self.transformer.resblocks)
        self.layout = text_layout(clip_model)

    @property
    def output_dim(self) -> int:
        """Dimension of the text features (open_clip's projection may be a Linear or absent)."""
        projection = self.text_projection
        if projection is None:
            return int(self.ln_final.weight.shape[0])
        if isinstance(projection, nn.Linear):
            return int(projection.out_features)
        return int(projection.shape[1])

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        """Args: prompts (n, L, d) embeddings; tokenized_prompts (n, L) ids, EOT = max id.

        Returns: (n, embed_dim) text features, not normalised.
        """
        if self.layout is not None:
            return self._forward_layout(prompts, tokenized_prompts, self.layout)
        length = trimmed_length(tokenized_prompts)
        x = prompts[:, :length] + self.positional_embedding[:length].type(self.dtype)
        x = x.permute(1, 0, 2)  # (L, n, d): OpenAI's transformer is sequence-first
        mask = causal_mask(length, x.device)
        for block, layer_input in zip(self.transformer.resblocks, self.layer_inputs, strict=True):
            x = layer_input(x)
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(residual_block, block, x, mask, use_reentrant=False,
                               context_fn=same_attention_kernels)
            else:
                x = residual_block(block, x, mask)
        x = x.permute(1, 0, 2)  # (n, L, d)
        x = self.ln_final(x).type(self.dtype)
        eot = tokenized_prompts.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def _forward_layout(self, prompts: torch.Tensor, tokens: torch.Tensor, layout: TextLayout) -> torch.Tensor:
        """The forward of a tower with a ``TextLayout`` (open_clip's): its mask and pooling,
        its blocks' own forward, the same sequence-first hook points."""
        length = layout.length(tokens)
        x = prompts[:, :length] + self.positional_embedding[:length].to(self.dtype)
        x = x.permute(1, 0, 2)  # (L, n, d) at the hook points, as for OpenAI's tower
        mask = causal_mask(length, x.device) if layout.causal else None
        if layout.pad_id is not None:  # bidirectional with padding keys masked (open_clip's use_pad_mask)
            keys = (tokens[:, :length] != layout.pad_id).unsqueeze(1).expand(-1, length, -1)
            pad = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill_(~keys, float("-inf"))
            pad = pad.repeat_interleave(layout.heads, 0)
            mask = pad if mask is None else mask.unsqueeze(0) + pad
        for block, layer_input in zip(self.transformer.resblocks, self.layer_inputs, strict=True):
            x = layer_input(x)
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(open_clip_block, block, x, mask, layout.batch_first, use_reentrant=False,
                               context_fn=same_attention_kernels)
            else:
                x = open_clip_block(block, x, mask, layout.batch_first)
        x = self.ln_final(x.permute(1, 0, 2))  # (n, L, d)
        pooled = x[torch.arange(x.shape[0], device=x.device), layout.pooled_index(tokens[:, :length])]
        projection = self.text_projection
        if projection is None:
            return pooled
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled @ projection
