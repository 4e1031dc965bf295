"""Loading OpenAI CLIP models, written once for every trainer.

A backbone is named as in ``clip.available_models()`` (downloaded to ``~/.cache/clip`` on a
machine with internet), or as one of the project's built-in benchmark backbones (shipped
in ``selftpt/assets``), or given as a local file: a TorchScript archive as OpenAI publishes
them, or a plain ``state_dict`` (``clip.load`` cannot read those with current torch).
``open_clip:...`` names are OpenCLIP / EVA-CLIP models, built by ``selftpt.open_clip_backend``
(an optional extra) behind the same interface, with their own tokenizer.
Architectures are data (``CLIP_ARCHS``) so that any of them can also be built with random
weights, e.g. for speed and memory measurements where no weights can be downloaded.
"""
from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

with warnings.catch_warnings():  # clip imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP, build_model, convert_weights

from selftpt.errors import ConfigError, UserError
from selftpt.fsmode import atomic_write

ASSET_DIR = Path(__file__).resolve().parent / "assets"

# Constructor arguments of clip.model.CLIP for each published model.
CLIP_ARCHS: dict[str, dict[str, Any]] = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, vocab_size=49408,
                 transformer_width=512, transformer_heads=8, transformer_layers=12),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64,
                  vision_patch_size=None, context_length=77, vocab_size=49408,
                  transformer_width=512, transformer_heads=8, transformer_layers=12),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
                   vision_patch_size=None, context_length=77, vocab_size=49408,
                   transformer_width=640, transformer_heads=10, transformer_layers=12),
    "RN50x16": dict(embed_dim=768, image_resolution=384, vision_layers=(6, 8, 18, 8), vision_width=96,
                    vision_patch_size=None, context_length=77, vocab_size=49408,
                    transformer_width=768, transformer_heads=12, transformer_layers=12),
    "RN50x64": dict(embed_dim=1024, image_resolution=448, vision_layers=(3, 15, 36, 10),
                    vision_width=128, vision_patch_size=None, context_length=77, vocab_size=49408,
                    transformer_width=1024, transformer_heads=16, transformer_layers=12),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, context_length=77, vocab_size=49408,
                     transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, context_length=77, vocab_size=49408,
                     transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, context_length=77, vocab_size=49408,
                     transformer_width=768, transformer_heads=12, transformer_layers=12),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                           vision_patch_size=14, context_length=77, vocab_size=49408,
                           transformer_width=768, transformer_heads=12, transformer_layers=12),
    # The built-in benchmark's tiny CLIP (selftpt/benchmark/pretrain.py): a ModifiedResNet of
    # one bottleneck per stage on 32 px images (tiny ViTs learnt shape far slower on 2 cores);
    # text width a multiple of 64 because build_model infers heads as width // 64.
    "Bench-RN-T": dict(embed_dim=128, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=16,
                       vision_patch_size=None, context_length=32, vocab_size=49408,
                       transformer_width=128, transformer_heads=2, transformer_layers=3),
    # The benchmark's second backbone (selftpt/benchmark/staged.py): Bench-RN-T's
    # trunk at 64 px (the 32-px images upsampled), so the stem leaves 16x16 of the image, not
    # 8x8; trainer configs for it set INPUT.SIZE (64, 64).
    "Bench-RN-S": dict(embed_dim=128, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                       vision_patch_size=None, context_length=32, vocab_size=49408,
                       transformer_width=128, transformer_heads=2, transformer_layers=3),
    # The benchmark's ViT (selftpt/benchmark/distill.py), for the methods that prompt ViT layers:
    # Bench-RN-S's text tower and a 4-layer ViT (patch 16 at 64 px: 4x4 patches of the upsampled
    # image) distilled from Bench-RN-S's image features; trainer configs for it set INPUT.SIZE (64, 64).
    "Bench-ViT-S": dict(embed_dim=128, image_resolution=64, vision_layers=4, vision_width=128,
                        vision_patch_size=16, context_length=32, vocab_size=49408,
                        transformer_width=128, transformer_heads=2, transformer_layers=3),
}

# Built-in backbones: name -> file under selftpt/assets (a state_dict made by the
# project's own pretraining script, see selftpt/benchmark/pretrain.py).
BUILTIN_BACKBONES: dict[str, str] = {"Bench-RN-T": "bench_rn_tiny.pt", "Bench-RN-S": "bench_rn_small.pt",
                                      "Bench-ViT-S": "bench_vit_small.pt"}


class BackboneError(UserError, ValueError):
    """A backbone name or file that cannot be loaded; the message says how to fix it."""


def available_backbones() -> list[str]:
    """Every backbone name ``load_clip`` accepts (besides a file path)."""
    return list(clip.available_models()) + sorted(BUILTIN_BACKBONES)


def build_random_clip(arch: str | dict[str, Any], seed: int | None = 0) -> CLIP:
    """A CLIP model of a named (or given) architecture with random fp32 weights.

    Args:
        arch: a key of ``CLIP_ARCHS`` or a dict of ``clip.model.CLIP`` constructor arguments.
        seed: seeds torch's generator for the initialisation (None leaves it alone).
    """
    if isinstance(arch, str):
        if arch not in CLIP_ARCHS:
            raise BackboneError(_unknown_message(arch, list(CLIP_ARCHS)))
        arch = CLIP_ARCHS[arch]
    if seed is not None:
        torch.manual_seed(seed)
    return CLIP(**arch).float().eval()


def _unknown_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"Unknown CLIP backbone {name!r}; {hint}available: {', '.join(known)} (or a path to a local file)"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read CLIP weights from a TorchScript archive or a plain (possibly wrapped) state_dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BackboneError(f"CLIP weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated, OpenAI's files need it
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").eval().state_dict()
    except RuntimeError:
        pass  # not TorchScript: a pickled state_dict
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise BackboneError(f"{path} is neither a TorchScript CLIP archive nor a state_dict ({exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or "text_projection" not in obj:
        raise BackboneError(f"{path} does not hold CLIP weights (no 'text_projection' key)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def resolve_backbone_file(name: str, path: str = "", download_root: str | None = None) -> str:
    """The local file holding backbone ``name``: ``path`` if given, a built-in asset, or a download."""
    if path:
        return path
    if name in BUILTIN_BACKBONES:
        return str(ASSET_DIR / BUILTIN_BACKBONES[name])
    if name in clip.available_models():
        root = download_root or os.path.expanduser("~/.cache/clip")
        try:
            return clip.clip._download(clip.clip._MODELS[name], root)
        except OSError as exc:  # urllib errors subclass OSError
            raise BackboneError(
                f"Could not download CLIP {name} into {root} ({exc}); on an offline machine copy the "
                f"file there, or set MODEL.BACKBONE.PATH to a local copy"
            ) from exc
    if os.path.isfile(name):
        return name
    raise BackboneError(_unknown_message(name, available_backbones()))


def local_backbone_file(name: str, path: str = "", download_root: str | None = None) -> str | None:
    """The file ``load_clip`` would read for backbone ``name`` when it is on this machine
    already (``path``, a file named ``name``, a built-in asset, OpenAI's file in the download
    cache), else None; never downloads (a benchmark then builds random weights instead)."""
    if path:
        return path
    if os.path.isfile(name):
        return name
    if name in BUILTIN_BACKBONES and (ASSET_DIR / BUILTIN_BACKBONES[name]).is_file():
        return str(ASSET_DIR / BUILTIN_BACKBONES[name])
    url = clip.clip._MODELS.get(name)
    if url:
        cached = Path(download_root or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return str(cached)
    return None


def image_resolution(state_dict: dict[str, torch.Tensor]) -> int:
    """Input resolution of CLIP weights, inferred as ``clip.model.build_model`` does."""
    if "visual.proj" in state_dict:  # ViT
        patch = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return int(patch * grid)
    grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return int(grid * 32)


def load_clip(name: str, path: str = "", device: str | torch.device = "cpu",
              precision: str = "fp32") -> CLIP:
    """Load a CLIP model in eval mode, on ``device``, in the given precision.

    Args:
        name: backbone name (``ViT-B/16``, a built-in benchmark backbone) or a file path.
        path: optional local file with the weights; takes precedence over downloading.
        device: target device.
        precision: ``fp16`` keeps CLIP's half weights; ``fp32``/``amp`` load fp32 (``selftpt.precision``).
    """
    if is_open_clip_name(name):
        from selftpt.open_clip_backend import load_open_clip
        return load_open_clip(name, path, precision).to(device).eval()
    state_dict = read_state_dict(resolve_backbone_file(name, path))
    try:
        model = build_model(state_dict)  # converts to fp16, as CoOp's load_clip_to_cpu
    except (KeyError, RuntimeError) as exc:
        raise BackboneError(f"Weights for {name!r} do not fit a CLIP architecture ({exc})") from exc
    if precision in ("fp32", "amp"):
        model.float()
    return model.to(device).eval()


def save_state_dict(model: CLIP, path: str | os.PathLike, half: bool = True) -> None:
    """Write a CLIP model's weights as a state_dict that ``load_clip`` reads (atomically)."""
    if half:
        convert_weights(model)
    with atomic_write(path) as f:
        torch.save(model.state_dict(), f)


def is_open_clip_name(name: str) -> bool:
    """True for an ``open_clip:`` backbone name (``selftpt.open_clip_backend``)."""
    return name.startswith("open_clip:")


class Tokenizer(Protocol):
    """CLIP-style tokenisation: a start token, the text's BPE tokens, an end token, zero padding."""

    def count(self, text: str) -> int:
        """BPE tokens of ``text`` without the start and end tokens."""

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        """(n, context_length) token ids; every text fits (checked by ``tokenize``)."""


class OpenAITokenizer:
    """OpenAI's ``clip`` tokenizer (the one every OpenAI CLIP model uses)."""

    def count(self, text: str) -> int:
        return len(clip.clip._tokenizer.encode(text))

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        return clip.tokenize(texts, context_length=context_length)


OPENAI_TOKENIZER = OpenAITokenizer()


def text_tokenizer(clip_model: Any) -> Tokenizer:
    """The tokenizer of ``clip_model``: its own (open_clip models), else OpenAI's."""
    return getattr(clip_model, "tokenizer", None) or OPENAI_TOKENIZER


def token_count(text: str, tokenizer: Tokenizer | None = None) -> int:
    """BPE tokens of ``text`` without the start and end tokens (CoOp's ``name_lens``)."""
    return (tokenizer or OPENAI_TOKENIZER).count(text)


def tokenize(texts: str | list[str], context_length: int, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """Tokenise with the model's own context length (and tokenizer; default OpenAI's); an
    over-long text names itself."""
    tokenizer = tokenizer or OPENAI_TOKENIZER
    texts = [texts] if isinstance(texts, str) else list(texts)
    long = next((t for t in texts if tokenizer.count(t) + 2 > context_length), None)
    if long is not None:
        raise ConfigError(
            f"Text {long!r} is longer than the text encoder's context length ({context_length} tokens); "
            "shorten the class name or the prompt template"
        )
    return tokenizer(texts, context_length)
