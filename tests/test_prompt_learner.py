"""The CoOp prompt learner, the text encoder and the CPT views on a tiny random CLIP."""
import copy

import pytest
import torch

from selftpt.clip_loader import build_random_clip, tokenize
from selftpt.cpt import ContrastivePromptTask, class_chunks, sample_classes
from selftpt.errors import ConfigError
from selftpt.prompt_learner import PromptLearner
from selftpt.prompted_clip import PromptedCLIP
from tests.helpers import TINY_CLIP_ARCH

NAMES = ["red square", "green circle", "blue_triangle"]


@pytest.fixture(scope="module")
def clip_model():
    return build_random_clip(TINY_CLIP_ARCH, seed=0)


def test_ctx_init_takes_the_word_embeddings(clip_model):
    learner = PromptLearner(NAMES, clip_model, ctx_init="a photo of a")
    tokens = tokenize("a photo of a", 32)
    expected = clip_model.token_embedding(tokens)[0, 1:5]
    assert learner.n_ctx == 4 and torch.equal(learner.ctx.data, expected)
    assert learner.classnames[2] == "blue triangle"  # underscores cleaned as CoOp


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_layouts_place_class_tokens_as_coop(clip_model, position):
    learner = PromptLearner(NAMES, clip_model, n_ctx=4)
    prompts = learner(position)  # (3, L, d)
    assert prompts.shape == (3, 32, 64)
    i = 1  # "green circle" = 2 BPE tokens
    name_len = learner.name_lens[i]
    class_emb = learner.token_suffix[i, :name_len]
    start = {"end": 1 + 4, "middle": 1 + 2, "front": 1}[position]
    assert torch.equal(prompts[i, start:start + name_len], class_emb)
    ctx_at = {"end": [1, 2, 3, 4], "middle": [1, 2, start + name_len, start + name_len + 1],
              "front": [1 + name_len + k for k in range(4)]}[position]
    assert torch.equal(prompts[i, ctx_at], learner.ctx.data)
    # every layout keeps the EOT token where the tokenizer put it
    assert torch.equal(prompts[i, -5:], learner.token_suffix[i, -5:])


def test_end_layout_with_ctx_init_reproduces_the_plain_prompt(clip_model):
    learner = PromptLearner(NAMES, clip_model, ctx_init="a photo of a")
    model = PromptedCLIP(learner, clip_model)
    with torch.no_grad():
        ours = model.text_features("end")
        ref = clip_model.encode_text(tokenize([f"a photo of a {n}." for n in learner.classnames], 32))
    assert torch.allclose(ours, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_text_encoder_trims_padding_exactly(clip_model, grad_checkpoint):
    # prompts stop after the longest EOT; the causal mask makes that exact, gradients included
    from selftpt.text_encoder import TextEncoder, trimmed_length
    learner = PromptLearner(NAMES, clip_model, n_ctx=4)
    assert trimmed_length(learner.tokenized_prompts) < learner.tokenized_prompts.shape[1]
    prompts = learner("end")

    def full_length(x):  # CLIP's own path over all 32 positions
        x = x + clip_model.positional_embedding
        x = clip_model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = clip_model.ln_final(x)
        eot = learner.tokenized_prompts.argmax(-1)
        return x[torch.arange(len(x)), eot] @ clip_model.text_projection

    ours = TextEncoder(clip_model, grad_checkpoint=grad_checkpoint)(prompts, learner.tokenized_prompts)
    ref = full_length(prompts)
    assert torch.allclose(ours, ref, atol=1e-5)
    g_ours, = torch.autograd.grad(ours.square().sum(), learner.ctx)
    g_ref, = torch.autograd.grad(full_length(learner("end")).square().sum(), learner.ctx)
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-3)


def test_set_classnames_keeps_context_and_rebuilds_buffers(clip_model):
    learner = PromptLearner(NAMES, clip_model, n_ctx=4)
    ctx = learner.ctx.data.clone()
    learner.set_classnames(["cat", "dog"])
    assert learner.n_cls == 2 and learner.token_prefix.shape[0] == 2
    assert torch.equal(learner.ctx.data, ctx)
    with pytest.raises(ValueError, match="empty"):
        learner.set_classnames([])


def test_overlong_class_name_is_named(clip_model):
    with pytest.raises(ValueError, match="endless"):
        PromptLearner(["cat", " ".join(["endless"] * 40)], clip_model, n_ctx=4)


def test_cpt_views_and_loss_reach_the_context(clip_model):
    learner = PromptLearner(NAMES, clip_model, ctx_init="a photo of a")
    model = PromptedCLIP(learner, clip_model)
    cpt = ContrastivePromptTask(model, ["front", "middle", "end", "handcrafted"], head="mlp")
    z, labels = cpt.features(model, torch.arange(3))
    assert z.shape == (12, 64) and labels.tolist() == [0, 1, 2] * 4
    loss = cpt.loss(model, torch.arange(3))
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0


def test_cpt_needs_two_views(clip_model):
    model = PromptedCLIP(PromptLearner(NAMES, clip_model, n_ctx=4), clip_model)
    with pytest.raises(ValueError, match="two distinct views"):
        ContrastivePromptTask(model, ["end"])


def test_cpt_defaults_and_unknown_views(clip_model):
    learner = PromptLearner(NAMES, clip_model, n_ctx=4)
    model = PromptedCLIP(learner, clip_model)
    cpt = ContrastivePromptTask(model, ["end", "handcrafted"])
    assert [type(m) for m in cpt.head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]  # mlp
    assert cpt.temperature == 0.07
    tokens = learner.tokenize(["a photo of a red square."])  # the hand-crafted view's default template
    with torch.no_grad():
        expected = model.text_encoder(learner.embed_tokens(tokens), tokens)[0]
    assert torch.allclose(cpt.handcrafted_features[0], expected, atol=1e-6)
    with pytest.raises(ConfigError, match=r"^Unknown CPT view\(s\) \['back'\]; choose from "):
        ContrastivePromptTask(model, ["end", "back"])


def test_cpt_checkpoint_holds_no_class_set_features(clip_model):
    """The hand-crafted features belong to the current class names: a CPT head trained on base
    classes loads into one built for the new classes."""
    base = ContrastivePromptTask(PromptedCLIP(PromptLearner(NAMES, clip_model, n_ctx=4), clip_model),
                                 ["end", "handcrafted"])
    assert "handcrafted_features" not in base.state_dict()
    new = ContrastivePromptTask(PromptedCLIP(PromptLearner(NAMES[:2], clip_model, n_ctx=4), clip_model),
                                ["end", "handcrafted"])
    new.load_state_dict(base.state_dict())
    assert new.handcrafted_features.shape[0] == 2


def test_class_sampling_keeps_batch_classes_and_bounds_the_rest():
    g = torch.Generator().manual_seed(0)
    picked = sample_classes(torch.tensor([7, 7, 3]), n_cls=100, max_classes=10, generator=g)
    assert len(picked) == 10 and {3, 7} <= set(picked.tolist())
    chunks = class_chunks(9, 4, generator=g)
    assert sorted(torch.cat(chunks).tolist()) == list(range(9))
    assert all(len(c) >= 2 for c in chunks) and max(len(c) for c in chunks) <= 5
    with pytest.raises(ValueError, match="two class names"):
        class_chunks(1, 4)


@pytest.mark.parametrize("position, text", [("front", "{} a photo of a."), ("middle", "a photo {} of a.")])
def test_layouts_render_names_with_token_id_zero_as_the_tokenizer_does(clip_model, position, text):
    # "!" inside a punctuation run is BPE token 0: counting non-zero ids would cut the name short
    name = "a!#!b"
    learner = PromptLearner([name, "red square"], clip_model, ctx_init="a photo of a")
    tokens = tokenize(text.format(name), 32)
    assert (tokens[0] == 0).sum() > 32 - tokens[0].argmax() - 1  # a 0 id inside the prompt, not only padding
    expected = clip_model.token_embedding(tokens)[0]
    assert torch.equal(learner(position)[0], expected)


def test_csc_is_ignored_with_ctx_init_as_coop(clip_model, capsys):
    learner = PromptLearner(NAMES, clip_model, ctx_init="a photo of a", csc=True)
    assert learner.ctx.shape == (4, 64) and not learner.csc
    assert "CSC is ignored with CTX_INIT" in capsys.readouterr().out
    assert PromptLearner(NAMES, clip_model, n_ctx=4, csc=True).ctx.shape == (3, 4, 64)


# ---------------------------------------------------------------- from the mutation run (docs/testing.md)
def test_unknown_layouts_are_refused_naming_the_key(clip_model):
    with pytest.raises(ConfigError, match=r"^CLASS_TOKEN_POSITION must be one of \('end', 'middle', 'front'\), "
                                          r"got 'left'$"):
        PromptLearner(NAMES, clip_model, n_ctx=4, class_token_position="left")
    learner = PromptLearner(NAMES, clip_model, n_ctx=4, class_token_position="front")
    with pytest.raises(ConfigError, match=r"^Unknown class token position 'left'; use one of \('end'"):
        learner("left")
    assert torch.equal(learner(), learner("front"))  # the default layout is the configured one


def test_ctx_init_words_may_be_joined_by_underscores_and_padded(clip_model):
    plain = PromptLearner(NAMES, clip_model, ctx_init="a photo of a")
    padded = PromptLearner(NAMES, clip_model, ctx_init="  a_photo_of a ")
    assert padded.n_ctx == 4 and padded.prompt_prefix == "a photo of a"
    assert torch.equal(padded.ctx.data, plain.ctx.data)
    assert torch.equal(padded.tokenized_prompts, plain.tokenized_prompts)


def test_random_context_is_normal_with_std_002_around_x_placeholders(clip_model):
    torch.manual_seed(0)
    learner = PromptLearner(NAMES, clip_model, n_ctx=16)
    assert learner.ctx.dtype == torch.float32 and learner.ctx.shape == (16, 64) and not learner.csc
    assert 0.018 < learner.ctx.data.std().item() < 0.022 and learner.ctx.data.mean().abs() < 0.003
    assert learner.prompt_prefix == " ".join(["X"] * 16)
    # every position but the context is the embedding of CoOp's placeholder prompt "X X ... X name."
    tokens = tokenize([f"{' '.join(['X'] * 16)} {n}." for n in learner.classnames], 32)
    assert torch.equal(learner.tokenized_prompts, tokens)
    expected = clip_model.token_embedding(tokens)
    prompts = learner("end")
    assert torch.equal(prompts[:, :1], expected[:, :1]) and torch.equal(prompts[:, 17:], expected[:, 17:])
    assert set(learner.state_dict()) == {"ctx", "token_prefix", "token_suffix"}  # CoOp's keys
    default = PromptLearner(NAMES, clip_model)
    assert default.n_ctx == 16 and default.ctx.shape == (16, 64) and default.class_token_position == "end"


def test_class_specific_context_renders_each_classs_own_context(clip_model):
    learner = PromptLearner(NAMES, clip_model, n_ctx=2, csc=True)
    assert learner.csc and learner.ctx.shape == (3, 2, 64)
    ctx = torch.randn(3, 2, 64)
    indices = torch.tensor([2, 0])
    for position, at in (("end", [1, 2]), ("middle", [1])):
        prompts = learner(position, ctx=ctx, indices=indices)
        assert prompts.shape == (2, 32, 64)
        for row, cls in enumerate(indices.tolist()):
            assert torch.equal(prompts[row, at], ctx[cls, :len(at)])
            assert torch.equal(prompts[row, 0], learner.token_prefix[cls, 0])
    front = learner("front", indices=torch.tensor([1]))
    name_len = learner.name_lens[1]
    assert torch.equal(front[0, 1 + name_len:3 + name_len], learner.ctx.data[1])
    learner.set_classnames(["cat", "dog", "cow"])  # same number of classes: allowed
    with pytest.raises(ConfigError, match=r"^Class-specific context was learnt for 3 classes and cannot be applied "
                                          r"to 2 other classes; use CSC False to transfer prompts$"):
        learner.set_classnames(["cat", "dog"])


class LetterTokenizer:
    """A model's own tokenizer unlike OpenAI's: one token per letter (spaces skipped, so that
    each "X" of the context placeholder is one token, as with BPE)."""

    SOS, EOT = 49406, 49407

    def count(self, text: str) -> int:
        return len(text.replace(" ", ""))

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.SOS, *(ord(c) for c in text.replace(" ", "")), self.EOT]
            out[row, :len(ids)] = torch.tensor(ids)
        return out


def test_a_models_own_tokenizer_measures_and_renders_the_class_names(clip_model):
    model = copy.deepcopy(clip_model)
    model.tokenizer = tokenizer = LetterTokenizer()  # as an open_clip model carries its tokenizer
    learner = PromptLearner(["lion", "ox"], model, n_ctx=4)
    assert learner.name_lens == [4, 2]  # OpenAI's BPE: one token each
    assert torch.equal(learner.tokenized_prompts, tokenizer(["XXXX lion.", "XXXX ox."], 32))
    learner.set_classnames(["cat"])
    assert learner.name_lens == [3] and torch.equal(learner.tokenized_prompts, tokenizer(["XXXX cat."], 32))
    assert torch.equal(learner.token_suffix[0, :3], learner.embed_tokens(tokenizer(["cat"], 32))[0, 1:4])


def test_the_longest_prompt_that_fits_is_accepted_and_one_more_token_is_refused(clip_model):
    name = " ".join(["cat"] * 25)  # 25 tokens: SOS + 4 context + 25 + "." + EOT = 32, the context length
    learner = PromptLearner(["dog", name], clip_model, n_ctx=4)
    assert learner.tokenized_prompts[1, 31] == learner.tokenized_prompts.max()  # EOT in the last position
    message = (r"N_CTX 5 is too long for the text encoder's 32 tokens: the prompt of class '{}' needs 33 \(start, "
               r"5 context tokens, 25 for the name, '.', end\); lower {}N_CTX or shorten {}CTX_INIT$")
    for names in (["dog", name], [name, "dog"]):  # the longest name is found wherever it is
        with pytest.raises(ConfigError, match="^" + message.format(name, "", "")):
            PromptLearner(names, clip_model, n_ctx=5)
    key = r"TRAINER\.COOP\."
    with pytest.raises(ConfigError, match="^" + key + message.format(name, key, key)):
        PromptLearner(["dog", name], clip_model, n_ctx=5, config_node="TRAINER.COOP")


def test_one_class_is_a_class_list_and_none_is_refused(clip_model):
    learner = PromptLearner(["cat"], clip_model, n_ctx=2)
    assert learner().shape == (1, 32, 64)
    with pytest.raises(ValueError, match=r"^The class list is empty; a prompt needs at least one class name$"):
        learner.set_classnames([])
