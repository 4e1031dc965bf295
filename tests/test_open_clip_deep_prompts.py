"""Deep prompts on open_clip backbones (selftpt/deep_prompts.py): open_clip's own
``VisionTransformer`` takes vision prompts exactly as a forward written out here says (appended
after the positional embedding, replaced before prompted layers, batch-first or not, with
open_clip's gradient checkpointing), the text prompts hook the same sequence-first points,
EVA-CLIP's timm tower takes them as prefix tokens, equal to appended prompts without rotary
position, MaPLe / PromptSRC and their test-time variants run on a tiny random open_clip ViT built
offline, and towers the seams do not fit (a timm tower other than EVA, an attentional pooler,
average pooling, a ResNet) are refused in one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")
from open_clip.modified_resnet import ModifiedResNet  # noqa: E402

from selftpt import open_clip_backend  # noqa: E402
from selftpt.clip_loader import load_clip  # noqa: E402
from selftpt.deep_prompts import (  # noqa: E402
    DeepPrompts,
    PromptedImageEncoder,
    deep_prompts,
    installed_deep_prompts,
    recording_prompt_use,
    require_vit_backbone,
    vision_depth,
    vision_width,
)
from selftpt.errors import ConfigError  # noqa: E402
from selftpt.launch import EXIT_USER_ERROR, main  # noqa: E402
from selftpt.open_clip_backend import OpenClipTokenizer  # noqa: E402
from selftpt.promptsrc import PROMPTSRC_TEMPLATES  # noqa: E402
from selftpt.text_encoder import TextEncoder  # noqa: E402
from selftpt.token_stats import recording_tokens  # noqa: E402
from tests.helpers import TINY_CLASSES, tiny_opts  # noqa: E402
from tests.test_open_clip import CONFIGS, TEXT, _register_tiny_eva, build, one_line, one_step  # noqa: E402

# Three layers per tower (prompted and unprompted deeper layers), vision width 96 != text 64
# (MaPLe's projections), class token + 4 patches.
DEEP_TEXT = {**TEXT, "layers": 3}
DEEP_VIT = {"image_size": 32, "layers": 3, "width": 96, "patch_size": 16, "head_width": 32}
DEEP_CONFIGS = {
    "Test-Deep-ViT": {"embed_dim": 32, "vision_cfg": DEEP_VIT, "text_cfg": DEEP_TEXT},
    # layer scale, a custom block and no ln_pre: the hooks must not depend on the block's internals
    "Test-Deep-Custom": {"embed_dim": 32, "custom_text": True, "text_cfg": DEEP_TEXT,
                         "vision_cfg": {**DEEP_VIT, "ls_init_value": 0.5, "no_ln_pre": True, "qk_norm": True,
                                        "final_ln_after_pool": True}},
    "Test-Deep-AttnPool": {"embed_dim": 32, "text_cfg": DEEP_TEXT,
                           "vision_cfg": {**DEEP_VIT, "attentional_pool": True, "attn_pooler_queries": 4,
                                          "attn_pooler_heads": 2}},
    "Test-Deep-Avg": {"embed_dim": 32, "text_cfg": DEEP_TEXT, "vision_cfg": {**DEEP_VIT, "pool_type": "avg"}},
    "Test-Deep-Tokens": {"embed_dim": 32, "text_cfg": DEEP_TEXT, "vision_cfg": {**DEEP_VIT, "output_tokens": True}},
    "Test-Tiny-EVA": CONFIGS["Test-Tiny-EVA"],
    "Test-Tiny-EVA-Avg": {**CONFIGS["Test-Tiny-EVA"],
                          "vision_cfg": {**CONFIGS["Test-Tiny-EVA"]["vision_cfg"], "timm_pool": "avg"}},
    # a timm tower that is not EVA (as SigLIP's): 12 layers of 192 at 32 px
    "Test-Tiny-TimmViT": {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT,
                          "vision_cfg": {"image_size": 32, "timm_model_name": "vit_tiny_patch16_224",
                                         "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear"}},
}
N_TOKENS = 1 + (32 // 16) ** 2
NAMES = [f"{c} {s}" for c, s in TINY_CLASSES]
SUPPORTED = "supported: OpenAI CLIP's ViTs"


@pytest.fixture(scope="module")
def deep_weights(tmp_path_factory) -> dict[str, Path]:
    """The configs registered with open_clip; a random state_dict file per architecture."""
    _register_tiny_eva()
    folder = tmp_path_factory.mktemp("open_clip_deep")
    for arch, config in DEEP_CONFIGS.items():
        (folder / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    files = {}
    for arch in DEEP_CONFIGS:
        torch.manual_seed(0)
        files[arch] = folder / f"{arch}.pt"
        torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), files[arch])
    return files


def name(deep_weights: dict[str, Path], arch: str) -> str:
    return f"open_clip:{arch}@{deep_weights[arch]}"


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tokens_of(width: int, *layers: int, n: int = 2, seed: int = 1) -> dict[int, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.nn.Parameter(torch.randn(n, width, generator=g)) for i in layers}


# ------------------------------------------------------------------ forwards written out
def reference_image_features(v, images: torch.Tensor, prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """open_clip's ViT (batch-first, class-token pooling) with prompts appended after the
    positional embedding and the last n positions replaced before layers i >= 1."""
    batch = images.shape[0]
    x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, P, D)
    x = torch.cat([v.class_embedding.expand(batch, 1, -1), x], dim=1) + v.positional_embedding
    if 0 in prompts:
        x = torch.cat([x, prompts[0].expand(batch, -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if i > 0 and i in prompts:
            n = prompts[i].shape[0]
            x = torch.cat([x[:, :-n], prompts[i].expand(batch, -1, -1)], dim=1)
        x = block(x)
    pooled = v.ln_post(x[:, 0])  # LayerNorm is per token: the same with final_ln_after_pool
    return pooled @ v.proj


def reference_text_features(text, embeddings: torch.Tensor, tokens: torch.Tensor,
                            prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """open_clip's text tower (``text``: its parts; batch-first blocks, the full context, a causal
    mask, argmax pooling) on prompt embeddings, positions 1..n replaced before each prompted layer."""
    x = embeddings + text.positional_embedding
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
    for i, block in enumerate(text.transformer.resblocks):
        if i in prompts:
            n = prompts[i].shape[0]
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=mask)
    x = text.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ text.text_projection


def sequence_first(model) -> None:
    """Rebuild ``model.visual``'s transformer with (L, N, D) blocks, weights kept (open_clip's
    ``Transformer(batch_first=False)``, the layout of older open_clip towers; its custom blocks
    are batch-first only)."""
    from open_clip.transformer import Transformer
    old = model.visual.transformer
    new = Transformer(96, 3, 3, batch_first=False)
    new.load_state_dict(old.state_dict())
    model.visual.transformer = new.eval()


# ---------------------------------------------------------------------- the image seam
@pytest.mark.parametrize("arch", ["Test-Deep-ViT", "Test-Deep-Custom"])
def test_without_prompts_the_tower_is_open_clips_encode_image_bit_for_bit(deep_weights, images, arch):
    model = load_clip(name(deep_weights, arch))
    with torch.no_grad():
        expected = model.model.encode_image(images)
        with deep_prompts(model.visual, DeepPrompts({})):
            assert torch.equal(model.visual(images), expected)
        assert torch.equal(PromptedImageEncoder(model.visual, lambda: DeepPrompts({}))(images), expected)
        with deep_prompts(model.visual, DeepPrompts(tokens_of(96, 0, 1))):
            assert not torch.allclose(model.visual(images), expected, atol=1e-4)
        assert torch.equal(model.visual(images), expected)  # removed with the block


@pytest.mark.parametrize("arch, layout", [
    ("Test-Deep-ViT", "batch-first"), ("Test-Deep-ViT", "sequence-first"), ("Test-Deep-ViT", "grad-checkpointing"),
    ("Test-Deep-Custom", "batch-first")])  # (open_clip's checkpointing cannot call its custom blocks)
def test_prompted_tower_equals_the_forward_written_out(deep_weights, images, arch, layout):
    model = load_clip(name(deep_weights, arch))
    prompts = tokens_of(96, 0, 2)  # layer 1 unprompted: it keeps what layer 0 computed there
    with torch.no_grad():
        want = reference_image_features(model.visual, images, prompts)
        plain = model.model.encode_image(images)
    if layout == "sequence-first":
        sequence_first(model)
    model.visual.transformer.grad_checkpointing = layout == "grad-checkpointing"
    with recording_tokens(model.visual, [0, 1, 2]) as seen, deep_prompts(model.visual, DeepPrompts(prompts)):
        got = model.visual(images)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    # what enters each block, as (L, N, D) in either layout: prompts last, replaced at layer 2 only
    assert all(t.shape == (N_TOKENS + 2, 2, 96) for t in seen.values())
    assert torch.equal(seen[2][N_TOKENS:], prompts[2].detach().unsqueeze(1).expand(-1, 2, -1))
    assert not torch.allclose(seen[1][N_TOKENS:], seen[0][N_TOKENS:])
    grads = torch.autograd.grad(got.square().sum(), [prompts[0], prompts[2]])
    assert all(g.abs().sum() > 0 for g in grads)


def test_patch_dropout_drops_patches_never_prompts(deep_weights, images):
    from open_clip.transformer import PatchDropout
    model = load_clip(name(deep_weights, "Test-Deep-ViT"))
    visual = model.visual
    visual.patch_dropout = PatchDropout(0.5)  # active in train mode: keeps 2 of the 4 patches
    prompts = tokens_of(96, 0)
    visual.train()
    with torch.no_grad(), recording_tokens(visual, [0]) as seen, deep_prompts(visual, DeepPrompts(prompts)):
        visual(images)
    assert seen[0].shape == (1 + 2 + 2, 2, 96)
    assert torch.allclose(seen[0][-2:], visual.ln_pre(prompts[0]).detach().unsqueeze(1).expand(-1, 2, -1), atol=1e-6)


def reference_eva_tokens(trunk, images: torch.Tensor, prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """timm's EVA with MaPLe's layout: prompts appended after the patches with no rotary position
    (rows of the rotary embedding that rotate by 0: sin 0, cos 1), the last n positions replaced
    before layers i >= 1; the (N, L, D) tokens after the final norm."""
    x, rope = trunk._pos_embed(trunk.patch_embed(images))
    n, batch = prompts[0].shape[0], images.shape[0]
    sin, cos = rope.tensor_split(2, dim=-1)
    rope = torch.cat([torch.cat([sin, sin.new_zeros(n, sin.shape[-1])]),
                      torch.cat([cos, cos.new_ones(n, cos.shape[-1])])], dim=-1)
    x = trunk.norm_pre(torch.cat([x, prompts[0].expand(batch, -1, -1)], dim=1))
    for i, block in enumerate(trunk.blocks):
        if i > 0 and i in prompts:
            x = torch.cat([x[:, :-n], prompts[i].expand(batch, -1, -1)], dim=1)
        x = block(x, rope=rope)
    return trunk.norm(x)


def test_eva_prompts_are_prefix_tokens_equal_to_appended_prompts_without_rotary_position(deep_weights, images):
    model = load_clip(name(deep_weights, "Test-Tiny-EVA"))
    trunk, n = model.visual.trunk, 2
    assert (vision_width(model.visual), vision_depth(model.visual)) == (trunk.embed_dim, len(trunk.blocks)) == (64, 2)
    prompts = tokens_of(64, 0, 1, n=n)
    with torch.no_grad():
        plain = model.model.encode_image(images)
        want = reference_eva_tokens(trunk, images, prompts)
    with recording_tokens(model.visual, [0, 1]) as seen, deep_prompts(model.visual, DeepPrompts(prompts)):
        assert [block.attn.num_prefix_tokens for block in trunk.blocks] == [1 + n] * 2
        got = trunk.forward_features(images)
        features = model.visual(images)
    # class token, prompts, patches here; class token, patches, prompts in the reference
    assert torch.allclose(got[:, 0], want[:, 0], atol=1e-5)
    assert torch.allclose(got[:, 1 + n:], want[:, 1:-n], atol=1e-5)
    assert torch.allclose(got[:, 1:1 + n], want[:, -n:], atol=1e-5)
    assert torch.equal(seen[1][1:1 + n], prompts[1].detach().unsqueeze(1).expand(-1, 2, -1))  # (L, N, D)
    assert not torch.allclose(features, plain, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(features.square().sum(), [prompts[0], prompts[1]]))
    # removed: the attention counts its own prefix tokens again, and the tower is open_clip's
    assert [block.attn.num_prefix_tokens for block in trunk.blocks] == [1, 1]
    with torch.no_grad():
        assert torch.equal(model.visual(images), plain)
        with deep_prompts(model.visual, DeepPrompts({})):
            assert torch.equal(model.visual(images), plain)


def test_per_image_prompts_and_the_feature_cache_rule(deep_weights, images):
    model = load_clip(name(deep_weights, "Test-Deep-ViT"))
    per_image = {0: torch.randn(2, 2, 96), 1: torch.randn(2, 2, 96)}  # (N, n, d): one set per image
    with torch.no_grad():
        with deep_prompts(model.visual, DeepPrompts(per_image)):
            both = model.visual(images)
        for k in range(2):
            alone = reference_image_features(model.visual, images[k:k + 1], {i: t[k] for i, t in per_image.items()})
            assert torch.allclose(both[k:k + 1], alone, atol=1e-5)
    # prompts applied during encoding are seen (the cache refuses those its key does not cover)
    with torch.no_grad(), recording_prompt_use(model) as used:
        with deep_prompts(model.visual, DeepPrompts(tokens_of(96, 0))) as handle:
            assert [n for n, _ in installed_deep_prompts(model)] == ["model.visual"]
            model.encode_image(images)
    assert used == [handle] and not installed_deep_prompts(model)


# ----------------------------------------------------------------------- the text seam
def test_deep_text_prompts_equal_the_forward_written_out(deep_weights):
    model = load_clip(name(deep_weights, "Test-Deep-ViT"))
    encoder = TextEncoder(model)
    tokens = model.tokenizer(["a photo of a red square.", "x y"], 32)
    embeddings = model.token_embedding(tokens)
    prompts = tokens_of(64, 1, 2, n=3)
    shapes: list[tuple[int, ...]] = []
    hook = encoder.layer_inputs[1].register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        with deep_prompts(encoder, DeepPrompts(prompts)):
            got = encoder(embeddings, tokens)
    finally:
        hook.remove()
    length = int(tokens.argmax(-1).max()) + 1  # trimmed after the end token (causal: exact)
    assert shapes == [(length, 2, 64)]  # sequence-first at the hook points, as for OpenAI's tower
    with torch.no_grad():
        want = reference_text_features(model, embeddings, tokens, prompts)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(encoder(embeddings, tokens), want, atol=1e-3)


# ----------------------------------------------------------------------------- trainers
class CountingTokenizer:
    """A tokenizer that counts the texts of each call (which tokenizer encodes what)."""

    def __init__(self, inner: OpenClipTokenizer) -> None:
        self.inner, self.calls = inner, []

    def count(self, text: str) -> int:
        return self.inner.count(text)

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        self.calls.append(len(texts))
        return self.inner(texts, context_length)


def moved_parameters(model, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def evaluate(trainer) -> torch.Tensor:
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    images = trainer.parse_batch_test(next(iter(trainer.test_loader)))[0]
    with torch.no_grad():
        logits = trainer.model_inference(images)
    assert logits.shape[-1] == len(NAMES) and torch.isfinite(logits).all()
    return logits


def test_maple_trains_only_its_prompts_and_equals_the_forward_written_out(deep_weights, tiny_data_root, tmp_path):
    arch = "Test-Deep-ViT"
    trainer = build(tiny_data_root, deep_weights, arch, "MaPLe", tmp_path, "TRAINER.MAPLE.PROMPT_DEPTH", "3")
    model, learner = trainer.model, trainer.model.prompt_learner
    # the model's own tokenizer renders the class prompts, and the projections reach the vision width
    own = open_clip.get_tokenizer(arch)([f"a photo of a {n}." for n in NAMES])
    assert isinstance(learner.tokenizer, OpenClipTokenizer) and torch.equal(learner.tokenized_prompts, own)
    assert learner.proj.out_features == 96
    images = trainer.parse_batch_train(next(iter(trainer.train_loader_x)))[0][:2]
    with torch.no_grad():
        vision = learner.vision_prompts().layers
        image = F.normalize(reference_image_features(model.visual, images, vision), dim=-1)
        text = reference_text_features(model.text_encoder, learner(), learner.tokenized_prompts,
                                       learner.text_prompts().layers)
        want = model.logit_scale.exp() * image @ F.normalize(text, dim=-1).t()
        assert torch.allclose(model(images), want, atol=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(trainer)
    moved = moved_parameters(model, before)
    assert moved and all(n.startswith("prompt_learner.") for n in moved)
    assert {"prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.compound_prompts_text.1"} <= moved
    evaluate(trainer)


def test_promptsrc_trains_only_its_prompts_with_the_models_tokenizer(deep_weights, tiny_data_root, tmp_path):
    arch = "Test-Deep-ViT"
    trainer = build(tiny_data_root, deep_weights, arch, "PromptSRC", tmp_path)
    model = trainer.model
    assert model.prompts.image_encoder.VPT.shape == (4, 96) and model.prompts.depth_vision == 3
    learner = model.prompt_learner
    assert isinstance(learner.tokenizer, OpenClipTokenizer)
    learner.tokenizer = counting = CountingTokenizer(learner.tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(trainer)
    assert counting.calls == [len(NAMES)] * len(PROMPTSRC_TEMPLATES)  # the templates go through the model's tokenizer
    moved = moved_parameters(model, before)
    assert all(n.startswith("prompts.") for n in moved)
    assert {"prompts.prompt_learner.ctx", "prompts.image_encoder.VPT",
            "prompts.image_encoder.transformer.resblocks.2.VPT_shallow"} <= moved
    # textual diversity: open_clip's own encode_text over the templates, with open_clip's tokenizer
    own = open_clip.create_model(arch, pretrained=str(deep_weights[arch])).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        total = sum(own.encode_text(tokenizer([t.format(n) for n in NAMES])) for t in PROMPTSRC_TEMPLATES)
    assert torch.allclose(trainer.frozen_text, F.normalize(total / len(PROMPTSRC_TEMPLATES), dim=-1), atol=1e-5)
    evaluate(trainer)


@pytest.mark.parametrize("trainer_name, node", [("MaPLeTPT", "MAPLE_TPT"), ("PromptAlign", "PROMPTALIGN"),
                                                ("PromptSRCTPT", "PROMPTSRC_TPT")])
def test_test_time_variants_tune_prompts_per_image(deep_weights, tiny_data_root, tmp_path, trainer_name, node):
    extra = [f"TRAINER.{node}.N_VIEWS", "4"]
    if node != "PROMPTSRC_TPT":
        extra += [f"TRAINER.{node}.PROMPT_DEPTH", "3"]
    if node == "PROMPTALIGN":
        extra += ["TRAINER.PROMPTALIGN.SOURCE_MAX_IMAGES", "8"]
    trainer = build(tiny_data_root, deep_weights, "Test-Deep-ViT", trainer_name, tmp_path, *extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    evaluate(trainer)
    moved = moved_parameters(trainer.model, before)
    prefix = "prompts." if node == "PROMPTSRC_TPT" else "prompt_learner."
    assert moved and all(n.startswith(prefix) for n in moved)  # tuned on the image; frozen CLIP untouched
    if node == "PROMPTALIGN":  # statistics of the (L, N, D) tokens: class, patches, prompts
        assert trainer.source_mean.shape == (len(trainer.align_layers), N_TOKENS + 2, 96)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("arch, words, built_words", [
    # a timm tower is named by its timm model in the config, by its class once built
    ("Test-Tiny-TimmViT", "a timm image tower other than EVA (vit_tiny_patch16_224)",
     "a timm image tower other than EVA (VisionTransformer)"),
    ("Test-Tiny-EVA-Avg", "image pooling 'avg' (only class-token pooling 'token' leaves the prompts out)", None),
    ("Test-Deep-AttnPool", "an attentional pooler (attn_pool), which attends to the prompt tokens too", None),
    ("Test-Deep-Avg", "image pooling 'avg' (only class-token pooling 'tok' leaves the prompts out)", None),
    ("Test-Deep-Tokens", "an image tower that returns its tokens (output_tokens)", None),
])
def test_unsupported_towers_are_refused_in_one_line(deep_weights, arch, words, built_words):
    with pytest.raises(ConfigError) as exc:  # from open_clip's config, before any weights are read
        require_vit_backbone("MaPLe", f"open_clip:{arch}@/not/read@all.pt")  # the name ends at the first "@"
    assert words in one_line(exc) and SUPPORTED in str(exc.value)
    words = built_words or words
    model = load_clip(name(deep_weights, arch))
    with pytest.raises(ConfigError) as exc:  # and from the built tower
        require_vit_backbone("PromptSRC", name(deep_weights, arch), model.visual)
    assert words in one_line(exc) and SUPPORTED in str(exc.value)
    with pytest.raises(ValueError, match=f"do not fit an image tower with {re.escape(words)}"):
        deep_prompts(model.visual, DeepPrompts(tokens_of(64, 0)))


def test_a_local_dirs_config_is_checked_and_a_hub_name_waits_for_the_built_model(tmp_path, monkeypatch):
    eva = CONFIGS["Test-Tiny-EVA"]
    eva_default_pool = {**eva, "vision_cfg": {k: v for k, v in eva["vision_cfg"].items() if k != "timm_pool"}}
    for folder, config in [("avg", DEEP_CONFIGS["Test-Deep-Avg"]), ("eva", eva_default_pool)]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
        with pytest.raises(ConfigError) as exc:  # from the folder's config: it holds no weights
            require_vit_backbone("MaPLe", f"open_clip:local-dir:{tmp_path / folder}")
        assert "image pooling 'avg'" in one_line(exc)  # EVA without timm_pool: open_clip's default, 'avg'
    monkeypatch.setattr(open_clip_backend, "model_config", lambda spec: pytest.fail("read a hub config"))
    require_vit_backbone("MaPLe", "open_clip:hf-hub:timm/ViT-B-16-SigLIP")  # not fetched here: checked once built


def test_open_clips_resnet_and_other_modules_are_refused_by_what_they_are():
    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=64, width=8)
    with pytest.raises(ValueError, match="need a ViT image encoder: a ResNet CLIP"):
        deep_prompts(resnet, DeepPrompts(tokens_of(64, 0)))
    with pytest.raises(ConfigError, match="is a ResNet CLIP"):
        require_vit_backbone("MaPLe", "open_clip:RN50/openai", resnet)
    with pytest.raises(TypeError, match="not a Linear"):
        deep_prompts(torch.nn.Linear(2, 2), DeepPrompts(tokens_of(64, 0)))


def test_published_names_are_told_apart_without_weights():
    for supported in ("open_clip:ViT-B-16/laion2b_s34b_b88k", "open_clip:EVA02-B-16/merged2b_s8b_b131k",
                      "open_clip:EVA01-g-14/laion400m_s11b_b41k"):
        require_vit_backbone("MaPLe", supported)  # no error
    for backbone, words in [("open_clip:ViT-SO400M-14-SigLIP/webli", "timm image tower other than EVA (vit_so400m"),
                            ("open_clip:RN50/openai", "is a ResNet CLIP")]:
        with pytest.raises(ConfigError) as exc:
            require_vit_backbone("MaPLe", backbone)
        assert words in one_line(exc)


@pytest.mark.parametrize("trainer_name", ["MaPLe", "PromptSRC"])
def test_train_py_refuses_an_unsupported_timm_tower_in_one_line_before_loading_it(deep_weights, tiny_data_root,
                                                                                   tmp_path, capsys, monkeypatch,
                                                                                   trainer_name):
    opts = tiny_opts(tiny_data_root, Path(name(deep_weights, "Test-Tiny-TimmViT")), trainer_name)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("loaded the backbone first"))
    assert main(["--output-dir", str(tmp_path / "out"), *opts]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a timm image tower other than EVA" in err[0] and SUPPORTED in err[0], err
