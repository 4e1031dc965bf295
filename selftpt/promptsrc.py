"""PromptSRC's pieces (Khattak et al., ICCV 2023, "Self-regulating Prompts"), as small parts.

- ``IVLPPrompts``: independent vision-language prompts (IVLP): the text context (CoOp's
  ``PromptLearner``) with deep text tokens for text layers 1..D_t-1, and vision tokens for ViT
  layers 0..D_v-1, installed through ``selftpt.deep_prompts``. Its ``state_dict`` keys are the
  original's (``prompt_learner.ctx``, ``image_encoder.VPT``,
  ``image_encoder.transformer.resblocks.<i>.VPT_shallow``,
  ``text_encoder.transformer.resblocks.<i>.VPT_shallow``), so the released checkpoints, which hold
  the whole ``CustomCLIP``, load into it (their other keys are frozen CLIP weights and ignored).
- ``IVLPClip``: frozen CLIP with those prompts: prompted features, and the frozen (unprompted)
  image features the regulariser compares them with.
- ``self_consistency_losses``: the mutual-agreement terms (L1 on text and image features, KL on
  logits) against frozen CLIP.
- ``frozen_text_features``: the textual-diversity target, frozen CLIP's text features averaged
  over 60 ImageNet templates per class.
- ``gaussian_epoch_weights``: the weights of Gaussian prompt aggregation (GPA) over epochs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selftpt.clip_loader import Tokenizer, tokenize
from selftpt.deep_prompts import DeepPrompts, PromptedImageEncoder, deep_prompts, vision_depth, vision_width
from selftpt.errors import ConfigError
from selftpt.prompt_learner import PromptLearner
from selftpt.templates import IMAGENET_TEMPLATES
from selftpt.text_encoder import TextEncoder, encode_in_chunks, trimmed_length

# PromptSRC's textual diversity uses 60 of CLIP's 80 ImageNet templates (its
# trainers/imagenet_templates.py); these 20 are the ones it leaves out.
_NOT_IN_PROMPTSRC = frozenset({
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
})
PROMPTSRC_TEMPLATES: tuple[str, ...] = tuple(t for t in IMAGENET_TEMPLATES if t not in _NOT_IN_PROMPTSRC)

INIT_STD = 0.02  # the original's normal init of every vision and deep text token


class _LayerTokens(nn.Module):
    """One layer's tokens under the original's attribute name (``VPT_shallow``)."""

    def __init__(self, n_tokens: int, width: int) -> None:
        super().__init__()
        tokens = torch.empty(n_tokens, width)
        nn.init.normal_(tokens, std=INIT_STD)
        self.VPT_shallow = nn.Parameter(tokens)


def _deep_layers(n_tokens: int, width: int, depth: int) -> nn.Module:
    """``transformer.resblocks.<i>.VPT_shallow`` for layers 1..depth-1 (the original's key names)."""
    transformer = nn.Module()
    transformer.resblocks = nn.ModuleDict({str(i): _LayerTokens(n_tokens, width) for i in range(1, depth)})
    return transformer


class VisionPrompts(nn.Module):
    """Vision tokens: ``VPT`` appended at layer 0, ``VPT_shallow`` replacing them before layers
    1..depth-1; ``forward()`` gives them as ``DeepPrompts`` (none when depth is 0)."""

    def __init__(self, n_tokens: int, width: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        if depth > 0:
            tokens = torch.empty(n_tokens, width)
            nn.init.normal_(tokens, std=INIT_STD)
            self.VPT = nn.Parameter(tokens)
        self.transformer = _deep_layers(n_tokens, width, depth)

    def forward(self) -> DeepPrompts:
        if self.depth == 0:
            return DeepPrompts({})
        layers = {0: self.VPT}
        layers.update({int(i): m.VPT_shallow for i, m in self.transformer.resblocks.items()})
        return DeepPrompts(layers)


class TextPrompts(nn.Module):
    """Deep text tokens replacing the context positions before text layers 1..depth-1 (layer 0's
    prompt is the prompt learner's context)."""

    def __init__(self, n_tokens: int, width: int, depth: int) -> None:
        super().__init__()
        self.transformer = _deep_layers(n_tokens, width, depth)

    def forward(self) -> DeepPrompts:
        return DeepPrompts({int(i): m.VPT_shallow for i, m in self.transformer.resblocks.items()})


class IVLPPrompts(nn.Module):
    """Everything PromptSRC learns, under the original ``CustomCLIP``'s key names.

    Depths larger than a tower's layer count prompt every layer of it, as the original does
    (it prompts layer i when ``i < depth``).

    Args:
        classnames: the class names (order = label order).
        clip_model: frozen CLIP with a ViT image encoder (OpenAI's or open_clip's); the text
            context is tokenised by the model's own tokenizer (``PromptLearner``).
        n_ctx_text, n_ctx_vision: prompt tokens per layer.
        depth_text: prompted text layers (>= 1; layer 0 is the context).
        depth_vision: prompted vision layers (0 = no vision prompts).
        ctx_init: words initialising the text context ("" = random, ``n_ctx_text`` tokens).
    """

    def __init__(self, classnames: list[str], clip_model: nn.Module, n_ctx_text: int, n_ctx_vision: int,
                 depth_text: int, depth_vision: int, ctx_init: str = "",
                 config_node: str = "TRAINER.PROMPTSRC") -> None:
        super().__init__()
        self.depth_text = min(depth_text, len(clip_model.transformer.resblocks))
        self.depth_vision = min(depth_vision, vision_depth(clip_model.visual))
        self.prompt_learner = PromptLearner(classnames, clip_model, n_ctx=n_ctx_text, ctx_init=ctx_init,
                                            config_node=config_node)
        if self.prompt_learner.n_ctx != n_ctx_text:
            raise ConfigError(f'{config_node}.CTX_INIT "{ctx_init}" gives {self.prompt_learner.n_ctx} context '
                              f"tokens but {config_node}.N_CTX_TEXT is {n_ctx_text}; make them agree")
        self.image_encoder = VisionPrompts(n_ctx_vision, vision_width(clip_model.visual), self.depth_vision)
        self.text_encoder = TextPrompts(n_ctx_text, clip_model.ln_final.weight.shape[0], self.depth_text)

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        """The learnable tensors by state_dict key (what GPA averages)."""
        return dict(self.named_parameters())


class IVLPClip(nn.Module):
    """Frozen CLIP prompted by ``IVLPPrompts``; the interface of ``PromptedCLIP`` (``encode_image``,
    ``text_features``, ``logits``, ``prompt_learner``), so TPT's per-image loop runs on it too.

    ``image_encoder`` is a ``PromptedImageEncoder`` (its digest covers the vision prompts, for
    the feature cache); ``encode_image_frozen`` is CLIP's own image encoder with no prompts.
    """

    def __init__(self, prompts: IVLPPrompts, clip_model: nn.Module, grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.prompts = prompts  # first: its parameters are named prompts.* in named_parameters()
        self.image_encoder = PromptedImageEncoder(clip_model.visual, prompts.image_encoder)
        self.text_encoder = TextEncoder(clip_model, grad_checkpoint=grad_checkpoint)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    @property
    def prompt_learner(self) -> PromptLearner:
        return self.prompts.prompt_learner

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised features with the vision prompts."""
        return F.normalize(self.image_encoder(images.type(self.dtype)), dim=-1)

    def encode_image_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised features of frozen CLIP (no prompts)."""
        return F.normalize(self.image_encoder.visual(images.type(self.dtype)), dim=-1)

    def text_features(self, indices: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """(n, D) class features of the prompted text tower (all classes, or ``indices``)."""
        learner = self.prompt_learner
        embeddings = learner(indices=indices)
        tokens = learner.tokenized_prompts if indices is None else learner.tokenized_prompts[indices]
        with deep_prompts(self.text_encoder, self.prompts.text_encoder(), source=self.prompts.text_encoder):
            features = self.text_encoder(embeddings, tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(images), self.text_features())


@torch.no_grad()
def frozen_text_features(text_encoder: TextEncoder, token_embedding: nn.Embedding, classnames: list[str],
                         templates: tuple[str, ...] = PROMPTSRC_TEMPLATES,
                         tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """(C, D) L2-normalised frozen-CLIP class features averaged over ``templates``.

    As PromptSRC: each template's *unnormalised* text features are averaged, and the mean is
    normalised (CLIP's own ensembling normalises each template's features first).

    Args:
        text_encoder: the text tower, with no deep prompts installed (frozen CLIP's pass).
        token_embedding: CLIP's token embedding (it may sit on another device).
        tokenizer: the model's tokenizer (the prompt learner's); None = OpenAI's.
    """
    context_length = int(text_encoder.positional_embedding.shape[0])
    device = text_encoder.positional_embedding.device
    names = [n.replace("_", " ") for n in classnames]

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        # the positions the encoder runs anyway (its layout's, e.g. all of them for a bidirectional tower)
        layout = text_encoder.layout
        tokens = tokens[:, :trimmed_length(tokens) if layout is None else layout.length(tokens)]
        embeddings = token_embedding(tokens.to(token_embedding.weight.device))
        return text_encoder(embeddings.to(device=device, dtype=text_encoder.dtype), tokens.to(device)).float()

    total = None
    for template in templates:
        feats = encode_in_chunks(encode, tokenize([template.format(n) for n in names], context_length, tokenizer))
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


def self_consistency_losses(text_features: torch.Tensor, frozen_text: torch.Tensor, image_features: torch.Tensor,
                            frozen_image: torch.Tensor, logits: torch.Tensor, frozen_logits: torch.Tensor,
                            text_weight: float, image_weight: float) -> dict[str, torch.Tensor]:
    """PromptSRC's mutual-agreement terms (L_SCL) against frozen CLIP, each already weighted.

    ``text``: ``text_weight`` x mean |t - t_frozen| over classes and dimensions;
    ``image``: ``image_weight`` x mean |f - f_frozen| over images and dimensions;
    ``logits``: KL(softmax(frozen) || softmax(prompted)) summed, over the logits' element count
    (the original's ``kl_div(..., reduction='sum') / numel``). Features are L2-normalised.
    """
    text = F.l1_loss(text_features.float(), frozen_text.float()) * text_weight
    image = F.l1_loss(image_features.float(), frozen_image.float()) * image_weight
    kl = F.kl_div(logits.float().log_softmax(-1), frozen_logits.float().log_softmax(-1), reduction="sum",
                  log_target=True) / logits.numel()
    return {"text": text, "image": image, "logits": kl}


def gaussian_epoch_weights(n_epochs: int, mean: float, std: float) -> torch.Tensor:
    """GPA's weight of each epoch 1..n_epochs: a Gaussian density at the epoch, normalised to sum 1.

    Raises ``ConfigError`` when every density underflows (a mean far outside the epochs).
    """
    epochs = torch.arange(1, n_epochs + 1, dtype=torch.float64)
    density = torch.exp(-0.5 * ((epochs - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    total = float(density.sum())
    if not total > 0 or not math.isfinite(total):
        raise ConfigError(f"TRAINER.PROMPTSRC.GPA_MEAN {mean} with GPA_STD {std} gives no weight to any of the "
                          f"{n_epochs} epochs; put GPA_MEAN within the epochs or raise GPA_STD")
    return density / total
