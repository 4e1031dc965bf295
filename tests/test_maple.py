"""MaPLe (trainers/maple.py, selftpt/maple_prompts.py): the coupled prompts sit in the layers the
paper says, the loss equals a forward written out by hand, only prompts train, checkpoints are the
original code's (its key names load), ResNets are refused in one line, and fp16/amp stay close to fp32.

A tiny random CLIP with 3 layers per tower and different widths (text 64, vision 128) is used, so
deep prompts of layers 1..J-1 and the text -> vision projections are exercised.
"""
from __future__ import annotations

import contextlib
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from selftpt.clip_loader import build_random_clip, save_state_dict, tokenize
from selftpt.deep_prompts import require_vit_backbone
from selftpt.errors import ConfigError
from selftpt.launch import EXIT_USER_ERROR, main
from selftpt.maple_prompts import CHECKPOINT_NAME
from selftpt.token_stats import recording_tokens
from selftpt.toolbox import build_trainer, load_checkpoint, set_random_seed
from tests.helpers import TINY_CLIP_ARCH, tiny_cfg, tiny_opts

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from clip.model import ModifiedResNet

DEEP_ARCH = dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128, vision_patch_size=16,
                 context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=3)
DEPTH = ("TRAINER.MAPLE.PROMPT_DEPTH", "3")


@pytest.fixture(scope="session")
def deep_clip_path(tmp_path_factory):
    """A tiny random CLIP with 3 transformer layers in each tower (fp16 state_dict, as OpenAI's)."""
    path = tmp_path_factory.mktemp("deep_clip") / "deep_clip.pt"
    save_state_dict(build_random_clip(DEEP_ARCH, seed=3), path)
    return path


def build_maple(root, clip_path, out, *opts, trainer: str = "MaPLe", seed: int = 1):
    set_random_seed(seed)
    return build_trainer(tiny_cfg(root, clip_path, trainer, ("OUTPUT_DIR", str(out), "SEED", "1", *opts)))


# ---------------------------------------------------------------- MaPLe written out by hand
def manual_text_features(model, learner) -> torch.Tensor:
    """CLIP's text transformer block by block, the deep prompts overwriting positions 1..n."""
    text = model.text_encoder
    n = learner.n_ctx
    x = learner() + text.positional_embedding.type(model.dtype)
    x = x.permute(1, 0, 2)
    for i, block in enumerate(text.transformer.resblocks):
        if 1 <= i < learner.depth:
            deep = learner.compound_prompts_text[i - 1].type(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x[:1], deep, x[1 + n:]], dim=0)
        x = block(x)
    x = text.ln_final(x.permute(1, 0, 2))
    eot = learner.tokenized_prompts.argmax(dim=-1)
    return F.normalize(x[torch.arange(x.shape[0]), eot] @ text.text_projection, dim=-1)


def manual_vision_prompts(learner) -> list[torch.Tensor]:
    """Layer 0: proj(ctx); layer i: the i-th coupling projection of the i-th deeper text prompt."""
    prompts = [learner.ctx @ learner.proj.weight.t() + learner.proj.bias]
    for layer, tokens in zip(learner.compound_prompt_projections, learner.compound_prompts_text):
        prompts.append(tokens @ layer.weight.t() + layer.bias)
    return prompts


def manual_image_features(model, learner, images: torch.Tensor) -> torch.Tensor:
    """CLIP's ViT with n tokens appended before ln_pre and replaced before layers 1..J-1."""
    v = model.visual
    n, batch = learner.n_ctx, images.shape[0]
    vision = manual_vision_prompts(learner)
    x = v.conv1(images.type(model.dtype))
    x = x.reshape(batch, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.to(x.dtype) + torch.zeros(batch, 1, x.shape[-1], dtype=x.dtype), x], dim=1)
    x = x + v.positional_embedding.to(x.dtype)
    x = torch.cat([x, vision[0].type(x.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < learner.depth:
            x = torch.cat([x[:-n], vision[i].type(x.dtype).unsqueeze(1).expand(-1, batch, -1)], dim=0)
        x = block(x)
    x = v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj
    return F.normalize(x, dim=-1)


def manual_logits(model, images: torch.Tensor) -> torch.Tensor:
    learner = model.prompt_learner
    image, text = manual_image_features(model, learner, images), manual_text_features(model, learner)
    return model.logit_scale.exp() * image @ text.t()


# ------------------------------------------------------------------------------- tests
def test_prompts_go_into_the_layers_the_paper_says(tiny_data_root, deep_clip_path, tmp_path):
    trainer = build_maple(tiny_data_root, deep_clip_path, tmp_path, *DEPTH)
    learner = trainer.model.prompt_learner
    assert learner.depth == 3 and learner.n_ctx == 2 and learner.prompt_prefix == "a photo of a"
    text, vision = learner.text_prompts().layers, learner.vision_prompts().layers
    assert sorted(text) == [1, 2] and sorted(vision) == [0, 1, 2]
    assert all(t.shape == (2, 64) for t in text.values()) and all(t.shape == (2, 128) for t in vision.values())
    for got, want in zip([vision[i] for i in range(3)], manual_vision_prompts(learner)):
        assert torch.allclose(got, want, atol=1e-6)
    # what enters each ViT block: the prompt tokens last (layer 0 through ln_pre, as tokens are appended before it)
    images = next(iter(trainer.train_loader_x))["img"][:2]
    with torch.no_grad(), recording_tokens(trainer.model.visual, [0, 1, 2]) as seen:
        trainer.model.encode_image(images)
    assert torch.allclose(seen[0][-2:], trainer.model.visual.ln_pre(vision[0]).unsqueeze(1).expand(-1, 2, -1),
                          atol=1e-5)
    for layer in (1, 2):
        assert torch.allclose(seen[layer][-2:], vision[layer].unsqueeze(1).expand(-1, 2, -1), atol=1e-6)
    # "a photo" is learnt, "of a" stays in the fixed tokens after it (the original's CTX_INIT with N_CTX 2)
    words = learner.embed_tokens(tokenize("a photo of a", 32))[0]  # SOS a photo of a EOS
    assert torch.allclose(learner.ctx, words[1:3].float())
    assert torch.allclose(learner.token_suffix[0, :2], words[3:5])


def test_training_loss_is_the_hand_written_forward_and_only_prompts_move(tiny_data_root, deep_clip_path, tmp_path):
    trainer = build_maple(tiny_data_root, deep_clip_path, tmp_path, *DEPTH)
    batch = next(iter(trainer.train_loader_x))
    images, labels = trainer.parse_batch_train(batch)
    with torch.no_grad():
        expected = F.cross_entropy(manual_logits(trainer.model, images), labels).item()
        # and the evaluation path (text features once, prompted encoder) gives the same logits
        trainer.prepare_for_test()
        assert torch.allclose(trainer.model_inference(images), manual_logits(trainer.model, images), atol=1e-4)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 2
    summary = trainer.forward_backward(batch)
    assert summary["loss"] == pytest.approx(expected, rel=1e-5)
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])}
    learner = {f"prompt_learner.{name}" for name, _ in trainer.model.prompt_learner.named_parameters()}
    assert moved == learner  # every prompt parameter (context, deep prompts, projections) and nothing else
    assert trainer.get_model_names() == [CHECKPOINT_NAME]


def test_checkpoint_has_the_original_key_names_and_round_trips(tiny_data_root, deep_clip_path, tmp_path):
    first = build_maple(tiny_data_root, deep_clip_path, tmp_path / "a", *DEPTH)
    with torch.no_grad():
        for p in first.model.prompt_learner.parameters():
            p.add_(torch.randn_like(p))
    first.save_model(0, str(tmp_path / "ckpt"))
    saved = load_checkpoint(str(tmp_path / "ckpt" / CHECKPOINT_NAME / "model.pth.tar-1"))["state_dict"]
    assert set(saved) == {
        "prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias",
        "prompt_learner.compound_prompts_text.0", "prompt_learner.compound_prompts_text.1",
        "prompt_learner.compound_prompt_projections.0.weight", "prompt_learner.compound_prompt_projections.0.bias",
        "prompt_learner.compound_prompt_projections.1.weight", "prompt_learner.compound_prompt_projections.1.bias",
        "prompt_learner.token_prefix", "prompt_learner.token_suffix"}
    second = build_maple(tiny_data_root, deep_clip_path, tmp_path / "b", *DEPTH, seed=2)
    second.load_model(str(tmp_path / "ckpt"), epoch=1)
    for (name, a), (_, b) in zip(first.model.prompt_learner.named_parameters(),
                                 second.model.prompt_learner.named_parameters()):
        assert torch.equal(a, b), name
    assert second.model_record()["source"] == "checkpoint"
    # MODEL.INIT_WEIGHTS: the same file starts a new run's prompts
    third = build_maple(tiny_data_root, deep_clip_path, tmp_path / "c", *DEPTH, "MODEL.INIT_WEIGHTS",
                        str(tmp_path / "ckpt" / CHECKPOINT_NAME / "model.pth.tar-1"), seed=3)
    for (name, a), (_, b) in zip(first.model.prompt_learner.named_parameters(),
                                 third.model.prompt_learner.named_parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_written_by_the_original_code_loads(tiny_data_root, deep_clip_path, tmp_path):
    """The original saves its whole CustomCLIP (frozen CLIP keys too) in fp16 under the same names."""
    trainer = build_maple(tiny_data_root, deep_clip_path, tmp_path / "run", *DEPTH)
    generator = torch.Generator().manual_seed(5)
    own = trainer.checkpoint_module.state_dict()
    state = {key: torch.randn(value.shape, generator=generator).half() for key, value in own.items()
             if not key.endswith(("token_prefix", "token_suffix"))}
    state["prompt_learner.token_prefix"] = torch.zeros(7, 1, 64).half()  # another class set's buffers
    state["prompt_learner.token_suffix"] = torch.zeros(7, 29, 64).half()
    state["image_encoder.conv1.weight"] = torch.zeros(128, 3, 16, 16).half()
    state["text_encoder.positional_embedding"] = torch.zeros(32, 64).half()
    state["logit_scale"] = torch.tensor(4.6).half()
    folder = tmp_path / "released" / CHECKPOINT_NAME
    folder.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 5, "optimizer": None, "scheduler": None}, folder / "model.pth.tar-5")
    conv = trainer.model.visual.conv1.weight.detach().clone()
    trainer.load_model(str(tmp_path / "released"), epoch=5)
    learner = trainer.model.prompt_learner
    for name, param in learner.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, state[f"prompt_learner.{name}"].float()), name
    assert learner.token_prefix.shape[0] == 6  # this run's classes, not the file's
    assert torch.equal(trainer.model.visual.conv1.weight, conv)  # frozen CLIP untouched


def test_a_resnet_backbone_is_refused_in_one_line(tiny_data_root, tiny_clip_path, tmp_path, capsys):
    resnet = types.SimpleNamespace(visual=ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2,
                                                         input_resolution=32, width=8))
    with pytest.raises(ConfigError, match="ResNet CLIP.*ViT") as caught:
        require_vit_backbone("MaPLe", "a-resnet-file.pt", resnet.visual)
    assert "\n" not in str(caught.value)
    code = main(["--output-dir", str(tmp_path / "out"), *tiny_opts(tiny_data_root, tiny_clip_path, "MaPLe"),
                 "MODEL.BACKBONE.NAME", "Bench-RN-S", "INPUT.SIZE", "(64, 64)"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and "ViT backbone" in err[0], err
    assert "MaPLe prompts the layers of a ViT image encoder, but backbone Bench-RN-S is a ResNet CLIP" in err[0]


@pytest.mark.parametrize("trainer", ["MaPLe", "MaPLeTPT", "PromptAlign", "PromptSRC", "PromptSRCTPT"])
def test_a_resnet_given_as_a_file_is_refused_once_loaded(trainer, tiny_data_root, tmp_path, capsys):
    """A weights file is not a known name, so the tower is checked after loading (one line all the same)."""
    path = tmp_path / "resnet_clip.pt"
    save_state_dict(build_random_clip({**TINY_CLIP_ARCH, "vision_layers": (1, 1, 1, 1), "vision_width": 32}), path)
    code = main(["--output-dir", str(tmp_path / "out"), *tiny_opts(tiny_data_root, path, trainer)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1, err
    assert f"{trainer} prompts the layers of a ViT image encoder, but backbone {path} is a ResNet CLIP" in err[0]


def test_depth_beyond_the_backbone_prompts_every_layer(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = build_maple(tiny_data_root, tiny_clip_path, tmp_path)  # PROMPT_DEPTH 9, a 1-layer tiny CLIP
    learner = trainer.model.prompt_learner
    assert learner.depth == 1 and len(learner.compound_prompts_text) == 0
    assert sorted(learner.vision_prompts().layers) == [0]


def test_ctx_init_shorter_than_n_ctx_is_refused(tiny_data_root, deep_clip_path, tmp_path):
    with pytest.raises(ConfigError, match="CTX_INIT"):
        build_maple(tiny_data_root, deep_clip_path, tmp_path, *DEPTH, "TRAINER.MAPLE.N_CTX", "3",
                    "TRAINER.MAPLE.CTX_INIT", "a photo")


# ------------------------------------------------------------------------ the precision matrix
def run_in(precision, root, clip_path, out, trainer="MaPLe", *opts):
    node = {"MaPLe": "MAPLE", "MaPLeTPT": "MAPLE_TPT", "PromptAlign": "PROMPTALIGN"}[trainer]
    # the paper's lr (0.0035): at the tiny world's 0.01 six steps move the random projections so far that
    # fp16 and fp32 trajectories part for reasons of dynamics, not precision
    cfg = tiny_cfg(root, clip_path, trainer, ("OUTPUT_DIR", str(out), "OPTIM.MAX_EPOCH", "1", "SEED", "1",
                                              "OPTIM.LR", "0.0035",
                                              f"TRAINER.{node}.PREC", precision, f"TRAINER.{node}.PROMPT_DEPTH", "3",
                                              *opts))
    set_random_seed(1)
    with pytest.warns(UserWarning) if precision != "fp32" else contextlib.nullcontext():
        built = build_trainer(cfg)
    assert built.precision == precision
    if built.TRAINS:
        built.train()
    else:
        built.test()
    set_random_seed(2)
    images, _ = built.parse_batch_test(next(iter(built.test_loader)))
    with torch.no_grad():
        logits = built.model_inference(images).float()
    return built, logits


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_fp16_and_amp_are_finite_and_close_to_fp32(precision, tiny_data_root, deep_clip_path, tmp_path):
    ref, ref_logits = run_in("fp32", tiny_data_root, deep_clip_path, tmp_path / "fp32")
    got, logits = run_in(precision, tiny_data_root, deep_clip_path, tmp_path / precision)
    assert torch.isfinite(logits).all()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in got.checkpoint_module.parameters())
    assert (logits - ref_logits).abs().max() <= 0.1 * ref_logits.abs().max()
    assert abs(got.test_result["metrics"]["accuracy"] - ref.test_result["metrics"]["accuracy"]) <= 10.0


def test_an_open_clip_tower_without_the_seams_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="has a timm image tower other than EVA .* supported: OpenAI CLIP") as caught:
        require_vit_backbone("MaPLe", "open_clip:ViT-SO400M-14-SigLIP/webli")
    assert "\n" not in str(caught.value)
