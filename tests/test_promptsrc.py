"""PromptSRC (trainers/promptsrc.py, selftpt/promptsrc.py) and PromptSRC+TPT
(trainers/promptsrc_tpt.py) on tiny random CLIPs, on CPU.

The placement tests use a 3-layer CLIP (the shared tiny CLIP has one layer per tower, so it has
no layer for a deep text token) and compare with IVLP's forward written out by hand.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import trainers  # noqa: F401  (registers the trainers)
from selftpt.clip_loader import build_random_clip, tokenize
from selftpt.launch import EXIT_USER_ERROR, main
from selftpt.losses import marginal_entropy, select_confident
from selftpt.promptsrc import (
    PROMPTSRC_TEMPLATES,
    IVLPClip,
    IVLPPrompts,
    frozen_text_features,
    gaussian_epoch_weights,
    self_consistency_losses,
)
from selftpt.toolbox import build_trainer, save_checkpoint, set_random_seed
from tests.helpers import TINY_CLIP_ARCH, adamw_first_step, recorded_checkpoints, tiny_cfg, tiny_opts
from trainers.promptsrc import MODEL_NAME

REPO = Path(__file__).resolve().parents[1]
DEEP_ARCH = {**TINY_CLIP_ARCH, "vision_layers": 3, "transformer_layers": 3}
CLASSES = ["red square", "green circle", "blue triangle"]


@pytest.fixture(scope="module")
def deep_clip():
    return build_random_clip(DEEP_ARCH, seed=3).float().eval()


def ivlp(clip_model, depth_text=2, depth_vision=2, n_text=4, n_vision=3) -> IVLPClip:
    torch.manual_seed(0)
    prompts = IVLPPrompts(CLASSES, clip_model, n_text, n_vision, depth_text, depth_vision, "a photo of a")
    return IVLPClip(prompts, clip_model)


def make_trainer(root, clip_path, tmp_path, kind="PromptSRC", *opts):
    torch.manual_seed(0)
    return build_trainer(tiny_cfg(root, clip_path, kind, ("OUTPUT_DIR", str(tmp_path / kind), "SEED", "1", *opts)))


# ------------------------------------------------------------------- where the prompts go
def test_state_dict_keys_are_the_original_customclip_names(deep_clip):
    model = ivlp(deep_clip, depth_text=3, depth_vision=2)
    assert set(model.prompts.state_dict()) == {
        "prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix",
        "image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow",
        "text_encoder.transformer.resblocks.1.VPT_shallow", "text_encoder.transformer.resblocks.2.VPT_shallow"}
    assert model.prompts.image_encoder.VPT.shape == (3, DEEP_ARCH["vision_width"])
    # deeper than the towers: every layer prompted, as the original (layer i prompted when i < depth)
    assert (ivlp(deep_clip, depth_text=9, depth_vision=9).prompts.depth_text,
            ivlp(deep_clip, depth_text=9, depth_vision=9).prompts.depth_vision) == (3, 3)
    assert "image_encoder.VPT" not in ivlp(deep_clip, depth_vision=0).prompts.state_dict()


def ivlp_image_by_hand(clip_model, prompts: IVLPPrompts, images: torch.Tensor) -> torch.Tensor:
    """IVLP's ViT: VPT appended after the positional embedding, before ln_pre; before layer i in
    1..depth-1 the last n positions replaced by that layer's tokens; class token pooled."""
    v = clip_model.visual
    x = v.conv1(images).flatten(2).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    vpt = prompts.image_encoder
    n = vpt.VPT.shape[0]
    x = v.ln_pre(torch.cat([x, vpt.VPT.expand(x.shape[0], -1, -1)], dim=1)).permute(1, 0, 2)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < prompts.depth_vision:
            deep = vpt.transformer.resblocks[str(i)].VPT_shallow
            x = torch.cat([x[:-n], deep[:, None].expand(-1, x.shape[1], -1)], dim=0)
        x = block(x)
    return v.ln_post(x[0]) @ v.proj


def ivlp_text_by_hand(clip_model, prompts: IVLPPrompts) -> torch.Tensor:
    """IVLP's text tower on the full context: [SOS, ctx, name . EOT], positions 1..n replaced by
    layer i's tokens before layers 1..depth-1; the EOT feature projected."""
    learner = prompts.prompt_learner
    n = learner.n_ctx
    x = torch.cat([learner.token_prefix, learner.ctx.expand(len(CLASSES), -1, -1), learner.token_suffix], dim=1)
    x = (x + clip_model.positional_embedding).permute(1, 0, 2)
    for i, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= i < prompts.depth_text:
            deep = prompts.text_encoder.transformer.resblocks[str(i)].VPT_shallow
            x = torch.cat([x[:1], deep[:, None].expand(-1, x.shape[1], -1), x[1 + n:]], dim=0)
        x = block(x)
    x = clip_model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(len(CLASSES)), learner.tokenized_prompts.argmax(-1)] @ clip_model.text_projection


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prompts_enter_the_layers_the_paper_says(deep_clip, depth):
    model = ivlp(deep_clip, depth_text=depth, depth_vision=depth)
    with torch.no_grad():  # make the deep tokens large, so that a misplaced one shows
        for p in model.prompts.parameters():
            p.add_(torch.randn_like(p))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = model.image_encoder(images)
        text = model.text_features(normalize=False)
        assert torch.allclose(image, ivlp_image_by_hand(deep_clip, model.prompts, images), atol=1e-5)
        assert torch.allclose(text, ivlp_text_by_hand(deep_clip, model.prompts), atol=1e-5)
        # the frozen pass is CLIP's own, with no prompts
        assert torch.equal(model.encode_image_frozen(images), F.normalize(deep_clip.visual(images), dim=-1))


def test_every_prompt_tensor_gets_a_gradient(deep_clip):
    model = ivlp(deep_clip, depth_text=3, depth_vision=3)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompts.parameters())


# ------------------------------------------------------------------------------ the losses
def test_self_consistency_losses_against_hand_computed_values():
    text, frozen_text = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    image, frozen_image = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    logits, frozen_logits = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    losses = self_consistency_losses(text, frozen_text, image, frozen_image, logits, frozen_logits, 25.0, 10.0)
    assert losses["text"].item() == pytest.approx(25.0 * (0.4 + 0.8) / 4)  # mean |.| over 4 entries
    assert losses["image"].item() == pytest.approx(10.0 * (1 + 1) / 2)
    # KL(q || p), q = (1/2, 1/2) frozen, p = (3/4, 1/4) prompted, summed then / 2 logits
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert losses["logits"].item() == pytest.approx(kl / 2, rel=1e-6)


def test_textual_diversity_averages_unnormalised_features_over_60_templates(deep_clip):
    assert len(PROMPTSRC_TEMPLATES) == len(set(PROMPTSRC_TEMPLATES)) == 60
    assert "a photo of a {}." in PROMPTSRC_TEMPLATES and "itap of a {}." not in PROMPTSRC_TEMPLATES
    model = ivlp(deep_clip)
    got = frozen_text_features(model.text_encoder, deep_clip.token_embedding, ["red_square", "blue triangle"])
    with torch.no_grad():
        total = sum(deep_clip.encode_text(tokenize([t.format(n) for n in ("red square", "blue triangle")], 32))
                    for t in PROMPTSRC_TEMPLATES)
    assert torch.allclose(got, F.normalize(total / 60, dim=-1), atol=1e-5)


def test_one_step_applies_the_gradient_of_ce_plus_the_weighted_regularisers(tiny_data_root, tiny_clip_path,
                                                                             tmp_path, monkeypatch):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    model = trainer.model
    torch.manual_seed(0)
    batch = next(iter(trainer.train_loader_x))
    images, labels = trainer.parse_batch_train(batch)
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 99
    params = [p for p in model.prompts.parameters() if p.requires_grad]
    frozen_text = frozen_text_features(model.text_encoder, model.prompt_learner._token_embedding, trainer.classnames)
    text, image = model.text_features(), model.encode_image(images)
    logits = model.logits(image, text)
    with torch.no_grad():
        frozen_image = F.normalize(model.image_encoder.visual(images), dim=-1)
        frozen_logits = model.logit_scale.exp() * frozen_image @ frozen_text.t()
    kl = (frozen_logits.softmax(-1) * (frozen_logits.log_softmax(-1) - logits.log_softmax(-1))).sum() / logits.numel()
    terms = {"loss_ce": F.cross_entropy(logits, labels), "loss_scl_text": 25.0 * (text - frozen_text).abs().mean(),
             "loss_scl_image": 10.0 * (image - frozen_image).abs().mean(), "loss_scl_logits": kl}
    loss = sum(terms.values())
    expected = torch.autograd.grad(loss, params)
    seen = []
    original = trainer.optim.step
    monkeypatch.setattr(trainer.optim, "step", lambda *a, **k: (seen.append([p.grad.clone() for p in params]),
                                                                original(*a, **k)))
    summary = trainer.forward_backward(batch)
    assert summary["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, term in terms.items():  # each logged term is its own part of the loss
        assert summary[name] == pytest.approx(term.item(), rel=1e-5), name
    accuracy = 100.0 * (logits.argmax(-1) == labels).float().mean().item()
    assert summary["acc"] == pytest.approx(accuracy)
    for got, want in zip(seen[0], expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def distances_to_frozen(trainer, images) -> tuple[float, float]:
    model = trainer.model
    with torch.no_grad():
        text = (model.text_features() - trainer.frozen_text).abs().mean().item()
        image = (model.encode_image(images) - model.encode_image_frozen(images)).abs().mean().item()
    return text, image


def test_the_regularisers_keep_the_prompted_features_closer_to_frozen_clip(tiny_data_root, tiny_clip_path,
                                                                          tmp_path):
    found = {}
    for weights in ((0.0, 0.0), (25.0, 10.0)):
        trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / str(weights[0]), "PromptSRC",
                               "TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT", str(weights[0]),
                               "TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT", str(weights[1]), "OPTIM.LR", "0.05")
        trainer.set_model_mode("train")
        torch.manual_seed(0)
        batch = next(iter(trainer.train_loader_x))
        trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 99
        for _ in range(8):
            trainer.forward_backward(batch)
        found[weights] = distances_to_frozen(trainer, trainer.parse_batch_train(batch)[0])
    (text_free, image_free), (text_reg, image_reg) = found[(0.0, 0.0)], found[(25.0, 10.0)]
    assert text_reg < text_free and image_reg < image_free


# ----------------------------------------------------------------------------------- GPA
def test_gpa_weights_are_the_normalised_gaussian_over_epochs():
    weights = gaussian_epoch_weights(20, 15.0, 1.0)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert int(weights.argmax()) == 14  # epoch 15
    density = [math.exp(-0.5 * (e - 15.0) ** 2) for e in range(1, 21)]
    assert weights.tolist() == pytest.approx([d / sum(density) for d in density], rel=1e-9)
    with pytest.raises(ValueError, match="GPA_MEAN"):
        gaussian_epoch_weights(5, 1e6, 1.0)


def test_the_final_prompts_are_the_gaussian_weighted_average_of_the_epochs(tiny_data_root, tiny_clip_path,
                                                                          tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, "PromptSRC", "OUTPUT_DIR", str(out),
                           "OPTIM.MAX_EPOCH", "3", "TRAINER.PROMPTSRC.GPA_MEAN", "2.0",
                           "TRAINER.PROMPTSRC.GPA_STD", "1.0", "TEST.NO_TEST", "True")
    snapshots = []
    original = trainer.aggregate_epoch

    def aggregate():
        snapshots.append({k: p.detach().clone() for k, p in trainer.model.prompts.prompt_parameters().items()})
        original()
    monkeypatch.setattr(trainer, "aggregate_epoch", aggregate)
    trainer.train()
    assert len(snapshots) == 3
    w = [math.exp(-0.5 * (e - 2.0) ** 2) for e in (1, 2, 3)]
    w = [x / sum(w) for x in w]
    final = trainer.model.prompts.prompt_parameters()
    saved = torch.load(out / "VLPromptLearner" / "model.pth.tar-3", weights_only=False)["state_dict"]
    for key, param in final.items():
        expected = sum(wi * s[key] for wi, s in zip(w, snapshots))
        assert torch.allclose(param.detach(), expected, atol=1e-6), key
        assert torch.equal(saved[key], param.detach())  # the last checkpoint holds the GPA prompts
    assert trainer.result_extra["gpa"] == {"mean": 2.0, "std": 1.0, "epochs": 3}  # recorded with the results
    assert not torch.equal(snapshots[0]["image_encoder.VPT"], snapshots[2]["image_encoder.VPT"])


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_under_the_original_names(tiny_data_root, tiny_clip_path, tmp_path):
    first = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / "a")
    with torch.no_grad():
        for p in first.model.prompts.parameters():
            p.add_(0.1)
    first.save_model(0, str(tmp_path / "ckpt"))
    saved = torch.load(tmp_path / "ckpt" / "VLPromptLearner" / "model.pth.tar-1", weights_only=False)
    assert {"prompt_learner.ctx", "image_encoder.VPT"} <= set(saved["state_dict"])
    set_random_seed(5)
    second = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / "b")
    second.load_model(str(tmp_path / "ckpt"), epoch=1)
    for (name, a), b in zip(first.model.prompts.named_parameters(), second.model.prompts.parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_in_the_released_format_loads(tiny_data_root, tiny_clip_path, tmp_path):
    """A released checkpoint holds the whole CustomCLIP (frozen CLIP and the zero-shot copy too),
    in fp16, under VLPromptLearner/: the prompt keys load, the rest is ignored."""
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    own = trainer.model.prompts.state_dict()
    released = {k: torch.randn_like(v).half() for k, v in own.items()}
    released["prompt_learner.token_prefix"] = torch.zeros(50, 1, 64).half()  # other classes: never loaded
    released["prompt_learner.token_suffix"] = torch.zeros(50, 27, 64).half()
    released.update({"image_encoder.conv1.weight": torch.zeros(64, 3, 16, 16).half(), "logit_scale": torch.ones(()),
                     "prompt_learner.ZS_image_encoder.conv1.weight": torch.zeros(64, 3, 16, 16).half(),
                     "text_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(192, 64).half()})
    save_checkpoint({"state_dict": released, "epoch": 20, "optimizer": None, "scheduler": None},
                    str(tmp_path / "released" / "VLPromptLearner"))
    trainer.load_model(str(tmp_path / "released"), epoch=20)
    for key, param in trainer.model.prompts.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), released[key].float()), key
    assert trainer.model.prompt_learner.token_prefix.shape[0] == 6  # this dataset's classes kept


# ------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("opts, words", [
    (("MODEL.BACKBONE.NAME", "RN50"), "backbone RN50 is a ResNet"),
    (("MODEL.BACKBONE.NAME", "Bench-RN-S", "INPUT.SIZE", "(64, 64)"), "or Bench-ViT-S on the built-in CPU benchmark"),
    (("TRAINER.PROMPTSRC.N_CTX_TEXT", "2"), "has 4 words but TRAINER.PROMPTSRC.N_CTX_TEXT is 2"),
])
@pytest.mark.parametrize("kind", ["PromptSRC", "PromptSRCTPT"])
def test_a_resnet_or_a_mismatched_context_is_one_line(kind, opts, words, tmp_path, capsys, tiny_data_root,
                                                      tiny_clip_path):
    code = main(["--output-dir", str(tmp_path / "out"), *tiny_opts(tiny_data_root, tiny_clip_path, kind), *opts])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and words in err[0], err
    if opts[0] == "MODEL.BACKBONE.NAME":
        assert f"{kind} prompts the layers of a ViT image encoder" in err[0]  # who refuses


def test_gpa_weights_that_vanish_are_one_line_before_training(tmp_path, capsys, tiny_data_root, tiny_clip_path):
    code = main(["--output-dir", str(tmp_path / "out"), *tiny_opts(tiny_data_root, tiny_clip_path, "PromptSRC"),
                 "TRAINER.PROMPTSRC.GPA_MEAN", "1000.0", "TRAINER.PROMPTSRC.GPA_STD", "1.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and "GPA_MEAN 1000.0" in err[0], err
    assert not (tmp_path / "out" / "VLPromptLearner").exists()


def test_paper_configs_hold_the_published_settings():
    def node(stem):
        return yaml.safe_load((REPO / f"configs/trainers/PromptSRC/{stem}.yaml").read_text())

    b2n, xd = node("vit_b16_c2_ep20_batch4_4+4ctx"), node("vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets")
    for cfg, depth, gpa in ((b2n, 9, (15.0, 1.0)), (xd, 3, (6.0, 10.0))):
        p = cfg["TRAINER"]["PROMPTSRC"]
        assert (p["N_CTX_TEXT"], p["N_CTX_VISION"], p["CTX_INIT"]) == (4, 4, "a photo of a")
        assert (p["PROMPT_DEPTH_TEXT"], p["PROMPT_DEPTH_VISION"]) == (depth, depth)
        assert (p["TEXT_LOSS_WEIGHT"], p["IMAGE_LOSS_WEIGHT"], p["GPA_MEAN"], p["GPA_STD"]) == (25.0, 10.0, *gpa)
        assert (cfg["OPTIM"]["NAME"], cfg["OPTIM"]["LR"], cfg["OPTIM"]["MAX_EPOCH"]) == ("sgd", 0.0025, 20)
        assert cfg["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"] == 4


# ----------------------------------------------------------------------- PromptSRC + TPT
@pytest.fixture(scope="module")
def promptsrc_dir(tiny_data_root, tiny_clip_path, tmp_path_factory):
    """A PromptSRC output dir whose VLPromptLearner/model.pth.tar-20 holds moved prompts."""
    out = tmp_path_factory.mktemp("promptsrc")
    source = make_trainer(tiny_data_root, tiny_clip_path, out / "src")
    with torch.no_grad():
        for p in source.model.prompts.parameters():
            p.add_(0.05)
    source.save_model(19, str(out))
    return out, {k: p.detach().clone() for k, p in source.model.prompts.named_parameters()}


def tpt_on_promptsrc(root, clip_path, tmp_path, promptsrc_dir, tune):
    trainer = make_trainer(root, clip_path, tmp_path, "PromptSRCTPT", "TRAINER.PROMPTSRC_TPT.N_VIEWS", "8",
                           "TRAINER.PROMPTSRC_TPT.TUNE", tune)
    trainer.load_model(str(promptsrc_dir[0]), epoch=20)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    return trainer


@pytest.mark.parametrize("tune", ["all", "text"])
def test_tpt_on_promptsrc_prompts_tunes_what_tune_says_and_resets_per_image(tune, tiny_data_root, tiny_clip_path,
                                                                           tmp_path, promptsrc_dir, monkeypatch):
    trainer = tpt_on_promptsrc(tiny_data_root, tiny_clip_path, tmp_path, promptsrc_dir, tune)
    assert trainer.prompt_init.startswith("PromptSRC checkpoint")
    assert trainer.result_extra["tpt_tuned"] == {"all": "every prompt tensor (text and vision)",
                                                 "text": "the text prompts (context, deep text tokens)"}[tune]
    loaded = promptsrc_dir[1]
    for key, value in trainer.model.prompts.named_parameters():
        assert torch.equal(value.detach(), loaded[key]), key
    batches = iter(trainer.test_loader)
    first, second = (trainer.parse_batch_test(next(batches))[0] for _ in range(2))
    with torch.no_grad():
        alone = trainer.model_inference(second)
        trainer.model_inference(first)
        tuned = dict(trainer.model.prompts.named_parameters())
        assert not torch.equal(tuned["prompt_learner.ctx"], loaded["prompt_learner.ctx"])  # tuned on `first`
        vision_moved = not torch.equal(tuned["image_encoder.VPT"], loaded["image_encoder.VPT"])
        assert vision_moved == (tune == "all")
        assert torch.equal(trainer.model_inference(second), alone)  # reset before each image
    # the views pass the image encoder once with TUNE text (TPT's loop), at every step with TUNE all
    encode, passes = trainer.model.encode_image, []
    monkeypatch.setattr(trainer.model, "encode_image", lambda images: passes.append(len(images)) or encode(images))
    with torch.no_grad():
        trainer.model_inference(first)
    steps = trainer.node.STEPS
    assert passes == ([8] if tune == "text" else [8] + [1] * steps + [1])  # 8 views, the most confident tenth: 1


def test_without_a_model_dir_every_image_starts_from_the_untrained_prompts(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, "PromptSRCTPT",
                           "TRAINER.PROMPTSRC_TPT.N_VIEWS", "8")
    before = {k: p.detach().clone() for k, p in trainer.model.prompts.named_parameters()}
    trainer.load_model("", epoch=3)  # whatever --load-epoch says: nothing is loaded
    assert trainer.prompt_init == "untrained IVLP prompts (no --model-dir)"
    for key, value in trainer.model.prompts.named_parameters():
        assert torch.equal(value.detach(), before[key]) and torch.equal(trainer.initial_prompts[f"prompts.{key}"],
                                                                        before[key])


def test_load_epoch_picks_that_epochs_prompts_among_several(tiny_data_root, tiny_clip_path, tmp_path):
    out = tmp_path / "two_epochs"
    source = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / "src")
    source.save_model(9, str(out))  # -> model.pth.tar-10
    first = {k: p.detach().clone() for k, p in source.model.prompts.named_parameters()}
    epoch10 = (out / MODEL_NAME / "model.pth.tar-10").read_bytes()
    with torch.no_grad():
        for p in source.model.prompts.parameters():
            p.add_(1.0)
    source.save_model(19, str(out))  # -> model.pth.tar-20, the latest (it replaces tar-10: put it back)
    (out / MODEL_NAME / "model.pth.tar-10").write_bytes(epoch10)
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, "PromptSRCTPT",
                           "TRAINER.PROMPTSRC_TPT.N_VIEWS", "8")
    trainer.load_model(str(out), epoch=10)
    assert trainer.prompt_init.endswith("model.pth.tar-10")
    for key, value in trainer.model.prompts.named_parameters():
        assert torch.equal(value.detach(), first[key]), key
        assert torch.equal(trainer.initial_prompts[f"prompts.{key}"], first[key]), key  # each image starts there


def test_tuning_every_prompt_steps_along_the_confident_views_entropy_gradient(tiny_data_root, tiny_clip_path,
                                                                             tmp_path, promptsrc_dir, monkeypatch):
    trainer = tpt_on_promptsrc(tiny_data_root, tiny_clip_path, tmp_path, promptsrc_dir, "all")
    model = trainer.model
    views = trainer.parse_batch_test(next(iter(trainer.test_loader)))[0][0]
    params = [p for p in model.prompts.parameters()]
    assert all(p.requires_grad for p in params)
    logits = model(views)  # TPT's all-view forward, with gradients
    loss = marginal_entropy(logits[select_confident(logits.detach(), 0.1)])
    expected = torch.autograd.grad(loss, params)
    seen = []
    original = trainer.optim.step
    monkeypatch.setattr(trainer.optim, "step", lambda *a, **k: (seen.append([p.grad.clone() for p in params]),
                                                                original(*a, **k)))
    start = [p.detach().clone() for p in params]
    with torch.enable_grad():
        trainer._tune_and_predict(views)
    assert len(seen) == 1
    for got, want in zip(seen[0], expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-8)
    for p, p0, g in zip(params, start, seen[0]):  # then one AdamW step at TPT's lr
        assert torch.allclose(p.detach(), adamw_first_step(p0, g, trainer.node.LR), atol=1e-6)


def test_grad_checkpoint_recomputes_the_text_tower_and_tunes_the_same(tiny_data_root, tiny_clip_path, tmp_path,
                                                                       promptsrc_dir, monkeypatch):
    checkpointed = recorded_checkpoints(monkeypatch)
    images, tuned = None, {}
    for flag in (False, True):
        trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path / str(flag), "PromptSRCTPT",
                               "TRAINER.PROMPTSRC_TPT.N_VIEWS", "8", "TRAINER.PROMPTSRC_TPT.GRAD_CHECKPOINT", str(flag))
        trainer.load_model(str(promptsrc_dir[0]), epoch=20)
        trainer.set_model_mode("eval")
        trainer.prepare_for_test()
        if images is None:  # the same views for both
            images = trainer.parse_batch_test(next(iter(trainer.test_loader)))[0][:1]
        checkpointed.clear()
        with torch.no_grad():
            logits = trainer.model_inference(images)
        assert bool(checkpointed) == flag
        tuned[flag] = (logits, [p.detach().clone() for p in trainer.model.prompts.parameters()])
    assert torch.allclose(tuned[False][0], tuned[True][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(tuned[False][1], tuned[True][1]))
    # PromptSRC itself has no GRAD_CHECKPOINT key: it trains without recomputation
    assert make_trainer(tiny_data_root, tiny_clip_path, tmp_path / "src").model.text_encoder.grad_checkpoint is False


# ------------------------------------------------------------------------------ precision
def _run(kind, precision, root, clip_path, out):
    node = "PROMPTSRC" if kind == "PromptSRC" else "PROMPTSRC_TPT"
    cfg = tiny_cfg(root, clip_path, kind, ("OUTPUT_DIR", str(out), "OPTIM.MAX_EPOCH", "1", "SEED", "1",
                                           "TRAINER.PROMPTSRC_TPT.N_VIEWS", "8", f"TRAINER.{node}.PREC", precision))
    set_random_seed(1)
    with pytest.warns(UserWarning) if precision != "fp32" else contextlib.nullcontext():
        trainer = build_trainer(cfg)
    assert trainer.precision == precision
    trainer.train() if trainer.TRAINS else trainer.test()
    set_random_seed(2)
    images, _ = trainer.parse_batch_test(next(iter(trainer.test_loader)))
    with torch.no_grad():
        logits = trainer.model_inference(images).float()
    return trainer, logits


@pytest.mark.parametrize("kind", ["PromptSRC", "PromptSRCTPT"])
def test_fp32_fp16_and_amp_give_finite_results_close_to_fp32(kind, tiny_data_root, tiny_clip_path, tmp_path):
    ref_trainer, ref_logits = _run(kind, "fp32", tiny_data_root, tiny_clip_path, tmp_path / "fp32")
    for precision in ("fp16", "amp"):
        trainer, logits = _run(kind, precision, tiny_data_root, tiny_clip_path, tmp_path / precision)
        assert torch.isfinite(logits).all(), precision
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.prompts.parameters())
        assert (logits - ref_logits).abs().max() <= 0.1 * ref_logits.abs().max(), precision
        accuracy = trainer.test_result["metrics"]["accuracy"]
        assert abs(accuracy - ref_trainer.test_result["metrics"]["accuracy"]) <= 10.0, precision
