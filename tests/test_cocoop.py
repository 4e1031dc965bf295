"""CoCoOp (trainers/cocoop.py) on CPU: mechanics on the tiny random CLIP and TinyShapes, learning
on the pretrained tiny CLIP and LearnableShapes (tests/learnable_world.py)."""
from __future__ import annotations

import math

import pytest
import torch

import trainers  # noqa: F401  (registers the trainers)
from selftpt.clip_loader import build_random_clip
from selftpt.config import extend_cfg
from selftpt.prompt_learner import PromptLearner
from selftpt.toolbox import build_trainer, get_cfg_default, set_random_seed
from tests.helpers import TINY_CLIP_ARCH, ListLoader, exact_calibration_batch, tiny_cfg
from tests.learnable_world import learnable_cfg, training_set_loss
from trainers.cocoop import ConditionalPromptLearner

COCOOP_CONFIG = "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"


def make_trainer(root, clip_path, tmp_path, opts=()):
    cfg = tiny_cfg(root, clip_path, "CoCoOp", ("OUTPUT_DIR", str(tmp_path / "cocoop"),
                                              "TRAINER.COCOOP.N_CTX", 4, "TRAINER.COCOOP.CTX_INIT", "a photo of a")
                   + tuple(opts))
    return build_trainer(cfg)


def test_config_is_cocoops_base_to_new_setting():
    cfg = extend_cfg(get_cfg_default())
    cfg.merge_from_file(COCOOP_CONFIG)
    assert (cfg.TRAINER.COCOOP.N_CTX, cfg.TRAINER.COCOOP.CTX_INIT) == (4, "a photo of a")
    assert (cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.LR_SCHEDULER) == ("sgd", 0.002, 10, "cosine")
    assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR) == (1, "constant", 1e-5)
    assert (cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.DATALOADER.TEST.BATCH_SIZE) == (1, 100)
    assert cfg.TRAINER.COCOOP.PREC == "auto" and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"


def test_meta_net_and_checkpoint_keys_are_cocoops(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    learner = trainer.model.prompt_learner
    assert learner.ctx.shape == (4, 64)
    linear1, linear2 = learner.meta_net.linear1, learner.meta_net.linear2
    assert (linear1.in_features, linear1.out_features, linear2.out_features) == (64, 4, 64)  # vis//16 = 4
    assert set(learner.state_dict()) == {
        "ctx", "token_prefix", "token_suffix", "meta_net.linear1.weight", "meta_net.linear1.bias",
        "meta_net.linear2.weight", "meta_net.linear2.bias"}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt_learner.{k}" for k in learner.state_dict()
                         if k not in ("token_prefix", "token_suffix")}


def test_each_image_gets_its_own_prompt_whatever_the_batch(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    images = next(iter(trainer.test_loader))["img"][:3]
    trainer.set_model_mode("eval")
    with torch.no_grad():
        together = trainer.model(images)  # batched text encoding (no gradient)
        alone = torch.cat([trainer.model(images[i:i + 1]) for i in range(3)])
        contexts = trainer.model.prompt_learner.conditional_context(trainer.model.encode_image(images))
    assert together.shape == (3, 6)
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(contexts[0], contexts[1])  # the meta-net conditions on the image
    with_grad = trainer.model(images)  # one image at a time (training path)
    assert torch.allclose(with_grad.detach(), together, atol=1e-5)


def test_a_training_step_updates_the_context_and_the_meta_net(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path, opts=("DATALOADER.TRAIN_X.BATCH_SIZE", 2))
    learner = trainer.model.prompt_learner
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    trainer.set_model_mode("train")
    trainer.num_batches = len(trainer.train_loader_x)
    batches = iter(trainer.train_loader_x)
    for trainer.batch_idx in range(2):
        summary = trainer.forward_backward(next(batches))
        assert math.isfinite(summary["loss"])
        for name in ("linear1", "linear2"):
            grad = getattr(learner.meta_net, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0
    for name, param in learner.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} was not updated"
    trainer.test()
    assert set(trainer.test_result["metrics"]) >= {"accuracy", "macro_f1", "ece"}
    assert trainer.test_result["num_images"] == 24


def test_cocoop_learns_in_the_learnable_world(learnable_data_root, learnable_clip_path, tmp_path):
    """Two epochs at batch 8. Measured (seeds 1-3): training-set CE falls to 0.23-0.49 of the
    untrained prompt's and test accuracy ends at 98.3-99.2 (zero-shot CLIP: 43.3). The random
    meta-net already moves the context off the misleading "a photo of a" (untrained accuracy
    85.8-99.2), so the loss, not the accuracy, is what shows the learning."""
    set_random_seed(1)
    trainer = build_trainer(learnable_cfg(learnable_data_root, learnable_clip_path, "CoCoOp", (
        "OUTPUT_DIR", str(tmp_path / "run"), "SEED", 1, "OPTIM.MAX_EPOCH", 2, "DATALOADER.TRAIN_X.BATCH_SIZE", 8)))
    before = training_set_loss(trainer)
    trainer.train()
    assert training_set_loss(trainer) <= 0.65 * before
    assert trainer.test_result["metrics"]["accuracy"] >= 80.0


def test_cocoop_evaluation_records_ece(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    logits, labels, expected = exact_calibration_batch()
    trainer.test_loader = ListLoader([{"img": torch.zeros(5, 3, 32, 32), "label": labels}])
    monkeypatch.setattr(trainer, "model_inference", lambda images: logits)
    trainer.test()
    assert trainer.test_result["metrics"]["ece"] == pytest.approx(expected)


def test_one_epoch_at_batch_1_with_the_shipped_config(tiny_data_root, tiny_clip_path, tmp_path):
    cfg = tiny_cfg(tiny_data_root, tiny_clip_path, "CoCoOp")
    cfg.merge_from_file(COCOOP_CONFIG)
    cfg.merge_from_list([
        "OUTPUT_DIR", str(tmp_path / "run"), "INPUT.SIZE", (32, 32), "MODEL.BACKBONE.NAME", str(tiny_clip_path),
        "DATALOADER.NUM_WORKERS", 0, "OPTIM.MAX_EPOCH", 1, "DATASET.NUM_SHOTS", 2,
        "DATASET.SUBSAMPLE_CLASSES", "base", "TRAINER.COCOOP.PREC", "fp32", "SEED", 1,
    ])
    trainer = build_trainer(cfg)
    assert trainer.get_current_lr() == pytest.approx(1e-5)  # constant warm-up epoch
    trainer.train()  # 6 images at batch 1 with the constant warm-up epoch, then test on base classes
    assert (tmp_path / "run" / "prompt_learner" / "model.pth.tar-1").is_file()
    assert trainer.test_result["num_images"] == 12


def test_each_images_context_is_the_shared_context_plus_its_meta_net_shift(tiny_data_root, tiny_clip_path,
                                                                           tmp_path):
    """ctx_i = ctx + meta_net(f(x_i)) (CoCoOp, eq. 2): the sign matters for CoCoOp's released weights."""
    trainer = make_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    learner = trainer.model.prompt_learner
    images = next(iter(trainer.test_loader))["img"][:2]
    with torch.no_grad():
        features = trainer.model.encode_image(images)
        contexts = learner.conditional_context(features)
        shift = learner.meta_net(features.float())
    assert shift.abs().max() > 0
    torch.testing.assert_close(contexts, learner.ctx.unsqueeze(0) + shift.unsqueeze(1), rtol=0, atol=1e-6)


def test_the_conditional_learners_context_starts_as_coops():
    """Its shared context is CoOp's, for the defaults (16 random tokens), a count and an initialisation."""
    clip_model, names = build_random_clip(TINY_CLIP_ARCH, seed=0), ["red square", "green circle"]
    for kwargs in ({}, {"n_ctx": 3}, {"n_ctx": 4, "ctx_init": "a photo of a"}):
        torch.manual_seed(0)
        conditional = ConditionalPromptLearner(names, clip_model, **kwargs)
        torch.manual_seed(0)
        coop = PromptLearner(names, clip_model, **kwargs)
        assert torch.equal(conditional.ctx, coop.ctx) and conditional.prompt_prefix == coop.prompt_prefix
    assert conditional.prompt_prefix == "a photo of a"  # the last: initialised from words
    assert ConditionalPromptLearner(names, clip_model).ctx.shape[0] == 16
