"""MaPLe's multi-modal prompts (Khattak et al., CVPR 2023), shared by MaPLe, MaPLe+TPT and PromptAlign.

The language branch is prompted in its first J layers (``PROMPT_DEPTH``): layer 0 by the
learnable context ``ctx`` placed after the start token, layers 1..J-1 by their own learnable
tokens (``compound_prompts_text``), which overwrite the positions of the context. The vision
branch gets no tokens of its own: each of its first J layers is prompted by a linear
projection (text width -> vision width) of the same layer's language prompt (the coupling
functions: ``proj`` for the context, ``compound_prompt_projections[i-1]`` for layer i). Both
go through ``selftpt.deep_prompts``, so CLIP's forward is never copied.

Attribute names are the original code's (``muzairkhattak/multimodal-prompt-learning``,
``trainers/maple.py``), so that checkpoints of that code, whose state_dict keys are these
prefixed with ``prompt_learner.``, load here (``MaPLeCheckpoint``). As there, with ``CTX_INIT``
and ``N_CTX`` <= 4 the context is initialised from the first N_CTX tokens of the words and the
prompt keeps the rest of them as fixed tokens ("a photo" learnable, "of a" fixed, for N_CTX 2
and "a photo of a").
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from selftpt.clip_loader import token_count
from selftpt.deep_prompts import DeepPrompts, PromptedImageEncoder, deep_prompts, vision_depth, vision_width
from selftpt.errors import ConfigError
from selftpt.prompt_learner import ClassNamePrompts
from selftpt.text_encoder import TextEncoder

# The context is initialised from CTX_INIT's words only up to this many tokens (original code).
MAX_INIT_TOKENS = 4
# What the original saves under the registered model name (its whole CustomCLIP).
CHECKPOINT_NAME = "MultiModalPromptLearner"


def transformer_depth(clip_model: nn.Module) -> int:
    """Layers both towers have (MaPLe prompts the same layers in each)."""
    return min(len(clip_model.transformer.resblocks), vision_depth(clip_model.visual))


def effective_depth(prompt_depth: int, clip_model: nn.Module, node: str) -> int:
    """``PROMPT_DEPTH`` capped at the towers' layers; a deeper setting prompts every layer,
    as in the original code, whose surplus tokens are never used (noted once)."""
    layers = transformer_depth(clip_model)
    if prompt_depth > layers:
        print(f"Note: {node}.PROMPT_DEPTH {prompt_depth} exceeds this backbone's {layers} layers; "
              f"prompting all {layers} (the original code leaves the surplus prompts unused)")
        return layers
    return prompt_depth


class MultiModalPromptLearner(ClassNamePrompts):
    """Language prompts of the first ``depth`` text layers and their projections to the vision side.

    Args:
        classnames: target class names (order = label order).
        clip_model: the frozen CLIP model (a ViT image tower, OpenAI's or open_clip's), for the
            token embedding, the widths and the tokenizer (open_clip models carry their own).
        n_ctx: learnable context tokens (also the prompt tokens of every deeper layer).
        ctx_init: words the context starts from ("" = random, N(0, 0.02)); used when n_ctx <= 4.
        depth: prompted layers J >= 1 (1 = "shallow" MaPLe: the context and its projection only).
        config_node: the config node the arguments come from, for messages.
    """

    def __init__(self, classnames: list[str], clip_model: nn.Module, n_ctx: int = 2,
                 ctx_init: str = "a photo of a", depth: int = 9, config_node: str = "TRAINER.MAPLE") -> None:
        super().__init__(clip_model, config_node)
        if depth < 1:
            raise ConfigError(f"{config_node}.PROMPT_DEPTH is {depth}; MaPLe prompts at least layer 0 (>= 1)")
        ctx_dim = clip_model.ln_final.weight.shape[0]
        vis_dim = vision_width(clip_model.visual)
        ctx_init = ctx_init.replace("_", " ").strip()
        if ctx_init and n_ctx <= MAX_INIT_TOKENS:
            words = token_count(ctx_init, self.tokenizer)
            if words < n_ctx:
                raise ConfigError(f'{config_node}.CTX_INIT "{ctx_init}" has {words} tokens, fewer than '
                                  f"{config_node}.N_CTX {n_ctx}; give at least N_CTX words or CTX_INIT \"\"")
            with torch.no_grad():
                init = self.embed_tokens(self.tokenize([ctx_init]))[0, 1:1 + n_ctx].float()
            self.prompt_prefix = ctx_init
        else:
            if ctx_init:
                print(f"Note: {config_node}.CTX_INIT is used for N_CTX <= {MAX_INIT_TOKENS} only (as in MaPLe); "
                      f"{n_ctx} tokens start random")
            init = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(init, std=0.02)
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        self.n_ctx, self.depth = n_ctx, depth
        # fp32 master copies (selftpt/precision.py); deep_prompts casts them where they enter
        self.ctx = nn.Parameter(init.clone())
        self.proj = nn.Linear(ctx_dim, vis_dim)
        deeper = [torch.empty(n_ctx, ctx_dim) for _ in range(depth - 1)]
        for tokens in deeper:
            nn.init.normal_(tokens, std=0.02)
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(t) for t in deeper])
        self.compound_prompt_projections = nn.ModuleList(
            copy.deepcopy(nn.Linear(ctx_dim, vis_dim)) for _ in range(depth - 1))
        self.set_classnames(classnames)

    def check_room(self, names: list[str], name_lens: list[int]) -> None:
        prefix_tokens = max(token_count(self.prompt_prefix, self.tokenizer), self.n_ctx)  # CTX_INIT may be longer
        need = 1 + prefix_tokens + max(name_lens) + 2
        if need > self.context_length:
            raise ConfigError(f"{self.config_node}.N_CTX / CTX_INIT leave no room for class "
                              f"{names[name_lens.index(max(name_lens))]!r} in the text encoder's "
                              f"{self.context_length} tokens (needs {need}); shorten CTX_INIT or lower N_CTX")

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Layer-0 prompt embeddings (n, L, d): [SOS] ctx [rest of CTX_INIT] CLASS . [EOS]."""
        if indices is None:
            indices = torch.arange(self.n_cls, device=self.token_prefix.device)
        prefix, suffix = self.token_prefix[indices], self.token_suffix[indices]
        ctx = self.ctx.type(self.dtype).unsqueeze(0).expand(len(indices), -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=1)

    def text_prompts(self) -> DeepPrompts:
        """Layers 1..J-1 of the language branch: their own tokens."""
        return DeepPrompts.consecutive(list(self.compound_prompts_text), first_layer=1)

    def vision_prompts(self) -> DeepPrompts:
        """Layers 0..J-1 of the vision branch: each the projection of that layer's language prompt."""
        tokens = [self.proj(self.ctx)]
        tokens += [layer(prompt) for layer, prompt in zip(self.compound_prompt_projections,
                                                          self.compound_prompts_text, strict=True)]
        return DeepPrompts.consecutive(tokens, first_layer=0)


class VisionPromptSource(nn.Module):
    """The vision prompts as a module (``PromptedImageEncoder`` computes them at every forward
    and the feature cache's digest covers the learner they come from)."""

    def __init__(self, learner: MultiModalPromptLearner) -> None:
        super().__init__()
        self.learner = learner

    def forward(self) -> DeepPrompts:
        return self.learner.vision_prompts()


class MaPLeCLIP(nn.Module):
    """Frozen CLIP prompted in both towers by a ``MultiModalPromptLearner`` (MaPLe's ``CustomCLIP``).

    Args:
        prompt_learner: the multi-modal prompts over the current class names.
        clip_model: the frozen CLIP model with a ViT image tower (OpenAI's or open_clip's).
        grad_checkpoint: checkpoint the text transformer (memory for many classes).
    """

    def __init__(self, prompt_learner: MultiModalPromptLearner, clip_model: nn.Module,
                 grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.prompt_learner = prompt_learner
        self.image_encoder = PromptedImageEncoder(clip_model.visual, VisionPromptSource(prompt_learner))
        self.text_encoder = TextEncoder(clip_model, grad_checkpoint=grad_checkpoint)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    @property
    def visual(self) -> nn.Module:
        return self.image_encoder.visual

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised features of the prompted ViT."""
        return F.normalize(self.image_encoder(images.type(self.dtype)), dim=-1)

    def text_features(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """(n, D) L2-normalised features of the class prompts, deep text prompts installed."""
        learner = self.prompt_learner
        tokens = learner.tokenized_prompts if indices is None else learner.tokenized_prompts[indices]
        with deep_prompts(self.text_encoder, learner.text_prompts()):
            features = self.text_encoder(learner(indices), tokens)
        return F.normalize(features, dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(images), self.text_features())


class MaPLeCheckpoint(nn.Module):
    """What is registered (and saved) as ``MultiModalPromptLearner``: the prompt learner under
    the key prefix ``prompt_learner.``, as in the original checkpoints. The original saved its
    whole model (frozen CLIP included); those extra keys are ignored on loading."""

    def __init__(self, prompt_learner: MultiModalPromptLearner) -> None:
        super().__init__()
        self.prompt_learner = prompt_learner
