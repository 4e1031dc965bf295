"""The text encoder's checkpointing switch and PromptedCLIP's features and logits, on a tiny
random CLIP (numerical exactness of the trimmed encoder: tests/test_prompt_learner.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selftpt.clip_loader import build_random_clip, tokenize
from selftpt.prompt_learner import PromptLearner
from selftpt.prompted_clip import PromptedCLIP
from selftpt.text_encoder import TextEncoder
from tests.helpers import TINY_CLIP_ARCH

NAMES = ["red square", "green circle", "blue triangle"]


@pytest.fixture(scope="module")
def clip_model():
    return build_random_clip(TINY_CLIP_ARCH, seed=0)


def block_runs(model: PromptedCLIP, grad: bool) -> tuple[list[int], torch.Tensor]:
    """How often each text block ran during one forward (and backward, with ``grad``)."""
    blocks = model.text_encoder.transformer.resblocks
    runs = [0] * len(blocks)
    hooks = [b.ln_1.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
             for i, b in enumerate(blocks)]
    try:
        with torch.set_grad_enabled(grad):
            feats = model.text_features(normalize=False)
            if grad:
                feats.square().sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return runs, feats.detach()


def test_grad_checkpoint_recomputes_each_text_block_in_backward_and_only_when_asked(clip_model):
    learner = PromptLearner(NAMES, clip_model, n_ctx=4)
    plain = PromptedCLIP(learner, clip_model)  # the default: no checkpointing
    checkpointed = PromptedCLIP(learner, clip_model, grad_checkpoint=True)
    n_blocks = len(clip_model.transformer.resblocks)
    runs, feats = block_runs(plain, grad=True)
    assert runs == [1] * n_blocks
    runs, feats_ckpt = block_runs(checkpointed, grad=True)
    assert runs == [2] * n_blocks  # forward, then once more in backward
    assert torch.allclose(feats_ckpt, feats, atol=1e-6)
    assert block_runs(checkpointed, grad=False)[0] == [1] * n_blocks  # nothing to recompute without gradients
    plain.text_encoder = TextEncoder(clip_model)  # the encoder's own default: no checkpointing either
    assert block_runs(plain, grad=True)[0] == [1] * n_blocks


def test_logits_are_the_scaled_cosines_of_clips_own_features(clip_model):
    learner = PromptLearner(NAMES, clip_model, ctx_init="a photo of a")
    model = PromptedCLIP(learner, clip_model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = clip_model.encode_text(tokenize([f"a photo of a {n}." for n in NAMES], 32))
        image = clip_model.encode_image(images)
        expected = clip_model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
        assert torch.allclose(model(images), expected, atol=1e-4)
        assert torch.allclose(model.encode_image(images), F.normalize(image, dim=-1), atol=1e-6)
        raw = model.text_features(normalize=False)
        assert torch.allclose(raw, text, atol=1e-4)  # not normalised on request
        assert torch.allclose(model.text_features(), F.normalize(text, dim=-1), atol=1e-5)
        picked = model.text_features("end", indices=torch.tensor([2, 0]))
        assert torch.allclose(picked, F.normalize(text[[2, 0]], dim=-1), atol=1e-5)


def test_text_features_render_the_requested_layout_and_context(clip_model):
    learner = PromptLearner(NAMES, clip_model, n_ctx=4)
    model = PromptedCLIP(learner, clip_model)
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        front = model.text_features("front", ctx=ctx)
        expected = F.normalize(model.text_encoder(learner("front", ctx=ctx), learner.tokenized_prompts), dim=-1)
        assert torch.allclose(front, expected, atol=1e-6)
        assert not torch.allclose(front, model.text_features("end", ctx=ctx), atol=1e-3)  # the layout matters
        assert not torch.allclose(front, model.text_features("front"), atol=1e-3)  # and so does the context


def test_the_encoder_is_causal_as_clips_own_on_prompts_of_different_lengths():
    """Two layers and names of different token lengths: a position must not see the positions
    after it (CLIP's causal mask), else a short prompt's EOT reads the longer prompts' padding and,
    after one layer, every position reads the tokens after it."""
    from clip.simple_tokenizer import SimpleTokenizer

    from selftpt.text_encoder import encode_text_tokens, trimmed_length

    two_layers = build_random_clip(dict(TINY_CLIP_ARCH, transformer_layers=2), seed=4)
    texts = ["red.", "a photo of a large dark green striped circle."]
    tokens = tokenize(texts, 32)
    longest = 1 + len(SimpleTokenizer().encode(texts[1]))  # SOT, the words; the EOT follows
    assert tokens.argmax(-1).tolist() == [3, longest] and trimmed_length(tokens) == longest + 1 < 32
    lengths = []
    hook = two_layers.transformer.resblocks[0].ln_1.register_forward_hook(
        lambda _m, inputs, _out: lengths.append(inputs[0].shape[0]))
    with torch.no_grad():
        ours = encode_text_tokens(two_layers, tokens)
    hook.remove()
    assert lengths == [longest + 1]  # only the positions up to the last EOT run
    with torch.no_grad():
        ref = two_layers.encode_text(tokens)
    assert torch.allclose(ours, ref, atol=1e-5)
