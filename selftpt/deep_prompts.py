"""Deep prompts: learnable tokens given to the layers of CLIP's text and image transformers.

MaPLe, PromptSRC (its IVLP prompts) and PromptAlign prompt more than the input: before
transformer layer i >= 1, the prompt positions of the token sequence are overwritten with that
layer's own tokens (what the previous layer computed there is dropped). Here this is done with
forward hooks around CLIP's own modules, so no CLIP forward is copied:

- text (``selftpt.text_encoder.TextEncoder``): the n positions right after the start token
  (``TEXT_PROMPT_START``, where the prompt learner's context sits in the ``end`` layout) are
  replaced before each prompted layer i >= 1. Layer 0 takes no deep prompt: its prompt is the
  prompt embedding itself (the learner's context, which gets CLIP's positional embedding);
  deeper tokens get none, as in MaPLe. The hooks sit on the encoder's ``layer_inputs`` hook
  points, so CLIP's own ``encode_text`` (which shares the blocks) is never prompted.
- image (``clip.model.VisionTransformer``, OpenAI's, and ``open_clip.transformer.VisionTransformer``):
  layer 0's n tokens are appended after the patch tokens, after the positional embedding
  (prompts have no position) and open_clip's patch dropout (which drops patches, not prompts),
  before ``ln_pre``; before each prompted layer i >= 1 the last n positions are replaced
  (MaPLe's and PromptSRC's ``VisionTransformer``). ``ln_post`` pools the class token only, so
  prompts change the image features through attention alone. Layers not named keep what the
  previous layer computed at the prompt positions. OpenAI's blocks take (L, N, D), open_clip's
  (N, L, D) unless its transformer is not ``batch_first``; the hooks read the layout off the tower.
- image, EVA-CLIP (open_clip's ``TimmModel`` around timm's ``Eva``, class-token pooling): its
  blocks apply rotary position embeddings to every token after the prefix (class and register)
  tokens, sized for the patch grid. The prompts go right after the prefix tokens instead of
  after the patches, and while installed every attention counts them as prefix tokens, so the
  patches keep their rotary positions and the prompts get none, as prompts get no position in
  the other towers. Attention is order-free apart from positions, so this is the same
  computation as appending them; deeper layers replace those positions.
- refused (``vision_refusal``): ResNets (OpenAI's and open_clip's ``ModifiedResNet``: a
  convolutional trunk with one attention-pooling layer has no transformer layers to prompt, and
  the papers prompt ViT layers only); ViTs with an attentional pooler (it attends to every token,
  prompts included) or pooling other than the class token ('avg' would average the prompts in,
  'none' returns them) or that return their tokens (``output_tokens``: prompts among them);
  timm towers other than EVA (e.g. SigLIP's, with attention pooling).

With no prompts installed nothing is hooked: outputs are bit-identical to plain CLIP.

The image-feature cache (``selftpt.feature_cache``) must never serve features computed with
other prompts. Prompts installed on an encoder when its cache key is computed are hashed into
the key; prompts made at every forward belong in a module that holds everything they depend
on, ``PromptedImageEncoder``, whose own digest then covers them. Prompts applied during
encoding that neither covers are detected (``recording_prompt_use``) and the entry is refused.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from selftpt.text_encoder import TextEncoder

with warnings.catch_warnings():  # clip imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    from clip.model import ModifiedResNet, VisionTransformer

TEXT_PROMPT_START = 1  # text prompts follow the start-of-text token

TEXT, IMAGE = "text", "image"


@dataclass(frozen=True)
class DeepPrompts:
    """Prompt tokens per transformer layer.

    Args:
        layers: ``{layer index: tokens}``; tokens are (n, d), shared by every sequence of a
            batch, or (N, n, d), one set per sequence; every layer has the same n. They are
            cast to the activations' dtype and device where they enter, so fp32 master copies
            of learnable tokens can be given directly (gradients reach them through the cast).
    """

    layers: Mapping[int, torch.Tensor]

    def __post_init__(self) -> None:
        bad = [i for i, t in self.layers.items() if int(i) < 0 or t.dim() not in (2, 3)]
        if bad:
            raise ValueError(f"Deep prompts need layer indices >= 0 and (n, d) or (N, n, d) tokens; "
                             f"layer(s) {bad} are not")
        counts = sorted({int(t.shape[-2]) for t in self.layers.values()})
        if len(counts) > 1:
            raise ValueError(f"Every prompted layer needs the same number of prompt tokens; got {counts}")
        object.__setattr__(self, "layers", {int(i): self.layers[i] for i in sorted(self.layers)})

    @classmethod
    def consecutive(cls, tokens: Sequence[torch.Tensor], first_layer: int) -> DeepPrompts:
        """``tokens[k]`` for layer ``first_layer + k`` (MaPLe's "compound prompts" start at layer 1)."""
        return cls({first_layer + k: t for k, t in enumerate(tokens)})

    @property
    def n_tokens(self) -> int:
        """Prompt tokens per layer (0 when no layer is prompted)."""
        return int(next(iter(self.layers.values())).shape[-2]) if self.layers else 0


def _sequence_first(tokens: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(n, d) or (N, n, d) tokens -> (n, batch, d) in ``like``'s dtype and device."""
    tokens = tokens.to(device=like.device, dtype=like.dtype)
    if tokens.dim() == 2:
        return tokens.unsqueeze(1).expand(-1, batch, -1)
    if tokens.shape[0] != batch:
        raise ValueError(f"Per-sequence deep prompts hold {tokens.shape[0]} sets for a batch of {batch}")
    return tokens.transpose(0, 1)


# encoder -> the DeepPromptHandle installed on it (one at a time); entries die with the encoder.
_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, DeepPromptHandle]" = weakref.WeakKeyDictionary()
# Open ``recording_prompt_use`` blocks: (watched modules, handles seen prompting one of them).
_USE_LOGS: list[tuple[set[nn.Module], list["DeepPromptHandle"]]] = []


class DeepPromptHandle:
    """Deep prompts installed on one encoder. ``remove()``, or leaving a ``with`` block, takes
    them out; until then every forward of the encoder is prompted."""

    def __init__(self, encoder: nn.Module, prompts: DeepPrompts, source: nn.Module | None) -> None:
        # weak: ``_INSTALLED`` maps the encoder to this handle, which must not keep it alive
        self._encoder = weakref.ref(encoder)
        self.prompts = prompts
        self.source = source  # the module the tokens are computed from, if any
        self.hooks: list[RemovableHandle] = []
        self.undo: list[Callable[[], None]] = []  # what installing changed besides hooks, restored by remove()

    @property
    def encoder(self) -> nn.Module | None:
        return self._encoder()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for restore in self.undo:
            restore()
        self.hooks, self.undo = [], []
        encoder = self.encoder
        if encoder is not None and _INSTALLED.get(encoder) is self:
            del _INSTALLED[encoder]

    def __enter__(self) -> DeepPromptHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def note_use(self) -> None:
        """Tell open ``recording_prompt_use`` blocks that this handle prompted a forward."""
        for watched, used in _USE_LOGS:
            if self.encoder in watched and self not in used:
                used.append(self)


# What the deep-prompt trainers run on, for the one-line refusals.
SUPPORTED_VISION = ("OpenAI CLIP's ViTs (ViT-B/16 ...), open_clip's VisionTransformer with class-token pooling "
                    "and no attentional pooler (e.g. open_clip:ViT-B-16/laion2b_s34b_b88k) and EVA-CLIP's timm EVA "
                    "towers with class-token pooling (e.g. open_clip:EVA02-B-16/merged2b_s8b_b131k)")


def _open_clip_vit_class() -> type | None:
    """open_clip's ``VisionTransformer`` if open_clip is imported (an optional extra; an
    encoder cannot be one of its towers otherwise, so it is never imported here)."""
    return getattr(sys.modules.get("open_clip.transformer"), "VisionTransformer", None)


def is_open_clip_vit(visual: nn.Module) -> bool:
    """True for an open_clip ``VisionTransformer`` (supported or not: see ``vision_refusal``)."""
    vit = _open_clip_vit_class()
    return vit is not None and isinstance(visual, vit)


def is_timm_tower(visual: nn.Module) -> bool:
    """True for open_clip's ``TimmModel`` (EVA-CLIP's towers; supported or not: see ``vision_refusal``)."""
    return type(visual).__name__ == "TimmModel"


def vision_refusal(visual: nn.Module) -> str:
    """"" when deep vision prompts fit ``visual``, else what it has that they do not fit (a phrase)."""
    if isinstance(visual, VisionTransformer):
        return ""
    if is_open_clip_vit(visual):
        return _open_clip_vit_refusal(visual.attn_pool is not None, visual.output_tokens, visual.pool_type)
    name = type(visual).__name__
    if name == "ModifiedResNet":  # OpenAI's or open_clip's
        return "a ResNet"
    if is_timm_tower(visual):
        trunk = getattr(visual, "trunk", visual)
        if type(trunk).__name__ != "Eva":
            return _timm_refusal(type(trunk).__name__)
        return _pool_refusal(trunk.global_pool, "token")
    return f"an image tower of type {name}"


def _open_clip_vit_refusal(attn_pool: bool, output_tokens: bool, pool: str) -> str:
    """``vision_refusal`` of an open_clip ``VisionTransformer``, built or from its config."""
    if attn_pool:
        return "an attentional pooler (attn_pool), which attends to the prompt tokens too"
    if output_tokens:
        return "an image tower that returns its tokens (output_tokens)"
    return _pool_refusal(pool, "tok")


def _pool_refusal(pool: str, class_token: str) -> str:
    """"" for class-token pooling (named ``class_token`` by the tower), else why prompts do not fit."""
    if pool == class_token:
        return ""
    return f"image pooling {pool!r} (only class-token pooling {class_token!r} leaves the prompts out)"


def _timm_refusal(model: str) -> str:
    return f"a timm image tower other than EVA ({model})"


def _open_clip_vision_cfg(backbone: str) -> dict[str, Any] | None:
    """The ``vision_cfg`` of an ``open_clip:`` name from open_clip's config, read without weights
    or network; None when it cannot be (hf-hub names, unknown names, no package: the model is
    checked once built, or the loader says what is wrong)."""
    from selftpt.open_clip_backend import PREFIX, SCHEMAS, OpenClipError, OpenClipSpec, model_config

    spec = backbone[len(PREFIX):].strip()
    if spec.startswith("hf-hub:"):
        return None
    arch = spec if spec.startswith(SCHEMAS) else spec.split("@", 1)[0].split("/", 1)[0]
    try:
        config = model_config(OpenClipSpec(backbone, arch))
    except (OpenClipError, OSError, ValueError, KeyError):
        return None
    return (config or {}).get("vision_cfg")


def _config_refusal(vision_cfg: dict[str, Any]) -> str:
    """``vision_refusal`` from an open_clip ``vision_cfg``, before the model is built."""
    if vision_cfg.get("timm_model_name"):
        model = vision_cfg["timm_model_name"]
        if not any(part.startswith("eva") for part in model.split("_")):  # timm's EVA family: eva02_*, eva_*
            return _timm_refusal(model)
        return _pool_refusal(vision_cfg.get("timm_pool", "avg"), "token")  # "avg": open_clip's TimmModel default
    if isinstance(vision_cfg.get("layers"), (tuple, list)):
        return "a ResNet"
    return _open_clip_vit_refusal(bool(vision_cfg.get("attentional_pool")), bool(vision_cfg.get("output_tokens")),
                                  vision_cfg.get("pool_type", "tok"))  # open_clip's CLIPVisionCfg defaults


def require_vit_backbone(trainer: str, backbone: str, visual: nn.Module | None = None) -> None:
    """Refuse, in one line, a backbone whose image tower cannot take deep vision prompts
    (``vision_refusal``): by name or open_clip's config before it is loaded, or by its ``visual``.

    Args:
        trainer: who asks (named in the message), e.g. ``MaPLe``.
        backbone: ``MODEL.BACKBONE.NAME``.
        visual: the loaded model's image tower, when there is one.
    """
    from selftpt.clip_loader import CLIP_ARCHS, is_open_clip_name
    from selftpt.errors import ConfigError

    if visual is not None:
        why = vision_refusal(visual)
    elif is_open_clip_name(backbone):
        vision_cfg = _open_clip_vision_cfg(backbone)
        why = _config_refusal(vision_cfg) if vision_cfg is not None else ""
    else:
        why = "a ResNet" if isinstance(CLIP_ARCHS.get(backbone, {}).get("vision_layers"), (tuple, list)) else ""
    if why == "a ResNet":
        raise ConfigError(f"{trainer} prompts the layers of a ViT image encoder, but backbone {backbone} is a "
                          "ResNet CLIP (no transformer layers); use a ViT backbone, e.g. MODEL.BACKBONE.NAME "
                          "ViT-B/16 with INPUT.SIZE (224, 224), or Bench-ViT-S on the built-in CPU benchmark "
                          "(its Bench-RN-* backbones are ResNets)")
    if why:
        raise ConfigError(f"{trainer} prompts the layers of a ViT image encoder, but backbone {backbone} has "
                          f"{why}; supported: {SUPPORTED_VISION}")


@dataclass(frozen=True)
class VisionTower:
    """Where deep prompts go in one supported ViT image tower.

    Args:
        blocks: its transformer blocks, in order.
        width: the width of its tokens.
        batch_first: its blocks take (N, L, D); else (L, N, D).
        entry: the module whose input is the token sequence entering block 0 (after the
            positional embedding and patch dropout): layer 0's prompts are placed there.
        prefix_tokens: None: the prompts follow the patch tokens; else they follow this many
            class / register tokens (EVA: the patches keep their rotary positions).
        attentions: the attention modules whose ``num_prefix_tokens`` must count the prompts
            while they are installed (EVA's rotary embedding skips the prefix tokens).
    """

    blocks: Sequence[nn.Module]
    width: int
    batch_first: bool
    entry: nn.Module
    prefix_tokens: int | None = None
    attentions: tuple[nn.Module, ...] = ()

    def block_norm(self, layer: int) -> nn.Module:
        """The first norm of block ``layer``, whose input is the block's input (``ln_1``; EVA: ``norm1``)."""
        block = self.blocks[layer]
        return block.ln_1 if hasattr(block, "ln_1") else block.norm1


def vision_tower(visual: nn.Module) -> VisionTower:
    """The ``VisionTower`` of a supported image tower (``vision_refusal`` says which are)."""
    if is_timm_tower(visual):  # EVA-CLIP: open_clip's wrapper around timm's Eva
        trunk = visual.trunk
        return VisionTower(list(trunk.blocks), int(trunk.embed_dim), True, trunk.norm_pre,
                           prefix_tokens=int(trunk.num_prefix_tokens),
                           attentions=tuple(block.attn for block in trunk.blocks))
    # OpenAI's and open_clip's VisionTransformer; open_clip's without ln_pre has an Identity there
    return VisionTower(list(visual.transformer.resblocks), int(visual.class_embedding.shape[-1]),
                       bool(getattr(visual.transformer, "batch_first", False)), visual.ln_pre)


def vision_width(visual: nn.Module) -> int:
    """Width of the image tower's tokens, which vision prompts are concatenated with."""
    return vision_tower(visual).width


def vision_depth(visual: nn.Module) -> int:
    """Transformer blocks of the image tower."""
    return len(vision_tower(visual).blocks)


def layer_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A tensor entering one of ``visual``'s blocks as (L, N, D), whatever the tower's layout."""
    return x.transpose(0, 1) if vision_tower(visual).batch_first else x


def prompt_site(encoder: nn.Module) -> str:
    """``text`` or ``image``: where deep prompts go in ``encoder``; anything else is refused."""
    if isinstance(encoder, TextEncoder):
        return TEXT
    if isinstance(encoder, VisionTransformer) or is_open_clip_vit(encoder) or is_timm_tower(encoder):
        why = vision_refusal(encoder)
        if why:
            raise ValueError(f"Deep vision prompts do not fit an image tower with {why}; supported: {SUPPORTED_VISION}")
        return IMAGE
    if type(encoder).__name__ == "ModifiedResNet" or isinstance(encoder, ModifiedResNet):
        raise ValueError("Deep vision prompts need a ViT image encoder: a ResNet CLIP has no transformer "
                         "layers to prompt (MaPLe, PromptSRC and PromptAlign prompt ViT layers only)")
    raise TypeError(f"Deep prompts go into a selftpt TextEncoder or a CLIP ViT image tower (OpenAI's, open_clip's "
                    f"or EVA-CLIP's), not a {type(encoder).__name__}")


def deep_prompts(encoder: nn.Module, prompts: DeepPrompts, source: nn.Module | None = None) -> DeepPromptHandle:
    """Install ``prompts`` on ``encoder`` until the returned handle is removed.

    ``with deep_prompts(model.text_encoder, text), deep_prompts(clip_model.visual, vision): ...``
    prompts the forwards inside the block; gradients reach the tokens. Copy an encoder before
    installing, not after: a deep copy would carry hooks that this handle cannot remove.

    Args:
        encoder: a ``TextEncoder`` or ``clip_model.visual`` (OpenAI's or open_clip's ``VisionTransformer``).
        prompts: the tokens per layer (module docstring: which positions, which layers).
        source: the module the tokens were computed from (``PromptedImageEncoder`` passes its
            prompt module), so the feature cache knows that a digest of it covers them.
    """
    site = prompt_site(encoder)
    if encoder in _INSTALLED:
        raise RuntimeError(f"This {type(encoder).__name__} already has deep prompts installed; remove them first")
    blocks = encoder.transformer.resblocks if site == TEXT else vision_tower(encoder).blocks
    beyond = [i for i in prompts.layers if i >= len(blocks)]
    if beyond:
        raise ValueError(f"Deep prompts for layer(s) {beyond} of a {len(blocks)}-layer {site} transformer")
    handle = DeepPromptHandle(encoder, prompts, source)
    if prompts.n_tokens == 0:
        return handle  # nothing to hook: CLIP's own forward, bit for bit
    if site == TEXT:
        _hook_text(handle, encoder)
    else:
        _hook_image(handle, encoder)
    _INSTALLED[encoder] = handle
    return handle


def _hook_text(handle: DeepPromptHandle, encoder: TextEncoder) -> None:
    layers = handle.prompts.layers
    if 0 in layers:
        raise ValueError("Text layer 0 takes no deep prompt: its prompt is the prompt embedding itself "
                         "(the prompt learner's context); give layers >= 1")
    first = min(layers)
    start, n = TEXT_PROMPT_START, handle.prompts.n_tokens

    def replace(layer: int, module: nn.Module, args: tuple, x: torch.Tensor) -> torch.Tensor:
        if layer == first:
            handle.note_use()
        if start + n > x.shape[0]:
            raise ValueError(f"{n} deep text prompt tokens after position {start} do not fit prompts "
                             f"of {x.shape[0]} tokens (cut after the last end-of-text token)")
        tokens = _sequence_first(layers[layer], x.shape[1], x)
        return torch.cat([x[:start], tokens, x[start + n:]], dim=0)

    for layer in layers:
        handle.hooks.append(encoder.layer_inputs[layer].register_forward_hook(
            lambda module, args, x, layer=layer: replace(layer, module, args, x)))


def _hook_image(handle: DeepPromptHandle, encoder: nn.Module) -> None:
    layers = handle.prompts.layers
    if 0 not in layers:
        raise ValueError("Deep vision prompts need layer 0's tokens: they join the patch tokens there, and "
                         "deeper layers replace them")
    n = handle.prompts.n_tokens
    tower = vision_tower(encoder)

    def place(x: torch.Tensor, tokens: torch.Tensor, replace: bool) -> torch.Tensor:
        """Put ``tokens`` (n, N, D) into ``x`` (N, L, D): inserted at layer 0, over the prompt
        positions at deeper layers; after the prefix tokens (EVA) or after the patches."""
        tokens = tokens.transpose(0, 1)
        if tower.prefix_tokens is None:
            return torch.cat([x[:, :x.shape[1] - n] if replace else x, tokens], dim=1)
        start = tower.prefix_tokens
        return torch.cat([x[:, :start], tokens, x[:, start + n if replace else start:]], dim=1)

    def append(module: nn.Module, args: tuple) -> tuple:
        handle.note_use()
        x = args[0]  # (N, L, D) in every tower here, positional embedding already added
        return (place(x, _sequence_first(layers[0], x.shape[0], x), replace=False), *args[1:])

    def replace(layer: int, module: nn.Module, args: tuple) -> tuple:
        # (L, N, D), or (N, L, D) in a batch-first tower; open_clip's checkpointed blocks get more
        # positional arguments (k_x, v_x, attn_mask), passed on as they are (EVA's come as keywords)
        x = args[0]
        if tower.batch_first:
            return (place(x, _sequence_first(layers[layer], x.shape[0], x), replace=True), *args[1:])
        tokens = _sequence_first(layers[layer], x.shape[1], x)
        return (place(x.transpose(0, 1), tokens, replace=True).transpose(0, 1), *args[1:])

    handle.hooks.append(tower.entry.register_forward_pre_hook(append))
    for layer in layers:
        if layer > 0:
            handle.hooks.append(tower.blocks[layer].register_forward_pre_hook(
                lambda module, args, layer=layer: replace(layer, module, args)))
    for attention in tower.attentions:  # EVA: the prompts are prefix tokens, out of the rotary embedding
        attention.num_prefix_tokens += n
        handle.undo.append(lambda attention=attention: setattr(attention, "num_prefix_tokens",
                                                               attention.num_prefix_tokens - n))


def installed_deep_prompts(module: nn.Module) -> list[tuple[str, DeepPromptHandle]]:
    """(submodule name, handle) of the prompts installed on ``module`` or inside it."""
    return [(name, _INSTALLED[m]) for name, m in module.named_modules() if m in _INSTALLED]


def foreign_forward_hooks(module: nn.Module) -> list[str]:
    """Names of the submodules of ``module`` with forward hooks that deep prompts did not install
    (their effect on the outputs is unknown, so cached features cannot be trusted)."""
    ours = {hook.id for handle in list(_INSTALLED.values()) for hook in handle.hooks}
    # torch has no public listing of a module's hooks; these dicts are keyed by handle id.
    return [name or type(module).__name__ for name, m in module.named_modules()
            if set(m._forward_pre_hooks) - ours or set(m._forward_hooks) - ours]


@contextlib.contextmanager
def recording_prompt_use(module: nn.Module) -> Iterator[list[DeepPromptHandle]]:
    """Collect, while the block runs, every handle whose prompts changed a forward of ``module``
    or of one of its submodules, including handles installed and removed inside the block."""
    entry: tuple[set[nn.Module], list[DeepPromptHandle]] = (set(module.modules()), [])
    _USE_LOGS.append(entry)
    try:
        yield entry[1]
    finally:
        _USE_LOGS.remove(entry)


class PromptedImageEncoder(nn.Module):
    """CLIP's ViT (OpenAI's or open_clip's) with deep vision prompts computed by ``prompts()`` at
    every forward, as one module.

    Every tensor the image features depend on is a parameter or buffer of this module (the
    encoder's and the prompt module's), so the feature cache's digest of it covers the prompts:
    a trainer returns this module, not ``visual``, from ``image_encoder_for_cache``.

    Args:
        visual: ``clip_model.visual``, shared, not copied.
        prompts: a module whose ``forward()`` returns the ``DeepPrompts``; whatever the tokens
            depend on must be its parameters, buffers or submodules.
    """

    def __init__(self, visual: nn.Module, prompts: nn.Module) -> None:
        super().__init__()
        prompt_site(visual)
        self.visual = visual
        self.prompts = prompts

    @property
    def output_dim(self) -> int:
        return self.visual.output_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with deep_prompts(self.visual, self.prompts(), source=self.prompts):
            return self.visual(images)
