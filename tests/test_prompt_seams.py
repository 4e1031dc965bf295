"""The prompt seams of the encoders (selftpt/deep_prompts.py), the feature-cache key they feed,
and the chunked prompt encoding (selftpt/text_encoder.py), on tiny random CLIPs."""
from __future__ import annotations

import contextlib
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trainers  # noqa: F401  (registers the trainers)
from selftpt.clip_loader import build_random_clip, tokenize
from selftpt.deep_prompts import (
    TEXT_PROMPT_START,
    DeepPrompts,
    PromptedImageEncoder,
    deep_prompts,
    foreign_forward_hooks,
    installed_deep_prompts,
    recording_prompt_use,
)
from selftpt.feature_cache import feature_cache_key
from selftpt.prompt_learner import PromptLearner
from selftpt.text_encoder import PROMPT_CHUNK, TextEncoder, encode_in_chunks, trimmed_length
from selftpt.toolbox import Datum, build_trainer
from tests.helpers import tiny_cfg

# Three layers on each side, so that prompted and unprompted deeper layers both exist.
DEEP_ARCH = dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=64, vision_patch_size=16,
                 context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=3)
N_PATCH_TOKENS = 1 + (32 // 16) ** 2  # class token + 4 patches
N = 3  # prompt tokens per layer
WIDTH = 64


@pytest.fixture(scope="module")
def clip_model():
    return build_random_clip(DEEP_ARCH, seed=0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def learnable(*layers: int, seed: int = 1) -> dict[int, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {i: nn.Parameter(torch.randn(N, WIDTH, generator=g)) for i in layers}


def full_context_tokens() -> torch.Tensor:
    """Two prompts whose end token sits at the last position: nothing is trimmed."""
    tokens = tokenize(["a " * 14, "b " * 14], DEEP_ARCH["context_length"])
    assert trimmed_length(tokens) == DEEP_ARCH["context_length"]
    return tokens


def encode_text(encoder: TextEncoder, clip_model, tokens: torch.Tensor) -> torch.Tensor:
    return encoder(clip_model.token_embedding(tokens).type(clip_model.dtype), tokens)


class LayerInputs:
    """The (L, N, d) tensor entering each block (the input of its ``ln_1``), per forward."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.seen: dict[int, torch.Tensor] = {}
        self.hooks = [block.ln_1.register_forward_pre_hook(
            lambda module, args, i=i: self.seen.__setitem__(i, args[0].detach().clone()))
            for i, block in enumerate(blocks)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def forward_hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


# ------------------------------------------------------------------------ without prompts
def test_without_prompts_the_encoders_are_clip_bit_for_bit(clip_model, images):
    tokens = full_context_tokens()
    encoder = TextEncoder(clip_model)
    empty_tokens = DeepPrompts({1: torch.zeros(0, WIDTH)})  # zero-length prompts
    with torch.no_grad():
        text_ref, image_ref = clip_model.encode_text(tokens), clip_model.encode_image(images)
        assert torch.equal(encode_text(encoder, clip_model, tokens), text_ref)
        assert torch.equal(clip_model.visual(images), image_ref)
        for prompts in (DeepPrompts({}), empty_tokens):
            with deep_prompts(encoder, prompts):
                assert torch.equal(encode_text(encoder, clip_model, tokens), text_ref)
            with deep_prompts(clip_model.visual, DeepPrompts({0: torch.zeros(0, WIDTH)})):
                assert torch.equal(clip_model.encode_image(images), image_ref)
    assert forward_hook_count(clip_model) == forward_hook_count(encoder) == 0


# ----------------------------------------------------------------------------- text side
def test_text_prompts_replace_the_positions_after_sos_in_the_given_layers(clip_model):
    encoder = TextEncoder(clip_model)
    learner = PromptLearner(["red square", "green circle"], clip_model, n_ctx=N)
    prompts, tokens = learner("end"), learner.tokenized_prompts
    deep = learnable(2)  # layer 1 unprompted, layer 2 prompted
    with torch.no_grad():
        plain = encoder(prompts, tokens)
    outputs: dict[int, torch.Tensor] = {}  # what the previous layer handed on (before the hook point)
    before = [encoder.layer_inputs[i].register_forward_pre_hook(
        lambda module, args, i=i: outputs.__setitem__(i, args[0].detach().clone())) for i in range(3)]
    inputs = LayerInputs(clip_model.transformer.resblocks)
    try:
        with deep_prompts(encoder, DeepPrompts(deep)):
            feats = encoder(prompts, tokens)
    finally:
        inputs.remove()
        for hook in before:
            hook.remove()
    span = slice(TEXT_PROMPT_START, TEXT_PROMPT_START + N)
    x2 = inputs.seen[2]  # (L, n_prompts, d)
    assert torch.equal(x2[span], deep[2].detach().unsqueeze(1).expand(-1, 2, -1))
    rest = [p for p in range(x2.shape[0]) if not TEXT_PROMPT_START <= p < TEXT_PROMPT_START + N]
    assert torch.equal(x2[rest], outputs[2][rest])  # other positions: the previous layer's output
    assert torch.equal(inputs.seen[1], outputs[1]) and torch.equal(inputs.seen[0], outputs[0])  # untouched
    assert not torch.allclose(feats, plain, atol=1e-3)
    grad, = torch.autograd.grad(feats.square().sum(), deep[2])
    assert grad.abs().sum() > 0


def test_text_prompts_per_sequence_and_every_layer_get_gradients(clip_model):
    encoder = TextEncoder(clip_model, grad_checkpoint=True)
    tokens = tokenize(["a photo of a cat.", "dog"], DEEP_ARCH["context_length"])
    per_sequence = nn.Parameter(torch.randn(2, N, WIDTH))
    shared = learnable(1)[1]
    inputs = LayerInputs(clip_model.transformer.resblocks)
    try:
        with deep_prompts(encoder, DeepPrompts({1: shared, 2: per_sequence})):
            feats = encode_text(encoder, clip_model, tokens)
    finally:
        inputs.remove()
    assert torch.equal(inputs.seen[2][1:1 + N], per_sequence.detach().transpose(0, 1))
    grads = torch.autograd.grad(feats.sum(), [shared, per_sequence])
    assert all(g.abs().sum() > 0 for g in grads)


def test_per_sequence_prompts_for_another_batch_size_are_refused(clip_model, images):
    with deep_prompts(clip_model.visual, DeepPrompts({0: torch.zeros(4, N, WIDTH)})), \
            pytest.raises(ValueError, match="hold 4 sets for a batch of 2"):
        clip_model.visual(images)


def test_prompt_tokens_join_the_activations_on_their_device(clip_model):
    """fp32 CPU master tokens enter a model on another device ("meta": no data, devices checked)."""
    visual = copy.deepcopy(clip_model.visual).to("meta")
    with deep_prompts(visual, DeepPrompts(learnable(0, 1))):
        features = visual(torch.empty(2, 3, 32, 32, device="meta"))
    assert features.device.type == "meta" and features.shape == (2, DEEP_ARCH["embed_dim"])


def test_text_layer_zero_and_oversized_prompts_are_refused(clip_model):
    encoder = TextEncoder(clip_model)
    with pytest.raises(ValueError, match=r"^Text layer 0 takes no deep prompt: .* give layers >= 1$"):  # and the fix
        deep_prompts(encoder, DeepPrompts(learnable(0, 1)))
    with pytest.raises(ValueError, match=r"layer\(s\) \[3\]"):
        deep_prompts(encoder, DeepPrompts(learnable(3)))
    tokens = tokenize(["cat"], DEEP_ARCH["context_length"])  # SOS cat EOT: 3 positions after trimming
    refused = pytest.raises(ValueError, match="do not fit prompts of 3 tokens")
    with deep_prompts(encoder, DeepPrompts(learnable(1))), refused:
        encode_text(encoder, clip_model, tokens)
    exact = tokenize(["cat dog"], DEEP_ARCH["context_length"])  # SOS cat dog EOT: the N = 3 tokens fill 1-3
    assert trimmed_length(exact) == 1 + N  # nothing left after the prompt tokens
    with deep_prompts(encoder, DeepPrompts(learnable(1))):
        assert encode_text(encoder, clip_model, exact).shape[0] == 1  # an exact fit is accepted
    assert forward_hook_count(encoder) == 0


def test_a_forward_through_text_prompts_is_recorded_as_their_use(clip_model):
    """The feature cache's check (which prompts changed a forward) sees text prompts, too."""
    encoder = TextEncoder(clip_model)
    tokens = tokenize(["a b c d"], DEEP_ARCH["context_length"])
    with deep_prompts(encoder, DeepPrompts(learnable(1))) as handle:
        with torch.no_grad(), recording_prompt_use(encoder) as used:
            encode_text(encoder, clip_model, tokens)
        with torch.no_grad(), recording_prompt_use(clip_model.visual) as elsewhere:
            encode_text(encoder, clip_model, tokens)
    assert used == [handle] and elsewhere == []


# ---------------------------------------------------------------------------- image side
def test_image_prompts_are_appended_at_layer_zero_and_replaced_deeper(clip_model, images):
    visual = clip_model.visual
    deep = learnable(0, 2)
    with torch.no_grad():
        plain = visual(images)
    after_ln_pre_input: list[torch.Tensor] = []
    outputs: dict[int, torch.Tensor] = {}
    hooks = [visual.ln_pre.register_forward_hook(lambda m, args, out: after_ln_pre_input.append(args[0].detach()))]
    hooks += [block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach().clone()))
              for i, block in enumerate(visual.transformer.resblocks)]
    inputs = LayerInputs(visual.transformer.resblocks)
    try:
        with deep_prompts(visual, DeepPrompts(deep)):
            feats = visual(images)
    finally:
        inputs.remove()
        for hook in hooks:
            hook.remove()
    # layer 0: appended after the patch tokens, after the positional embedding, before ln_pre
    (x,) = after_ln_pre_input  # (B, L, D)
    assert x.shape[1] == N_PATCH_TOKENS + N
    assert torch.equal(x[:, N_PATCH_TOKENS:], deep[0].detach().expand(2, -1, -1))
    assert inputs.seen[0].shape[0] == N_PATCH_TOKENS + N
    # layer 2: the last N positions replaced, the rest as layer 1 left them
    assert torch.equal(inputs.seen[2][N_PATCH_TOKENS:], deep[2].detach().unsqueeze(1).expand(-1, 2, -1))
    assert torch.equal(inputs.seen[2][:N_PATCH_TOKENS], outputs[1][:N_PATCH_TOKENS])
    assert torch.equal(inputs.seen[1], outputs[0])  # layer 1 unprompted: untouched
    assert feats.shape == plain.shape and not torch.allclose(feats, plain, atol=1e-3)
    grads = torch.autograd.grad(feats.square().sum(), [deep[0], deep[2]])
    assert all(g.abs().sum() > 0 for g in grads)


def test_hooks_are_removed_after_the_block_even_on_error(clip_model, images):
    visual = clip_model.visual
    with torch.no_grad():
        first = visual(images)
        with contextlib.suppress(RuntimeError), deep_prompts(visual, DeepPrompts(learnable(0, 1))):
            visual(images)
            raise RuntimeError("stop")
        assert torch.equal(visual(images), first)
    assert forward_hook_count(visual) == 0 and not installed_deep_prompts(clip_model)
    handle = deep_prompts(visual, DeepPrompts(learnable(0)))  # installed until removed
    with pytest.raises(RuntimeError, match="^This VisionTransformer already has deep prompts installed; remove them"):
        deep_prompts(visual, DeepPrompts(learnable(0)))
    handle.remove()
    assert forward_hook_count(visual) == 0


def test_image_prompts_are_refused_where_they_do_not_fit(clip_model):
    with pytest.raises(ValueError, match="need layer 0"):
        deep_prompts(clip_model.visual, DeepPrompts(learnable(1)))
    with pytest.raises(ValueError, match="same number of prompt tokens"):
        DeepPrompts({0: torch.zeros(2, WIDTH), 1: torch.zeros(3, WIDTH)})
    resnet = build_random_clip("Bench-RN-T").visual
    with pytest.raises(ValueError, match="ViT image encoder"):
        deep_prompts(resnet, DeepPrompts(learnable(0)))
    # the same refusal where open_clip was never imported (its tower class is looked up, not imported)
    code = ("import sys; from selftpt.clip_loader import build_random_clip; from selftpt.deep_prompts import "
            "DeepPrompts, deep_prompts; import torch\n"
            "try: deep_prompts(build_random_clip('Bench-RN-T').visual, DeepPrompts({0: torch.zeros(1, 64)}))\n"
            "except ValueError as e: print('open_clip' in sys.modules, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert out.startswith("False Deep vision prompts need a ViT image encoder"), out
    assert DeepPrompts.consecutive([torch.zeros(1, 4)] * 2, first_layer=1).layers.keys() == {1, 2}


@pytest.mark.parametrize("layers, bad", [({-1: torch.zeros(2, WIDTH), 1: torch.zeros(2, WIDTH)}, "[-1]"),
                                         ({0: torch.zeros(2, WIDTH), 2: torch.zeros(WIDTH)}, "[2]"),
                                         ({1: torch.zeros(1, 1, 2, WIDTH)}, "[1]")])
def test_negative_layers_and_tokens_of_other_shapes_are_refused_by_layer(layers, bad):
    with pytest.raises(ValueError, match=f"layer\\(s\\) {re.escape(bad)} are not"):
        DeepPrompts(layers)


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("mode", ["fp16", "amp"])
def test_prompts_in_fp16_and_autocast(clip_model, images, mode):
    from clip.model import convert_weights

    model = copy.deepcopy(clip_model)
    if mode == "fp16":
        convert_weights(model)
    run = torch.autocast("cpu", dtype=torch.float16) if mode == "amp" else contextlib.nullcontext()
    encoder = TextEncoder(model)
    tokens = tokenize(["a photo of a cat.", "dog"], DEEP_ARCH["context_length"])
    image_deep, text_deep = learnable(0, 1), learnable(1, 2)  # fp32 master copies
    vision_inputs = LayerInputs(model.visual.transformer.resblocks)
    try:
        with run, deep_prompts(model.visual, DeepPrompts(image_deep)), deep_prompts(encoder, DeepPrompts(text_deep)):
            image_feats = model.encode_image(images)
            text_feats = encode_text(encoder, model, tokens)
    finally:
        vision_inputs.remove()
    x1 = vision_inputs.seen[1]
    assert x1.dtype == torch.float16
    assert torch.equal(x1[N_PATCH_TOKENS:], image_deep[1].detach().half().unsqueeze(1).expand(-1, 2, -1))
    assert image_feats.dtype == text_feats.dtype == torch.float16
    loss = image_feats.float().square().sum() + text_feats.float().square().sum()
    grads = torch.autograd.grad(loss, [*image_deep.values(), *text_deep.values()])
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with torch.no_grad(), run:
        assert torch.equal(model.encode_image(images), model.encode_image(images))  # hooks gone


# --------------------------------------------------------------------------- cache keys
class VisionPrompts(nn.Module):
    """Deep vision prompts as parameters: what a prompted trainer hands PromptedImageEncoder."""

    def __init__(self, seed: int, layers: tuple[int, ...] = (0, 2)) -> None:
        super().__init__()
        self.tokens = nn.ParameterDict({str(i): p for i, p in learnable(*layers, seed=seed).items()})

    def forward(self) -> DeepPrompts:
        return DeepPrompts({int(i): t for i, t in self.tokens.items()})


def key_of(encoder: nn.Module, tmp_path) -> dict:
    image = tmp_path / "a.png"
    if not image.exists():
        image.write_bytes(b"x")
    return feature_cache_key(encoder, "fp32", "cpu", "D", "all", "test",
                             [Datum(impath=str(image), label=0, classname="a")], "T")


def test_cache_key_covers_installed_vision_prompts(clip_model, tmp_path):
    visual = clip_model.visual
    plain = key_of(visual, tmp_path)
    assert "deep_prompts_sha256" not in plain  # unprompted keys keep their format (old entries still hit)
    keys = []
    for seed, order in ((1, (0, 2)), (1, (2, 0)), (2, (0, 2))):
        tokens = {i: t.detach().clone() for i, t in learnable(0, 2, seed=seed).items()}
        with deep_prompts(visual, DeepPrompts({i: tokens[i] for i in order})):
            keys.append(key_of(visual, tmp_path))
    # same prompts, same key, in whichever order the layers are given; other prompts, another key
    assert keys[0] == keys[1] != keys[2]
    assert keys[0] != plain and keys[0]["encoder_sha256"] == plain["encoder_sha256"]
    with deep_prompts(visual, DeepPrompts({0: torch.zeros(0, WIDTH)})):
        assert key_of(visual, tmp_path) == plain  # zero-length prompts change nothing
    assert key_of(visual, tmp_path) == plain  # removed: the plain key again


def test_prompted_image_encoder_digest_covers_its_prompts(clip_model, images, tmp_path):
    plain = key_of(clip_model.visual, tmp_path)
    a, a_again, b = (PromptedImageEncoder(clip_model.visual, VisionPrompts(seed)) for seed in (1, 1, 2))
    assert key_of(a, tmp_path) == key_of(a_again, tmp_path)
    assert len({key_of(a, tmp_path)["encoder_sha256"], key_of(b, tmp_path)["encoder_sha256"],
                plain["encoder_sha256"]}) == 3
    before = key_of(a, tmp_path)
    with torch.no_grad():
        a.prompts.tokens["2"].add_(1.0)  # a training step on the prompts
    assert key_of(a, tmp_path) != before
    with torch.no_grad():
        assert not torch.allclose(a(images), clip_model.visual(images), atol=1e-3)
        assert torch.equal(clip_model.visual(images), clip_model.encode_image(images))


# ------------------------------------------------------------- the cache in an evaluation
def make_zsclip(root, clip, out, cache):
    return build_trainer(tiny_cfg(root, clip, "ZeroshotCLIP", ("OUTPUT_DIR", str(out), "TEST.FEATURE_CACHE",
                                                                 str(cache))))


def test_logits(trainer, monkeypatch) -> torch.Tensor:
    logits = []
    process = trainer.evaluator.process
    monkeypatch.setattr(trainer.evaluator, "process", lambda mo, gt: (logits.append(mo.detach()), process(mo, gt)))
    trainer.test()
    monkeypatch.undo()
    return torch.cat(logits)


test_logits.__test__ = False  # a helper, not a test


def test_features_cached_without_prompts_are_not_reused_with_them(tiny_data_root, tiny_clip_path, tmp_path,
                                                                   monkeypatch, capsys):
    cache = tmp_path / "cache"
    trainer = make_zsclip(tiny_data_root, tiny_clip_path, tmp_path / "a", cache)
    plain = test_logits(trainer, monkeypatch)
    visual = trainer.clip_model.visual  # the tiny ViT has one layer: prompts appended at layer 0
    tokens = DeepPrompts({0: torch.randn(2, visual.conv1.out_channels, generator=torch.Generator().manual_seed(3))})
    uncached_trainer = make_zsclip(tiny_data_root, tiny_clip_path, tmp_path / "b", "")
    with deep_prompts(uncached_trainer.clip_model.visual, tokens):
        expected = test_logits(uncached_trainer, monkeypatch)
    capsys.readouterr()
    with deep_prompts(visual, tokens):
        prompted = test_logits(trainer, monkeypatch)
    out = capsys.readouterr().out
    assert "not cached yet" in out and "read from the cache" not in out
    assert torch.equal(prompted, expected) and not torch.allclose(prompted, plain, atol=1e-3)
    with deep_prompts(visual, tokens):
        assert torch.equal(test_logits(trainer, monkeypatch), expected)  # now its own entry
    assert "read from the cache" in capsys.readouterr().out
    assert len(list(cache.glob("*.pt"))) == 2


def test_prompts_the_key_cannot_see_are_refused(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch, capsys):
    trainer = make_zsclip(tiny_data_root, tiny_clip_path, tmp_path / "a", tmp_path / "cache")
    visual = trainer.clip_model.visual
    tokens = DeepPrompts({0: torch.randn(2, visual.conv1.out_channels)})
    encode = trainer.encode_images

    def encode_with_prompts(images):  # prompts made per forward, bare encoder given to the cache: a bug
        with deep_prompts(visual, tokens):
            return encode(images)

    monkeypatch.setattr(trainer, "encode_images", encode_with_prompts)
    with pytest.raises(RuntimeError, match="not part of the feature-cache key"):
        trainer.test()
    assert not list((tmp_path / "cache").glob("*.pt"))
    # the same prompts inside a PromptedImageEncoder handed to the cache: accepted
    prompted = PromptedImageEncoder(visual, VisionPrompts(seed=4, layers=(0,)))  # the tiny ViT has one layer
    monkeypatch.setattr(trainer, "image_encoder_for_cache", lambda: prompted)
    monkeypatch.setattr(trainer, "encode_images",
                        lambda images: torch.nn.functional.normalize(prompted(images.type(visual.conv1.weight.dtype)),
                                                                     dim=-1))
    trainer.test()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # an encoder with forward hooks of unknown effect is evaluated without the cache
    monkeypatch.undo()
    hook = visual.ln_post.register_forward_hook(lambda m, args, out: out)
    capsys.readouterr()
    try:
        trainer.test()
    finally:
        hook.remove()
    assert "forward hooks of unknown effect (ln_post)" in capsys.readouterr().out
    hook = visual.register_forward_pre_hook(lambda module, args: None)  # on the encoder itself: named by its type
    try:
        assert foreign_forward_hooks(visual) == ["VisionTransformer"]
    finally:
        hook.remove()
    assert foreign_forward_hooks(visual) == []


# ------------------------------------------------------------------------ chunked prompts
def test_encode_in_chunks_is_the_concatenation_of_the_chunks():
    calls = []

    def encode(items):
        calls.append(items)
        return torch.as_tensor(items if isinstance(items, torch.Tensor) else [len(t) for t in items]).float()[:, None]

    indices = torch.arange(2 * PROMPT_CHUNK + 7)
    assert torch.equal(encode_in_chunks(encode, indices), indices.float()[:, None])
    assert [len(c) for c in calls] == [PROMPT_CHUNK, PROMPT_CHUNK, 7] and isinstance(calls[0], torch.Tensor)
    calls.clear()
    texts = ["a" * (i % 5) for i in range(PROMPT_CHUNK + 1)]
    assert encode_in_chunks(encode, texts).squeeze(1).tolist() == [float(i % 5) for i in range(PROMPT_CHUNK + 1)]
    assert [len(c) for c in calls] == [PROMPT_CHUNK, 1]


@pytest.mark.parametrize("trainer_name", ["CoOp", "PromptSRC"])
def test_a_class_set_larger_than_a_chunk_is_encoded_once_per_class(tiny_data_root, tiny_clip_path, tmp_path,
                                                                    monkeypatch, trainer_name):
    """The class prompts in chunks (1000 ImageNet classes): 6 classes in chunks of 4
    (PromptedClipTrainer's ``prepare_for_test`` and PromptSRC's own)."""
    trainer = build_trainer(tiny_cfg(tiny_data_root, tiny_clip_path, trainer_name, ("OUTPUT_DIR", str(tmp_path))))
    monkeypatch.setattr(encode_in_chunks, "__defaults__", (4,))  # the trainer uses the default chunk size
    trainer.prepare_for_test()
    with torch.no_grad():
        whole = trainer.model.text_features()
    assert whole.shape[0] == 6 and torch.allclose(trainer.eval_text_features, whole, atol=1e-6)
