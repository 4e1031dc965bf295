"""OpenCLIP and EVA-CLIP backbones through ``open_clip`` (the optional ``openclip`` extra).

A backbone named ``open_clip:<spec>`` is built by ``open_clip.create_model`` and wrapped in
``OpenClipModel``, which gives it the attribute names of OpenAI's ``clip.model.CLIP`` that the
trainers, ``TextEncoder`` and ``PromptLearner`` read (``visual``, ``token_embedding``,
``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``, ``logit_scale``,
``dtype``, ``context_length``, ``encode_text``, ``encode_image``), plus what OpenAI's model
leaves implicit: the text tower's layout (``text_layout``), its tokenizer and the image
preprocessing it was trained with. ``<spec>`` is one of:

- ``<arch>/<tag>``: a built-in architecture with published weights (``open_clip.list_pretrained()``),
  downloaded to open_clip's usual cache (Hugging Face hub cache, or ``~/.cache/clip`` for URLs);
- ``<arch>@<file>``: a built-in architecture with weights from a local file (state_dict,
  ``.safetensors``, open_clip checkpoint);
- ``hf-hub:<org>/<repo>`` or ``local-dir:<folder>``: open_clip's own schemas (a folder holds
  ``open_clip_config.json`` and the weights).

Text towers: the standard ``open_clip.CLIP`` layout and ``CustomTextCLIP`` whose ``text`` is a
``TextTransformer``, tokenised by CLIP's BPE (``SimpleTokenizer``: a start token, the text, an
end token), which the prompt learner's layouts assume. Hugging Face text encoders and
tokenizers, CoCa and towers with an appended class token are refused in one line.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selftpt.errors import UserError
from selftpt.text_encoder import TextLayout

PREFIX = "open_clip:"
INSTALL_HINT = 'pip install -e ".[openclip]" (or pip install open-clip-torch)'
SCHEMAS = ("hf-hub:", "local-dir:")
# Text pooling this project reproduces: open_clip's ``text_global_pool`` types but 'none'.
SUPPORTED_POOLS = ("argmax", "eos", "first", "last")
SUPPORTED_TEXT = ("open_clip.CLIP (OpenAI-style text tower) and CustomTextCLIP with a TextTransformer text "
                  "tower and CLIP's BPE tokenizer")


class OpenClipError(UserError, ValueError):
    """An ``open_clip:`` backbone that cannot be used; the message says how to fix it."""


def is_open_clip_name(name: str) -> bool:
    """True for a backbone name this module handles (``open_clip:...``)."""
    return name.startswith(PREFIX)


def import_open_clip() -> Any:
    """``open_clip``, or a one-line error saying how to install it (it is an optional extra)."""
    try:
        import open_clip
    except ImportError as exc:
        raise OpenClipError(f"open_clip backbones need the open-clip-torch package ({exc}); install it: "
                            f"{INSTALL_HINT}") from None
    return open_clip


@dataclass(frozen=True)
class OpenClipSpec:
    """A parsed ``open_clip:`` name: architecture (or schema name) and where its weights are."""

    name: str  # the full backbone name, for messages
    arch: str  # a built-in architecture, or "hf-hub:..." / "local-dir:..."
    tag: str = ""  # a published pretrained tag of ``arch``
    file: str = ""  # a local weights file

    @property
    def schema(self) -> bool:
        return self.arch.startswith(SCHEMAS)


def parse_name(name: str, path: str = "") -> OpenClipSpec:
    """Parse and check ``open_clip:<arch>/<tag>``, ``open_clip:<arch>@<file>`` or a schema name.

    Args:
        name: the backbone name (``MODEL.BACKBONE.NAME``).
        path: ``MODEL.BACKBONE.PATH``: a local weights file; overrides the tag's download.
    """
    open_clip = import_open_clip()
    spec = name[len(PREFIX):].strip()
    if spec.startswith(SCHEMAS):
        if path:
            raise OpenClipError(f"MODEL.BACKBONE.PATH cannot be combined with {name!r} (the schema names its "
                                f"weights); use open_clip:<arch>@<file> for a local weights file")
        if spec.startswith("local-dir:") and not (Path(spec[len("local-dir:"):]) / "open_clip_config.json").is_file():
            raise OpenClipError(f"{name}: no open_clip_config.json in {spec[len('local-dir:'):]}; a local-dir "
                                f"folder holds open_clip's config and weights as on the Hugging Face hub")
        return OpenClipSpec(name, spec)
    arch, tag, file = spec, "", ""
    if "@" in spec:
        arch, file = spec.split("@", 1)
    elif "/" in spec:
        arch, tag = spec.split("/", 1)
    file = path or file
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise OpenClipError(f"Unknown open_clip architecture {arch!r} in {name!r}; {hint}see "
                            f"open_clip.list_models() (name it open_clip:<arch>/<tag> or open_clip:<arch>@<file>)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise OpenClipError(f"open_clip {arch} has no pretrained tag {tag!r}; its tags: {', '.join(tags) or 'none'} "
                            f"(or give a weights file: open_clip:{arch}@/path/to/weights)")
    if not tag and not file:
        raise OpenClipError(f"{name!r} names no weights: use open_clip:{arch}/<tag> (tags: {', '.join(tags) or 'none'})"
                            f" or open_clip:{arch}@/path/to/weights")
    if file and not os.path.isfile(file):
        raise OpenClipError(f"open_clip weights file not found: {file} (backbone {name})")
    return OpenClipSpec(name, arch, tag, file)


def model_config(spec: OpenClipSpec) -> dict[str, Any]:
    """The architecture's open_clip config (``model_cfg``), read without building the model."""
    open_clip = import_open_clip()
    if spec.arch.startswith("local-dir:"):
        config_file = Path(spec.arch[len("local-dir:"):]) / "open_clip_config.json"
        return json.loads(config_file.read_text(encoding="utf-8"))["model_cfg"]
    if spec.arch.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config
        try:
            return _get_hf_config(spec.arch[len("hf-hub:"):])["model_cfg"]
        except Exception as exc:  # noqa: BLE001 - any hub failure means the same to the user
            raise OpenClipError(f"Could not fetch open_clip_config.json of {spec.name} ({type(exc).__name__}); "
                                f"offline, download the repo elsewhere and use open_clip:local-dir:<folder>") from None
    return open_clip.get_model_config(spec.arch)


def check_text_config(spec: OpenClipSpec, cfg: dict[str, Any]) -> None:
    """Refuse, before any weights are read, a text tower the prompt learner cannot drive."""
    text = cfg.get("text_cfg", {})
    refusal = ""
    if "multimodal_cfg" in cfg:
        refusal = "CoCa's captioning text tower"
    elif text.get("hf_model_name"):
        refusal = f"a Hugging Face text encoder ({text['hf_model_name']})"
    elif text.get("hf_tokenizer_name"):
        refusal = f"a Hugging Face tokenizer ({text['hf_tokenizer_name']}) instead of CLIP's BPE"
    elif text.get("embed_cls"):
        refusal = "a text tower that appends a class token"
    elif text.get("pool_type", "argmax") not in SUPPORTED_POOLS:
        refusal = f"text pooling {text.get('pool_type')!r}"
    if refusal:
        raise OpenClipError(f"{spec.name} has {refusal}, which prompt learning here does not support; "
                            f"supported: {SUPPORTED_TEXT}")


def expected_preprocess(spec: OpenClipSpec) -> dict[str, Any]:
    """The image preprocessing open_clip would attach to the model (``create_model``'s rule:
    its defaults, then the pretrained tag's, the image size of the vision config), without
    building it; for local-dir, the folder's ``preprocess_cfg``."""
    open_clip = import_open_clip()
    from open_clip.transform import merge_preprocess_dict
    preprocess = default_preprocess()
    if spec.arch.startswith("local-dir:"):
        config_file = Path(spec.arch[len("local-dir:"):]) / "open_clip_config.json"
        extra = json.loads(config_file.read_text(encoding="utf-8")).get("preprocess_cfg", {})
        preprocess = merge_preprocess_dict(preprocess, extra)
    elif spec.tag:
        preprocess = merge_preprocess_dict(preprocess, open_clip.get_pretrained_cfg(spec.arch, spec.tag))
    size = model_config(spec).get("vision_cfg", {}).get("image_size", preprocess["size"])
    preprocess["size"] = size
    return preprocess


def _pair(size: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def preprocess_mismatch(preprocess: dict[str, Any], input_cfg: Any, name: str) -> str:
    """A one-line message naming the INPUT values to set when ``input_cfg`` (the config's
    INPUT node) does not preprocess images as the backbone was trained, else ""."""
    want = {
        "INPUT.SIZE": list(_pair(preprocess["size"])),
        "INPUT.PIXEL_MEAN": [float(v) for v in preprocess["mean"]],
        "INPUT.PIXEL_STD": [float(v) for v in preprocess["std"]],
        "INPUT.INTERPOLATION": str(preprocess["interpolation"]),
    }
    have = {
        "INPUT.SIZE": [int(v) for v in input_cfg.SIZE],
        "INPUT.PIXEL_MEAN": [float(v) for v in input_cfg.PIXEL_MEAN],
        "INPUT.PIXEL_STD": [float(v) for v in input_cfg.PIXEL_STD],
        "INPUT.INTERPOLATION": str(input_cfg.INTERPOLATION),
    }

    def differs(key: str) -> bool:
        if key == "INPUT.INTERPOLATION" or key == "INPUT.SIZE":
            return want[key] != have[key]
        return any(abs(a - b) > 1e-6 for a, b in zip(want[key], have[key], strict=True))

    wrong = [key for key in want if differs(key)]
    if not wrong:
        return ""
    fix = " ".join(f"{key} {json.dumps(want[key])}" for key in wrong)
    now = ", ".join(f"{key} {json.dumps(have[key])}" for key in wrong)
    return f"Backbone {name} preprocesses images differently from this config ({now}); set {fix}"


def resize_note(preprocess: dict[str, Any], name: str) -> str:
    """A note when open_clip resizes otherwise than the project's transforms (shorter side to
    the size, then a centre crop = open_clip's 'shortest'); "" when they agree."""
    mode = preprocess.get("resize_mode", "shortest")
    if mode == "shortest":
        return ""
    return (f"Note: {name} was trained with open_clip resize mode {mode!r}; this project resizes the shorter "
            f"side and centre-crops ('shortest'), so non-square images are framed differently")


def _hub_weights(pretrained_cfg: dict[str, Any]) -> tuple[str, list[str]]:
    """(repo id, candidate file names in open_clip's order) of a tag hosted on the HF hub."""
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives
    model_id, filename = os.path.split(pretrained_cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    return model_id, [*_get_safe_alternatives(filename), filename]


def _offline() -> bool:
    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def cached_weights(spec: OpenClipSpec) -> str | None:
    """The local file of ``spec``'s weights when they are on this machine already (a given
    file, or the tag's file in open_clip's download cache), else None; never downloads."""
    if spec.file:
        return spec.file
    if not spec.tag:
        return None
    open_clip = import_open_clip()
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
    if cfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache
        model_id, files = _hub_weights(cfg)
        for filename in files:
            found = try_to_load_from_cache(model_id, filename, cache_dir=constants.HF_HUB_CACHE)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        file = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if file.is_file():
            return str(file)
    return None


def _missing_weights(spec: OpenClipSpec, reason: str) -> OpenClipError:
    open_clip = import_open_clip()
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
    if cfg.get("hf_hub"):
        from huggingface_hub import constants
        model_id, files = _hub_weights(cfg)
        what = f"{files[0]} (or {files[-1]}) of the Hugging Face repo {model_id}"
        where = f"the Hugging Face cache {constants.HF_HUB_CACHE} (hf download {model_id} {files[0]})"
    else:
        what = cfg.get("url", "the weights")
        where = os.path.expanduser("~/.cache/clip")
    return OpenClipError(f"Weights of {spec.name} are not on this machine ({reason}): fetch {what} into {where}, "
                         f"or point open_clip:{spec.arch}@/path/to/file (or MODEL.BACKBONE.PATH) at a local copy")


def resolve_weights(spec: OpenClipSpec) -> str | None:
    """The weights file of ``spec``: given, cached, or downloaded into open_clip's cache; a
    one-line error naming what to fetch and where when that fails. None for schema names
    (``create_model`` finds those weights itself)."""
    if spec.arch.startswith("local-dir:"):
        from open_clip.factory import _find_checkpoint_in_dir
        folder = spec.arch[len("local-dir:"):]
        if not _find_checkpoint_in_dir(Path(folder)):  # open_clip would build random weights, with a warning
            raise OpenClipError(f"{spec.name}: no weights file in {folder} (open_clip_model.safetensors, "
                                f"open_clip_pytorch_model.bin, ...); copy the repo's weights there")
        return None
    if spec.schema:
        return None
    found = cached_weights(spec)
    if found:
        return found
    if _offline():
        raise _missing_weights(spec, "HF_HUB_OFFLINE is set")
    open_clip = import_open_clip()
    try:
        return open_clip.download_pretrained(open_clip.get_pretrained_cfg(spec.arch, spec.tag))
    except Exception as exc:  # noqa: BLE001 - network, hub or checksum failures: the same fix
        raise _missing_weights(spec, f"download failed: {type(exc).__name__}") from None


class OpenClipTokenizer:
    """open_clip's ``SimpleTokenizer`` (CLIP's BPE with the model's text cleaning) behind the
    interface of ``clip_loader.Tokenizer``; a text longer than the context is refused instead
    of truncated as open_clip would."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        """BPE tokens of ``text`` without the start and end tokens."""
        return len(self.tokenizer.encode(text))

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        return self.tokenizer(texts, context_length=context_length)


def _text_parts(model: nn.Module) -> nn.Module:
    """The module holding the text tower's parts, or a one-line refusal of an unsupported one."""
    open_clip = import_open_clip()
    from open_clip.transformer import TextTransformer
    if isinstance(model, open_clip.CoCa):
        text = None
    elif isinstance(model, open_clip.CustomTextCLIP):
        text = model.text if isinstance(model.text, TextTransformer) else None
    elif isinstance(model, open_clip.CLIP):
        text = model
    else:
        text = None
    if text is None:
        tower = type(getattr(model, "text", model)).__name__
        raise OpenClipError(f"open_clip text tower {tower} is not supported; supported: {SUPPORTED_TEXT}")
    if getattr(text, "cls_emb", None) is not None:
        raise OpenClipError(f"open_clip text tower with an appended class token is not supported; "
                            f"supported: {SUPPORTED_TEXT}")
    return text


class OpenClipModel(nn.Module):
    """An open_clip model with the attribute names of OpenAI's ``clip.model.CLIP``.

    The text tower's parts are read from the model (standard layout) or its ``text``
    (``CustomTextCLIP``) and shared, not copied; ``encode_text`` / ``encode_image`` are
    open_clip's own, so zero-shot classification is open_clip's. ``logit_bias`` (SigLIP-style
    models) is left out of the logits: adding one constant to every class's logit changes
    neither softmax, entropy nor accuracy.

    Args:
        model: an ``open_clip.CLIP`` or ``CustomTextCLIP``.
        tokenizer: the model's tokenizer (``OpenClipTokenizer``).
        preprocess: the image preprocessing it was trained with (open_clip's ``PreprocessCfg`` dict).
        name: the backbone name, for messages.
    """

    def __init__(self, model: nn.Module, tokenizer: OpenClipTokenizer, preprocess: dict[str, Any],
                 name: str) -> None:
        super().__init__()
        text = _text_parts(model)
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = dict(preprocess)
        self.name = name
        object.__setattr__(self, "_text", text)  # a part of ``model``; not registered twice
        pool = model.text_pool_type if text is model else text.pool_type
        if pool not in SUPPORTED_POOLS:
            raise OpenClipError(f"{name}: text pooling {pool!r} is not supported; supported: {SUPPORTED_TEXT}")
        eos = getattr(text, "text_eos_id", None) if text is model else getattr(text, "eos_id", None)
        heads = text.transformer.resblocks[0].attn.num_heads
        pad = getattr(text, "pad_id", None) if getattr(text, "use_pad_mask", False) else None
        self.text_layout = TextLayout(
            batch_first=bool(getattr(text.transformer, "batch_first", True)),
            causal=getattr(text, "attn_mask", None) is not None, pool=pool, eos_id=eos, pad_id=pad, heads=heads)
        visual = model.visual
        # OpenAI's names for what the trainers read off the image tower.
        size = _pair(preprocess["size"])
        if not hasattr(visual, "input_resolution"):
            visual.input_resolution = size[0]
        if not hasattr(visual, "output_dim"):
            visual.output_dim = self.embed_dim

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._text.token_embedding

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self._text.positional_embedding

    @property
    def transformer(self) -> nn.Module:
        return self._text.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self._text.ln_final

    @property
    def text_projection(self) -> torch.Tensor | nn.Module | None:
        return self._text.text_projection

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def context_length(self) -> int:
        return int(self._text.positional_embedding.shape[0])

    @property
    def embed_dim(self) -> int:
        proj = self.text_projection
        if proj is None:
            return int(self.ln_final.weight.shape[0])
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The text tower's weight dtype (open_clip's cast dtype); prompts are built in it."""
        return self._text.transformer.get_cast_dtype()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """open_clip's own ``encode_text`` on token ids (unnormalised features)."""
        return self.model.encode_text(text)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """open_clip's own ``encode_image`` (unnormalised features)."""
        return self.model.encode_image(image)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenAI's CLIP forward: (image logits, text logits)."""
        image_features = nn.functional.normalize(self.encode_image(image), dim=-1)
        text_features = nn.functional.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * image_features @ text_features.t()
        return logits, logits.t()


def wrap(model: nn.Module, name: str, tokenizer_name: str | None = None) -> OpenClipModel:
    """Wrap a built open_clip model (its preprocessing is the one open_clip attached)."""
    open_clip = import_open_clip()
    raw = open_clip.get_tokenizer(tokenizer_name) if tokenizer_name else open_clip.SimpleTokenizer()
    if not isinstance(raw, open_clip.SimpleTokenizer):
        raise OpenClipError(f"{name} tokenizes with {type(raw).__name__}, not CLIP's BPE; supported: {SUPPORTED_TEXT}")
    preprocess = open_clip.get_model_preprocess_cfg(model) or default_preprocess()
    return OpenClipModel(model, OpenClipTokenizer(raw), preprocess, name)


def default_preprocess() -> dict[str, Any]:
    """open_clip's default preprocessing (OpenAI's mean/std, bicubic, 'shortest' resize)."""
    from open_clip.transform import PreprocessCfg
    return asdict(PreprocessCfg())


def load_open_clip(name: str, path: str = "", precision: str = "fp32") -> OpenClipModel:
    """Build ``open_clip:<spec>`` with its weights in eval mode on CPU (see the module docstring).

    Args:
        name: ``open_clip:<arch>/<tag>``, ``open_clip:<arch>@<file>`` or a schema name.
        path: ``MODEL.BACKBONE.PATH``: a local weights file (overrides the tag's download).
        precision: ``fp16`` casts as open_clip's fp16 (LayerNorms stay fp32); ``fp32``/``amp`` fp32.
    """
    open_clip = import_open_clip()
    spec = parse_name(name, path)
    config = model_config(spec)
    check_text_config(spec, config)
    weights = resolve_weights(spec)
    kwargs: dict[str, Any] = {}
    if spec.tag:
        tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
        if tag_cfg.get("quick_gelu") and not config.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True  # the tag was trained with QuickGELU
        # the tag's preprocessing, which create_model only attaches when it downloads the tag itself
        kwargs["force_preprocess_cfg"] = {k: v for k, v in tag_cfg.items()
                                          if k in ("mean", "std", "interpolation", "resize_mode", "fill_color")}
    try:
        model = open_clip.create_model(spec.arch, pretrained=weights, device="cpu",
                                       precision="fp16" if precision == "fp16" else "fp32", **kwargs)
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OpenClipError(f"Weights for {name} do not fit open_clip {spec.arch} ({first[:300]})") from None
    return wrap(model, name, spec.arch).eval()


def build_random(arch: str, seed: int | None = 0) -> nn.Module:
    """An open_clip architecture with random fp32 weights (speed and memory measurements)."""
    open_clip = import_open_clip()
    if arch not in open_clip.list_models():
        raise OpenClipError(f"Unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if seed is not None:
        torch.manual_seed(seed)
    return open_clip.create_model(arch, pretrained=None, device="cpu").float().eval()


def check_input(preprocess: dict[str, Any], input_cfg: Any, name: str) -> None:
    """Refuse a config whose INPUT does not preprocess images as ``name`` was trained (one line
    naming the values to set); print a note on a resize mode the transforms cannot reproduce."""
    message = preprocess_mismatch(preprocess, input_cfg, name)
    if message:
        raise OpenClipError(message)
    note = resize_note(preprocess, name)
    if note:
        print(note)


def check_backbone_cfg(cfg: Any) -> None:
    """What can be checked of an ``open_clip:`` backbone before anything is built or read: the
    package, the name, the text tower and the image preprocessing against ``cfg.INPUT``
    (from open_clip's configs; the weights are not touched)."""
    spec = parse_name(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PATH)
    if spec.arch.startswith("hf-hub:"):
        return  # its config is on the hub: checked when the model is built
    check_text_config(spec, model_config(spec))
    message = preprocess_mismatch(expected_preprocess(spec), cfg.INPUT, spec.name)
    if message:
        raise OpenClipError(message)


def benchmark_backbone(name: str, path: str = "", random_weights: bool = False,
                       work_dir: str | os.PathLike = "output/efficiency", seed: int = 0) -> dict[str, Any]:
    """``efficiency.cli.prepare_backbone`` for ``open_clip:`` names: weights from ``path``, the
    name's file or open_clip's cache (never a download), else random weights of the
    architecture written once under ``work_dir/backbones``; ``input_opts`` are the INPUT
    values of the backbone's preprocessing, for every measured config."""
    from selftpt.fsmode import atomic_write
    import_open_clip()
    spec_text = name[len(PREFIX):]
    if spec_text.startswith(SCHEMAS):
        spec = parse_name(name)
        file, weights = "", spec.arch
    else:
        arch = spec_text.split("@", 1)[0].split("/", 1)[0]
        if arch == spec_text and not path:  # a bare architecture: random weights (speed does not need others)
            if arch not in import_open_clip().list_models():
                raise OpenClipError(f"Unknown open_clip architecture {arch!r} in {name!r}; see open_clip.list_models()")
            spec = OpenClipSpec(name, arch)
        else:
            spec = parse_name(name, path)
        file = "" if random_weights else (cached_weights(spec) or "")
        weights = file
        if not file:
            safe = "".join(c if c.isalnum() else "-" for c in spec.arch)
            file = str(Path(work_dir) / "backbones" / f"random_open_clip_{safe}_seed{seed}.pt")
            if not os.path.isfile(file):
                Path(file).parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(file) as f:
                    torch.save(build_random(spec.arch, seed).state_dict(), f)
            weights = f"random (seed {seed})"
        file = os.path.abspath(file)
    check_text_config(spec, model_config(spec))
    preprocess = expected_preprocess(spec)
    size = _pair(preprocess["size"])
    input_opts = ["INPUT.PIXEL_MEAN", json.dumps([float(v) for v in preprocess["mean"]]),
                  "INPUT.PIXEL_STD", json.dumps([float(v) for v in preprocess["std"]]),
                  "INPUT.INTERPOLATION", str(preprocess["interpolation"])]
    return {"label": name, "backbone_name": name, "backbone_path": file, "weights": weights,
            "resolution": size[0], "input_opts": input_opts}
