"""OpenCLIP / EVA-CLIP backbones (``open_clip:`` names, selftpt/open_clip_backend.py) on tiny
random-weight open_clip models built offline: the project's text encoder against open_clip's
own ``encode_text`` for each text-tower layout, the trainers on them, zero-shot logits against
open_clip's, the efficiency benchmark, and the one-line errors (no weights offline, no package,
an unsupported text tower, preprocessing that does not match the config)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

import trainers  # noqa: E402,F401  (registers the trainers)
from selftpt.clip_loader import load_clip, text_tokenizer, tokenize  # noqa: E402
from selftpt.deep_prompts import DeepPrompts, deep_prompts  # noqa: E402
from selftpt.errors import ConfigError, UserError  # noqa: E402
from selftpt.open_clip_backend import OpenClipError, OpenClipModel, check_input, wrap  # noqa: E402
from selftpt.prompt_learner import PromptLearner  # noqa: E402
from selftpt.prompted_clip import PromptedCLIP  # noqa: E402
from selftpt.text_encoder import causal_mask, encode_text_tokens, open_clip_block  # noqa: E402
from selftpt.toolbox import build_trainer, set_random_seed  # noqa: E402
from tests.helpers import (  # noqa: E402
    TINY_CLASSES,
    first_batch,
    one_step_gradients,
    project_trainers,
    recorded_checkpoints,
    tiny_cfg,
)

EVA_TIMM = "selftpt_test_eva02_clip_tiny"
TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
VIT = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32}
# Tiny versions of open_clip's layouts: ViT-B-16 (open_clip.CLIP), a CustomTextCLIP with layer
# scale and a biased linear projection, EVA02-B-16 (CustomTextCLIP, timm EVA-02 vision tower
# with rotary embeddings and SwiGLU), and bidirectional text towers pooled at the last position
# or the first, or at the end token ('eos').
CONFIGS = {
    "Test-Tiny-ViT": {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": TEXT},
    "Test-Tiny-Custom": {"embed_dim": 32, "vision_cfg": VIT, "custom_text": True,
                         "text_cfg": {**TEXT, "ls_init_value": 0.5, "proj_bias": True}},
    "Test-Tiny-EVA": {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT,
                      "vision_cfg": {"image_size": 32, "timm_model_name": EVA_TIMM, "timm_model_pretrained": False,
                                     "timm_pool": "token", "timm_proj": None}},
    "Test-Tiny-Bidir": {"embed_dim": 32, "vision_cfg": VIT, "custom_text": True,
                        "text_cfg": {**TEXT, "no_causal_mask": True, "pool_type": "last"}},
    "Test-Tiny-First": {"embed_dim": 32, "vision_cfg": VIT, "custom_text": True,
                        "text_cfg": {**TEXT, "pool_type": "first"}},
    "Test-Tiny-Eos": {"embed_dim": 32, "vision_cfg": VIT, "custom_text": True,
                      "text_cfg": {**TEXT, "pool_type": "eos", "eos_id": 49407}},
}
NAMES = [f"{c} {s}" for c, s in TINY_CLASSES]
PROMPTS = ["a photo of a red square.", "x", "a b c d e f g h i j k l", "itap of a purple circle!"]
TRAINERS = project_trainers()  # every trainer, the deep-prompt ones included (EVA: prompts as prefix tokens)


def _register_tiny_eva() -> None:
    """EVA02-B-16's vision tower (timm ``eva02_base_patch16_clip_224``) at 32 px, 2 layers of 64."""
    if EVA_TIMM in timm.list_models():
        return
    from timm.models import register_model
    from timm.models.eva import _create_eva

    def selftpt_test_eva02_clip_tiny(pretrained: bool = False, **kwargs):
        args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, qkv_fused=False,
                    mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                    use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool=kwargs.pop("global_pool", "token"))
        return _create_eva("eva02_base_patch16_clip_224", pretrained=False, **dict(args, **kwargs))

    register_model(selftpt_test_eva02_clip_tiny)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """The tiny configs registered with open_clip; a random state_dict file per architecture."""
    _register_tiny_eva()
    folder = tmp_path_factory.mktemp("open_clip")
    for arch, config in CONFIGS.items():
        (folder / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    files = {}
    for arch in CONFIGS:
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        files[arch] = folder / f"{arch}.pt"
        torch.save(model.state_dict(), files[arch])
    return files


def loaded(weights: dict[str, Path], arch: str) -> OpenClipModel:
    return load_clip(f"open_clip:{arch}@{weights[arch]}")


# ----------------------------------------------------------------------- text towers
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_text_encoder_reproduces_open_clips_encode_text(weights, arch):
    model = loaded(weights, arch)
    tokenizer = open_clip.get_tokenizer(arch)  # open_clip's own, independent of the project's tokenize()
    tokens = tokenizer(PROMPTS)
    assert torch.equal(tokenize(PROMPTS, model.context_length, text_tokenizer(model)), tokens)
    with torch.no_grad():
        expected = model.model.encode_text(tokens)
        ours = encode_text_tokens(model, tokens)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)
        # through the prompt learner, as every prompt trainer renders its prompts
        learner = PromptLearner(NAMES, model, ctx_init="a photo of a")
        rendered = PromptedCLIP(learner, model).text_features(normalize=False)
        reference = model.model.encode_text(tokenizer([f"a photo of a {n}." for n in NAMES]))
        assert torch.allclose(rendered, reference, atol=1e-5, rtol=1e-5)


def test_the_encoder_trims_after_the_end_token_only_where_that_is_exact(weights):
    causal, bidir = loaded(weights, "Test-Tiny-ViT"), loaded(weights, "Test-Tiny-Bidir")
    tokens = tokenize(PROMPTS, 32, text_tokenizer(causal))
    assert causal.text_layout.length(tokens) == int(tokens.argmax(-1).max()) + 1 < 32
    assert bidir.text_layout.length(tokens) == 32  # bidirectional attention sees the padding
    first = loaded(weights, "Test-Tiny-First")
    assert first.text_layout.length(tokens) == 32 and first.text_layout.pool == "first"


def test_a_padding_mask_of_a_bidirectional_tower_is_reproduced(weights):
    model = loaded(weights, "Test-Tiny-Bidir")
    model.model.text.use_pad_mask = True  # TextTransformer's own switch (no config key sets it)
    masked = wrap(model.model, "masked", "Test-Tiny-Bidir")
    assert masked.text_layout.pad_id == 0 and not masked.text_layout.causal
    tokens = tokenize(PROMPTS, 32, text_tokenizer(masked))
    with torch.no_grad():
        reference = model.model.encode_text(tokens)
        assert torch.allclose(encode_text_tokens(masked, tokens), reference, atol=1e-5)
        half = wrap(copy.deepcopy(model.model).half(), "masked", "Test-Tiny-Bidir")  # the same tower in fp16
        in_half = encode_text_tokens(half, tokens)
        assert in_half.dtype == torch.float16 and half.text_layout.pad_id == 0
        assert torch.allclose(in_half.float(), reference, atol=2e-2)
        model.model.text.use_pad_mask = False
        assert not torch.allclose(encode_text_tokens(masked, tokens), model.model.encode_text(tokens), atol=1e-3)


def test_a_sequence_first_block_gives_what_the_batch_first_one_gives():
    """open_clip 3 builds its text towers batch-first; a sequence-first block (``batch_first=False``,
    which open_clip's Transformer also accepts) runs on the hook points' (L, n, d) tensor as is."""
    torch.manual_seed(0)
    batch_first = open_clip.transformer.ResidualAttentionBlock(16, 2, batch_first=True).eval()
    sequence_first = open_clip.transformer.ResidualAttentionBlock(16, 2, batch_first=False).eval()
    sequence_first.load_state_dict(batch_first.state_dict())
    x, mask = torch.randn(5, 3, 16), causal_mask(5)  # (L, n, d)
    with torch.no_grad():
        ours = open_clip_block(sequence_first, x, mask, batch_first=False)
        assert torch.allclose(ours, open_clip_block(batch_first, x, mask, batch_first=True), atol=1e-6)
        assert not torch.allclose(ours, open_clip_block(sequence_first, x, None, batch_first=False), atol=1e-3)


def test_deep_text_prompts_hook_the_open_clip_text_encoder(weights):
    model = loaded(weights, "Test-Tiny-ViT")
    prompted = PromptedCLIP(PromptLearner(NAMES, model, n_ctx=2), model)
    with torch.no_grad():
        plain = prompted.text_features()
        with deep_prompts(prompted.text_encoder, DeepPrompts({1: torch.randn(2, 64)})):
            deep = prompted.text_features()
        assert not torch.allclose(plain, deep, atol=1e-4)
        assert torch.equal(prompted.text_features(), plain)  # removed with the block


@pytest.mark.parametrize("arch", ["Test-Tiny-Custom", "Test-Tiny-Bidir"])
def test_gradient_checkpointing_gives_the_same_features_and_gradients(weights, arch):
    model = loaded(weights, arch)
    learner = PromptLearner(NAMES, model, n_ctx=4)
    results = []
    for checkpointed in (False, True):
        learner.ctx.grad = None
        feats = PromptedCLIP(learner, model, grad_checkpoint=checkpointed).text_features(normalize=False)
        feats.square().sum().backward()
        results.append((feats.detach(), learner.ctx.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6) and results[0][1].abs().sum() > 1e-3


def test_an_overlong_text_is_refused_not_truncated_as_open_clip_would(weights):
    model = loaded(weights, "Test-Tiny-ViT")
    with pytest.raises(ConfigError, match="context length"):
        tokenize(["word " * 40], model.context_length, text_tokenizer(model))
    with pytest.raises(ConfigError, match="N_CTX 28 is too long"):
        PromptLearner(NAMES, model, n_ctx=28)


# --------------------------------------------------------------------------- trainers
def build(tiny_data_root: Path, weights: dict[str, Path], arch: str, trainer: str, out: Path, *opts: str):
    set_random_seed(0)
    return build_trainer(tiny_cfg(tiny_data_root, Path(f"open_clip:{arch}@{weights[arch]}"), trainer,
                                  ("OUTPUT_DIR", str(out), "SEED", "1", "TRAINER.TPT.N_VIEWS", "4", *opts)))


def one_step(trainer) -> None:
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 2
    trainer.forward_backward(next(iter(trainer.train_loader_x)))


@pytest.mark.parametrize("arch", ["Test-Tiny-ViT", "Test-Tiny-EVA"])
def test_coop_step_moves_only_the_context(weights, tiny_data_root, tmp_path, arch):
    trainer = build(tiny_data_root, weights, arch, "CoOp", tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    one_step(trainer)
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {"prompt_learner.ctx"}


@pytest.mark.parametrize("arch", ["Test-Tiny-ViT", "Test-Tiny-Bidir"])
def test_selftpt_gradient_matching_through_checkpointed_open_clip_blocks(weights, tiny_data_root, tmp_path, arch,
                                                                         monkeypatch):
    """The double backward of GM through recomputed blocks (their attention kernels kept), and no
    recomputation without GRAD_CHECKPOINT."""
    checkpointed = recorded_checkpoints(monkeypatch)
    grads = {}
    for flag in (False, True):
        trainer = build(tiny_data_root, weights, arch, "SelfTPT", tmp_path / str(flag),
                        "TRAINER.SELFTPT.GRAD_CHECKPOINT", str(flag), "TRAINER.SELFTPT.USE_GM", "True",
                        "TRAINER.SELFTPT.GRAD_COS_FREQ", "1")
        batch = first_batch(trainer)
        checkpointed.clear()
        grads[flag] = one_step_gradients(trainer, batch)
        assert bool(checkpointed) == flag
    for key in grads[False]:
        assert torch.allclose(grads[False][key], grads[True][key], atol=1e-7, rtol=1e-5), key


@pytest.mark.parametrize("trainer_name", TRAINERS)
def test_every_trainer_runs_on_an_eva_clip(weights, tiny_data_root, tmp_path, trainer_name):
    trainer = build(tiny_data_root, weights, "Test-Tiny-EVA", trainer_name, tmp_path)
    if trainer.TRAINS:
        one_step(trainer)
    images = next(iter(trainer.test_loader))["img"][:2]
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    with torch.no_grad():
        logits = trainer.model_inference(images)
    assert logits.shape == (len(images), len(TINY_CLASSES)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("views", ["1", "4"])  # Self-TPT, and Self-TPT-v (views ensembled)
def test_selftpt_trains_a_step_and_adapts(weights, tiny_data_root, tmp_path, views):
    trainer = build(tiny_data_root, weights, "Test-Tiny-Custom", "SelfTPT", tmp_path,
                    "TRAINER.SELFTPT.N_VIEWS", views)
    ctx = trainer.model.prompt_learner.ctx.detach().clone()
    one_step(trainer)
    assert not torch.equal(trainer.model.prompt_learner.ctx, ctx)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    tta = trainer.result_extra["tta"]
    assert tta["cpt_loss_after"] < tta["cpt_loss_before"]
    with torch.no_grad():
        images = next(iter(trainer.test_loader))["img"][:2]
        assert torch.isfinite(trainer.model_inference(images)).all()


@pytest.mark.parametrize("arch", ["Test-Tiny-ViT", "Test-Tiny-EVA"])
def test_zeroshot_clip_gives_open_clips_own_zero_shot_logits(weights, tiny_data_root, tmp_path, arch):
    trainer = build(tiny_data_root, weights, arch, "ZeroshotCLIP", tmp_path)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    images = next(iter(trainer.test_loader))["img"][:3]
    own = open_clip.create_model(arch, pretrained=str(weights[arch])).eval()
    with torch.no_grad():
        logits = trainer.model_inference(images)
        text = own.encode_text(open_clip.get_tokenizer(arch)([trainer.template.format(n) for n in NAMES]))
        image = own.encode_image(images)
        expected = own.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    assert torch.allclose(logits, expected, atol=1e-4)


def test_the_benchmark_measures_an_open_clip_backbone_with_random_weights(weights, tmp_path, capsys):
    from selftpt.efficiency import main as benchmark_main
    from selftpt.efficiency.cli import prepare_backbone

    code = benchmark_main([
        "--backbone", "open_clip:Test-Tiny-EVA", "--methods", "ZeroshotCLIP", "CoOp", "--num-classes", "3",
        "--num-images", "2", "--batch-sizes", "2", "--repeats", "1", "--in-process", "--quiet",
        "--output-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    obj = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert obj["backbone"] == "open_clip:Test-Tiny-EVA" and obj["weights"] == "random (seed 0)"
    assert {m for m, r in obj["methods"].items() if "error" not in r} == {"ZeroshotCLIP", "CoOp"}
    assert (tmp_path / "backbones" / "random_open_clip_Test-Tiny-EVA_seed0.pt").is_file()
    local = prepare_backbone(f"open_clip:Test-Tiny-ViT@{weights['Test-Tiny-ViT']}")
    assert local["backbone_path"] == str(weights["Test-Tiny-ViT"]) and local["resolution"] == 32
    assert local["input_opts"][local["input_opts"].index("INPUT.INTERPOLATION") + 1] == "bicubic"


# ----------------------------------------------------------------------------- errors
def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and isinstance(exc.value, UserError)
    return message


def test_missing_weights_offline_name_what_to_fetch_and_where_before_any_work(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("built a model without weights"))
    with pytest.raises(OpenClipError) as exc:
        load_clip("open_clip:EVA02-B-16/merged2b_s8b_b131k")
    message = one_line(exc)
    assert "timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k" in message and str(tmp_path / "hub") in message
    assert "open_clip_model.safetensors" in message and "open_clip:EVA02-B-16@/path/to/file" in message


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    with pytest.raises(OpenClipError) as exc:
        load_clip("open_clip:ViT-B-16/laion2b_s34b_b88k")
    assert 'pip install -e ".[openclip]"' in one_line(exc)


@pytest.mark.parametrize("name, tower", [
    ("open_clip:xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k", "Hugging Face text encoder"),
    ("open_clip:ViT-B-16-SigLIP/webli", "Hugging Face tokenizer"),
    ("open_clip:coca_ViT-B-32/laion2b_s13b_b90k", "CoCa"),
])
def test_unsupported_text_towers_are_refused_in_one_line(monkeypatch, tmp_path, name, tower):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OpenClipError) as exc:
        load_clip(name)
    message = one_line(exc)
    assert tower in message and "supported: open_clip.CLIP" in message


def test_bad_names_are_one_line(weights):
    for name, expected in [("open_clip:ViT-B-61/laion2b_s34b_b88k", "did you mean 'ViT-B-16'"),
                           ("open_clip:ViT-B-16/laion9b", "laion2b_s34b_b88k"),
                           ("open_clip:ViT-B-16", "names no weights"),
                           ("open_clip:ViT-B-16@/no/such/file.pt", "not found")]:
        with pytest.raises(OpenClipError) as exc:
            load_clip(name)
        assert expected in one_line(exc)


def test_preprocessing_that_does_not_match_the_backbone_is_refused_before_any_work(weights, tiny_data_root,
                                                                                    tmp_path):
    from selftpt.launch import check_cfg_names
    cfg = tiny_cfg(tiny_data_root, Path("open_clip:ViT-B-16/laion2b_s34b_b88k"), "CoOp")
    with pytest.raises(OpenClipError) as exc:
        check_cfg_names(cfg)  # no weights needed: open_clip's configs say what the model expects
    assert one_line(exc).endswith("set INPUT.SIZE [224, 224]")
    cfg = tiny_cfg(tiny_data_root, Path(f"open_clip:Test-Tiny-ViT@{weights['Test-Tiny-ViT']}"), "CoOp",
                   ("INPUT.PIXEL_MEAN", "[0.5, 0.5, 0.5]", "INPUT.INTERPOLATION", "bilinear"))
    with pytest.raises(OpenClipError) as exc:
        check_cfg_names(cfg)
    assert 'INPUT.PIXEL_MEAN [0.48145466, 0.4578275, 0.40821073] INPUT.INTERPOLATION "bicubic"' in one_line(exc)
    with pytest.raises(OpenClipError, match="Test-Tiny-ViT") as exc:  # a trainer built without train.py, too
        build_trainer(cfg)
    assert 'INPUT.INTERPOLATION "bicubic"' in one_line(exc)
    cfg.merge_from_list(["INPUT.PIXEL_MEAN", "[0.48145466, 0.4578275, 0.40821073]", "INPUT.INTERPOLATION", "bicubic"])
    check_cfg_names(cfg)  # matches now
    siglip_like = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                   "resize_mode": "squash"}
    with pytest.raises(OpenClipError) as exc:
        check_input(siglip_like, cfg.INPUT, "m")
    assert "INPUT.PIXEL_STD [0.5, 0.5, 0.5]" in one_line(exc)


def test_a_local_dir_brings_its_config_weights_and_preprocessing(weights, tiny_data_root, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": CONFIGS["Test-Tiny-ViT"], "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    name = f"open_clip:local-dir:{folder}"
    with pytest.raises(OpenClipError) as exc:  # open_clip itself would build random weights here
        load_clip(name)
    assert "no weights file" in one_line(exc)
    (folder / "open_clip_pytorch_model.bin").write_bytes(weights["Test-Tiny-ViT"].read_bytes())
    model = load_clip(name)
    assert tuple(model.preprocess["mean"]) == (0.5, 0.5, 0.5)
    expected = loaded(weights, "Test-Tiny-ViT")
    tokens = tokenize(PROMPTS, 32, text_tokenizer(model))
    with torch.no_grad():
        assert torch.equal(encode_text_tokens(model, tokens), encode_text_tokens(expected, tokens))
    with pytest.raises(OpenClipError) as exc:  # the trainer checks the built model's preprocessing too
        build_trainer(tiny_cfg(tiny_data_root, Path(name), "CoOp", ("OUTPUT_DIR", str(tmp_path / "out"))))
    assert one_line(exc).endswith("set INPUT.PIXEL_MEAN [0.5, 0.5, 0.5] INPUT.PIXEL_STD [0.5, 0.5, 0.5]")


def test_train_py_runs_an_open_clip_backbone_and_refuses_a_mismatch_in_one_line(weights, tiny_data_root, tmp_path,
                                                                                 capsys):
    from selftpt.launch import main
    from tests.helpers import tiny_opts
    name = f"open_clip:Test-Tiny-EVA@{weights['Test-Tiny-EVA']}"
    opts = tiny_opts(tiny_data_root, Path(name), "ZeroshotCLIP")
    assert main(["--output-dir", str(tmp_path / "zs"), *opts]) == 0
    record = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert record["backbone"] == name
    capsys.readouterr()
    assert main(["--output-dir", str(tmp_path / "bad"), *opts, "INPUT.SIZE", "(64, 64)"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Backbone") and err.endswith("set INPUT.SIZE [32, 32]") and "\n" not in err
    assert not (tmp_path / "bad").exists()  # refused before any work
