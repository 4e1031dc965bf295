"""MaPLe+TPT (trainers/maple_tpt.py) and PromptAlign (trainers/promptalign.py, selftpt/token_stats.py):
the per-image loss against one written out by hand (entropy of the confident views, plus the token
statistics' L1 alignment to the source's), the source statistics computed once next to the model,
reused, and a stale file refused in one line; a reset before every image; MaPLe checkpoints loaded
(another prompt depth refused); fp16 and amp close to fp32."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import trainers.promptalign as promptalign_module
from selftpt.clip_loader import build_random_clip, save_state_dict
from selftpt.errors import ConfigError, DatasetError, UserError
from selftpt.launch import main
from selftpt.maple_prompts import CHECKPOINT_NAME
from selftpt.results import RESULTS_FILENAME
from selftpt.token_stats import SourceStatsError, alignment_loss, token_moments
from selftpt.toolbox import build_trainer, build_transform, read_image, set_random_seed
from selftpt.trainer_base import CheckpointError
from tests.helpers import adamw_first_step, recorded_checkpoints, tiny_cfg, tiny_opts
from tests.test_maple import DEEP_ARCH, manual_text_features, manual_vision_prompts, run_in

FAST = ("N_VIEWS", "8", "PROMPT_DEPTH", "3")


def opts(node: str, *pairs: str) -> tuple[str, ...]:
    """``TRAINER.<node>.KEY VALUE`` pairs from ``KEY, VALUE, ...``."""
    return tuple(f"TRAINER.{node}.{x}" if i % 2 == 0 else x for i, x in enumerate(pairs))


NODE = {"MaPLeTPT": "MAPLE_TPT", "PromptAlign": "PROMPTALIGN"}  # each trainer's config node


def build(root, clip_path, out, trainer, *extra, seed=1):
    node = NODE[trainer]
    set_random_seed(seed)
    return build_trainer(tiny_cfg(root, clip_path, trainer, ("OUTPUT_DIR", str(out), "SEED", "1",
                                                             *opts(node, *FAST), *extra)))


@pytest.fixture(scope="module")
def deep_clip(tmp_path_factory):
    """test_maple's tiny CLIP with 3 layers per tower (text width 64, vision 128)."""
    path = tmp_path_factory.mktemp("deep_clip") / "deep_clip.pt"
    save_state_dict(build_random_clip(DEEP_ARCH, seed=3), path)
    return path


@pytest.fixture(scope="module")
def maple_run(tiny_data_root, deep_clip, tmp_path_factory):
    """A trained MaPLe of depth 3 on TinyShapes (train.py, one epoch): the model the test-time methods load."""
    out = tmp_path_factory.mktemp("maple_run")
    assert main(["--output-dir", str(out), "--seed", "1", *tiny_opts(tiny_data_root, deep_clip, "MaPLe"),
                 "OPTIM.MAX_EPOCH", "1", "TRAINER.MAPLE.PROMPT_DEPTH", "3"]) == 0
    return out


def first_image_views(trainer, index=0):
    return trainer.views(read_image(trainer.dm.dataset.test[index].impath))


def manual_tokens_and_logits(model, images, layers):
    """The prompted ViT by hand, recording what enters the given blocks; logits with the hand-made text side."""
    learner, v = model.prompt_learner, model.visual
    n, batch = learner.n_ctx, images.shape[0]
    vision = manual_vision_prompts(learner)
    x = v.conv1(images.type(model.dtype))
    x = x.reshape(batch, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(batch, 1, x.shape[-1]), x], dim=1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, vision[0].unsqueeze(0).expand(batch, -1, -1)], dim=1)).permute(1, 0, 2)
    tokens = {}
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < learner.depth:
            x = torch.cat([x[:-n], vision[i].unsqueeze(1).expand(-1, batch, -1)], dim=0)
        if i in layers:
            tokens[i] = x
        x = block(x)
    image = F.normalize(v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj, dim=-1)
    return tokens, model.logit_scale.exp() * image @ manual_text_features(model, learner).t()


# ------------------------------------------------------------------------------- tests
def test_token_moments_and_alignment_loss_by_hand():
    # 1 token position, 3 sequences, 2 channels: values per channel [1, 2, 6] and [0, 0, 3]
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]]])  # (L=1, N=3, D=2)
    mean, var = token_moments(tokens)
    assert torch.allclose(mean, torch.tensor([[3.0, 1.0]]))
    assert torch.allclose(var, torch.tensor([[(4 + 1 + 9) / 3, (1 + 1 + 4) / 3]]))
    mean01, var01 = token_moments(tokens, torch.tensor([0, 1]))  # rows 0 and 1 only
    assert torch.allclose(mean01, torch.tensor([[1.5, 0.0]])) and torch.allclose(var01, torch.tensor([[0.25, 0.0]]))
    source_mean, source_var = torch.tensor([[[2.0, 1.0]]]), torch.tensor([[[4.0, 0.0]]])
    # 0.5 * mean(|3-2|, |1-1|) + 0.5 * mean(|14/3-4|, |2-0|) = 0.25 + 0.5 * (2/3 + 2) / 2
    want = 10.0 * (0.25 + 0.5 * (2 / 3 + 2.0) / 2)
    got = alignment_loss({5: (mean, var)}, source_mean, source_var, [5], weight=10.0)
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("trainer_name, selection, align_selection, tpt_loss", [
    ("MaPLeTPT", 0.25, None, True),
    ("PromptAlign", 0.25, 0.5, True),
    ("PromptAlign", 0.5, 0.25, True),  # the statistics' views a strict subset of the entropy's
    ("PromptAlign", 0.25, 0.5, False),  # TPT_LOSS False: the alignment alone
])
def test_per_image_loss_is_entropy_plus_alignment_by_hand(trainer_name, selection, align_selection, tpt_loss,
                                                          tiny_data_root, deep_clip, tmp_path):
    node = {"MaPLeTPT": "MAPLE_TPT", "PromptAlign": "PROMPTALIGN"}[trainer_name]
    extra = opts(node, "SELECTION_P", str(selection))
    if trainer_name == "PromptAlign":
        extra += opts(node, "ALIGN_SELECTION_P", str(align_selection), "ALIGN_WEIGHT", "30.0",
                      "TPT_LOSS", str(tpt_loss))
    trainer = build(tiny_data_root, deep_clip, tmp_path, trainer_name, *extra)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    views = first_image_views(trainer).to(trainer.device)
    trainer.reset()
    trainer.selected = None
    with torch.enable_grad():
        got = trainer.view_loss(views)
    with torch.no_grad():
        tokens, logits = manual_tokens_and_logits(trainer.model, views, [0, 1])
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        order = entropy.argsort()
        p = logits[order[:int(8 * selection)]].softmax(-1).mean(0)  # the most confident of the 8 views
        want = -(p * p.log()).sum().item() if tpt_loss else 0.0
        if trainer_name == "PromptAlign":
            assert trainer.align_layers == [0, 1] and trainer.align_weight == pytest.approx(30.0 / 3)
            rows = order[:int(8 * align_selection)]
            for k, layer in enumerate([0, 1]):
                x = tokens[layer][:, rows]
                mean = x.mean(1)
                var = ((x - mean.unsqueeze(1)) ** 2).mean(1)
                want += 10.0 * (0.5 * (mean - trainer.source_mean[k]).abs().mean()
                                + 0.5 * (var - trainer.source_var[k]).abs().mean()).item()
    assert got.shape == () and got.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("trainer_name", ["MaPLeTPT", "PromptAlign"])
def test_the_step_is_adamw_on_the_gradient_of_the_per_image_objective(trainer_name, maple_run, tiny_data_root,
                                                                      deep_clip, tmp_path):
    """AdamW's first step from fresh moments: p <- p (1 - lr wd) - lr g / (|g| + eps), with g the
    gradient of the documented objective (checked by hand above) at the loaded prompts."""
    trainer = build(tiny_data_root, deep_clip, tmp_path, trainer_name)
    trainer.load_model(str(maple_run), epoch=1)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    views = first_image_views(trainer)
    params = list(trainer.checkpoint_module.parameters())
    trainer.reset()
    trainer.selected = None
    start = [p.detach().clone() for p in params]
    grads = torch.autograd.grad(trainer.view_loss(views), params, allow_unused=True)
    with torch.no_grad():
        trainer.tune_and_predict(views)
    for p, p0, g in zip(params, start, grads):
        g = torch.zeros_like(p0) if g is None else g
        assert torch.allclose(p.detach(), adamw_first_step(p0, g, trainer.node.LR), atol=1e-6)


@pytest.mark.parametrize("trainer_name", ["MaPLeTPT", "PromptAlign"])
def test_grad_checkpoint_recomputes_the_text_tower_and_tunes_the_same(trainer_name, maple_run, tiny_data_root,
                                                                       deep_clip, tmp_path, monkeypatch):
    checkpointed = recorded_checkpoints(monkeypatch)
    node = NODE[trainer_name]
    tuned = {}
    for flag in (False, True):
        extra = opts(node, "GRAD_CHECKPOINT", str(flag))
        if trainer_name == "PromptAlign":
            extra += opts(node, "SOURCE_STATS", str(tmp_path / "stats.pt"))
        trainer = build(tiny_data_root, deep_clip, tmp_path / str(flag), trainer_name, *extra)
        trainer.load_model(str(maple_run), epoch=1)
        trainer.set_model_mode("eval")
        trainer.prepare_for_test()
        torch.manual_seed(0)
        views = first_image_views(trainer)
        checkpointed.clear()
        with torch.no_grad():
            logits = trainer.tune_and_predict(views)
        assert bool(checkpointed) == flag
        tuned[flag] = (logits, [p.detach().clone() for p in trainer.checkpoint_module.parameters()])
    assert torch.allclose(tuned[False][0], tuned[True][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(tuned[False][1], tuned[True][1]))


def test_one_tpt_step_lowers_the_marginal_entropy(maple_run, tiny_data_root, deep_clip, tmp_path):
    # (PromptAlign's alignment term is not checked this way: the deep prompt tokens are identical in
    # every view and every source image, so their statistics sit at the kink of the L1 term, which any
    # step away from the loaded prompts raises to first order.)
    trainer = build(tiny_data_root, deep_clip, tmp_path, "MaPLeTPT", *opts("MAPLE_TPT", "LR", "1e-3"))
    trainer.load_model(str(maple_run), epoch=1)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    views = first_image_views(trainer)
    with torch.no_grad():
        trainer.reset()
        trainer.selected = None
        before = trainer.view_loss(views).item()
        chosen = trainer.selected.clone()
        trainer.tune_and_predict(views)  # resets, chooses the same views, steps once, predicts
        assert torch.equal(trainer.selected, chosen)
        after = trainer.view_loss(views).item()  # the tuned prompts, same views
    assert after < before


def test_source_statistics_are_computed_once_next_to_the_model_reused_and_a_stale_file_refused(
        maple_run, tiny_data_root, deep_clip, tmp_path, monkeypatch, capsys):
    maple_run = Path(shutil.copytree(maple_run, tmp_path / "maple", ignore=shutil.ignore_patterns("promptalign_*")))
    first = build(tiny_data_root, deep_clip, tmp_path / "a", "PromptAlign")
    first.load_model(str(maple_run), epoch=1)
    first.prepare_for_test()
    path = maple_run / CHECKPOINT_NAME / "promptalign_source_stats-1.pt"
    assert first.stats_computed and first.stats_path == path and path.is_file()
    assert first.result_extra["source_dataset"] == "TinyShapes" and first.result_extra["source_images"] == 48
    recorded = ("align", "tpt_loss", "align_layers", "align_weight", "source_stats", "source_stats_computed")
    assert {key: first.result_extra[key] for key in recorded} == {  # weight: 100 / (ALIGN_LAYER_TO 3 - FROM 0)
        "align": True, "tpt_loss": True, "align_layers": [0, 1], "align_weight": 100 / 3, "source_stats": str(path),
        "source_stats_computed": True}
    # the statistics: mean and variance over the 48 clean train images of the loaded prompts' tokens
    transform = build_transform(first.cfg, is_train=False)
    images = torch.stack([transform(read_image(item.impath)) for item in first.dm.dataset.train_x])
    with torch.no_grad():
        tokens, _ = manual_tokens_and_logits(first.model, images, [0, 1])
    for k in (0, 1):
        mean, var = tokens[k].double().mean(1), tokens[k].double().var(1, unbiased=False)
        assert torch.allclose(first.source_mean[k].double(), mean, atol=1e-5)
        assert torch.allclose(first.source_var[k].double(), var, atol=1e-4)

    def never(*args, **kwargs):
        raise AssertionError("source statistics recomputed")

    monkeypatch.setattr(promptalign_module, "source_moments", never)
    second = build(tiny_data_root, deep_clip, tmp_path / "b", "PromptAlign", seed=2)
    second.load_model(str(maple_run), epoch=1)
    second.prepare_for_test()  # reuses the file
    assert not second.stats_computed and torch.equal(second.source_mean, first.source_mean)
    assert second.result_extra["source_stats_computed"] is False

    stale = build(tiny_data_root, deep_clip, tmp_path / "c", "PromptAlign",
                  *opts("PROMPTALIGN", "SOURCE_MAX_IMAGES", "5"))
    stale.load_model(str(maple_run), epoch=1)
    with pytest.raises(SourceStatsError, match="max_images: file 0, now 5") as caught:
        stale.prepare_for_test()
    assert "\n" not in str(caught.value)
    # other prompts than those the file was computed with: refused too, one line from train.py
    code = main(["--output-dir", str(tmp_path / "cli"), "--eval-only", "--model-dir", str(maple_run),
                 "--load-epoch", "1", *tiny_opts(tiny_data_root, deep_clip, "PromptAlign"),
                 *opts("PROMPTALIGN", *FAST), "TRAINER.PROMPTALIGN.SOURCE_STATS", str(path),
                 "TRAINER.PROMPTALIGN.ALIGN_LAYER_TO", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "layers: file [0, 1], now [0, 1, 2]" in err[0], err


@pytest.mark.parametrize("layer_from, layer_to, aligned", [(1, 4, [1, 2]), (1, 9, [1, 2])])
def test_the_aligned_layers_run_from_to_minus_two_within_the_vits_depth(layer_from, layer_to, aligned,
                                                                       tiny_data_root, deep_clip, tmp_path, capsys):
    trainer = build(tiny_data_root, deep_clip, tmp_path, "PromptAlign",
                    *opts("PROMPTALIGN", "ALIGN_LAYER_FROM", str(layer_from), "ALIGN_LAYER_TO", str(layer_to)))
    assert trainer.align_layers == aligned  # the 3-layer ViT has no layer 3 or beyond
    assert trainer.align_weight == pytest.approx(100.0 / (layer_to - layer_from))
    clipped = f"Note: aligning layers {aligned} of the 3 this ViT has" in capsys.readouterr().out
    assert clipped == (layer_to - 2 >= 3)


def test_aligning_no_layer_of_the_vit_is_refused(tiny_data_root, deep_clip, tmp_path):
    with pytest.raises(ConfigError, match=r"ALIGN_LAYER_FROM 3 / ALIGN_LAYER_TO 5 align no layer of this "
                                          r"3-layer ViT .* set ALIGN_LAYER_TO >= FROM \+ 2 and FROM < 3"):
        build(tiny_data_root, deep_clip, tmp_path, "PromptAlign",
              *opts("PROMPTALIGN", "ALIGN_LAYER_FROM", "3", "ALIGN_LAYER_TO", "5"))


@pytest.mark.parametrize("split, max_images", [("val", 0), ("train", 20), ("test", 1)])
def test_source_statistics_cover_the_configured_split_and_image_count(maple_run, tiny_data_root, deep_clip,
                                                                     tmp_path, split, max_images):
    stats = tmp_path / "stats.pt"
    trainer = build(tiny_data_root, deep_clip, tmp_path / "run", "PromptAlign", "DATALOADER.TEST.BATCH_SIZE", "16",
                    *opts("PROMPTALIGN", "SOURCE_SPLIT", split, "SOURCE_MAX_IMAGES", str(max_images),
                          "SOURCE_STATS", str(stats)))
    trainer.load_model(str(maple_run), epoch=1)
    trainer.prepare_for_test()
    dataset = trainer.dm.dataset
    items = {"train": dataset.train_x, "val": dataset.val, "test": dataset.test}[split]
    items = items[:max_images] if max_images else items  # 20 of 48 in batches of 16: the last batch counts too
    assert trainer.result_extra["source_images"] == len(items) == {"val": 12, "train": 20, "test": 1}[split]
    transform = build_transform(trainer.cfg, is_train=False)
    images = torch.stack([transform(read_image(item.impath)) for item in items])
    with torch.no_grad():
        tokens, _ = manual_tokens_and_logits(trainer.model, images, [0, 1])
    assert torch.allclose(trainer.source_mean[1].double(), tokens[1].double().mean(1), atol=1e-5)
    # the stored fingerprint: what the statistics depend on, under the names a stale file's message uses
    cfg = trainer.cfg
    fingerprint = torch.load(stats)["fingerprint"]
    assert set(fingerprint) == {"backbone", "precision", "prompts", "source_dataset", "source_split", "num_shots",
                                "max_images", "input", "layers"}
    assert {key: fingerprint[key] for key in ("precision", "source_dataset", "source_split", "num_shots",
                                              "max_images", "input", "layers")} == {
        "precision": "fp32", "source_dataset": "TinyShapes", "source_split": split,
        "num_shots": cfg.DATASET.NUM_SHOTS, "max_images": max_images,
        "input": [list(cfg.INPUT.SIZE), cfg.INPUT.INTERPOLATION, list(cfg.INPUT.PIXEL_MEAN), list(cfg.INPUT.PIXEL_STD)],
        "layers": [0, 1]}


def test_an_unreadable_source_image_is_one_line_naming_it_or_skipped(maple_run, tiny_data_root, deep_clip, tmp_path):
    victim = sorted((tiny_data_root / "tiny_shapes").rglob("val_0.png"))[0]
    original = victim.read_bytes()
    victim.write_bytes(b"not a png")

    def prepared(name: str, *extra: str):
        trainer = build(tiny_data_root, deep_clip, tmp_path / name, "PromptAlign", *extra,
                        *opts("PROMPTALIGN", "SOURCE_SPLIT", "val", "SOURCE_STATS", str(tmp_path / f"{name}.pt")))
        trainer.load_model(str(maple_run), epoch=1)
        trainer.prepare_for_test()
        return trainer

    try:
        with pytest.raises(DatasetError, match="TinyShapes: unreadable image") as caught:
            prepared("strict")
        skipping = prepared("skip", "DATASET.SKIP_CORRUPT_IMAGES", "True")
    finally:
        victim.write_bytes(original)
    assert str(victim) in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "strict.pt").exists()  # nothing half-written
    assert skipping.result_extra["source_images"] == 11  # the 12 val images but the unreadable one


@pytest.mark.parametrize("key, results, expected", [
    ("ImageNet", '{"dataset": "Caltech101"}', "ImageNet"),  # the key wins
    ("", '{"dataset": "Caltech101"}', "Caltech101"),  # else the trained model's dataset
    ("", '{"dataset": ""}', None),  # else this run's, with a note
    ("", '{"accuracy": 50.0}', None),
    ("", "not json", None),
    ("", "[1, 2]", None),
    ("", None, None),  # a model dir without a results file
    ("", "no model dir", None),
])
def test_the_source_dataset_is_the_key_else_the_trained_models_else_this_runs(tmp_path, capsys, monkeypatch, key,
                                                                              results, expected):
    model_dir = "" if results == "no model dir" else str(tmp_path)
    if results == "no model dir":  # then no results file is read, not even one in the working directory
        results = '{"dataset": "Caltech101"}'
        monkeypatch.chdir(tmp_path)
    if results is not None:
        (tmp_path / RESULTS_FILENAME).write_text(results)
    stand_in = SimpleNamespace(node=SimpleNamespace(SOURCE_DATASET=key, SOURCE_SPLIT="val"), _model_dir=model_dir,
                               cfg=SimpleNamespace(DATASET=SimpleNamespace(NAME="TinyShapes")))
    assert promptalign_module.PromptAlign.source_dataset(stand_in) == (expected or "TinyShapes")
    note = ("Note: TRAINER.PROMPTALIGN.SOURCE_DATASET is empty and no trained model names its dataset; "
            "source statistics from TinyShapes's val split")
    assert capsys.readouterr().out.strip() == ("" if expected else note)


def test_maple_tpt_resets_every_prompt_parameter_and_the_optimiser_before_each_image(
        maple_run, tiny_data_root, deep_clip, tmp_path):
    trainer = build(tiny_data_root, deep_clip, tmp_path, "MaPLeTPT")
    trainer.load_model(str(maple_run), epoch=1)
    trainer.set_model_mode("eval")
    trainer.prepare_for_test()
    assert trainer.result_extra["maple_prompt_depth"] == 3
    initial = {k: v.clone() for k, v in trainer.prompt_init_state.items()}
    a, b = first_image_views(trainer, 0), first_image_views(trainer, 5)
    with torch.no_grad():
        alone = trainer.tune_and_predict(b)
        trainer.tune_and_predict(a)
        tuned = dict(trainer.model.prompt_learner.named_parameters())
        assert all(not torch.equal(tuned[k], initial[k]) for k in initial)  # one step moved every prompt tensor
        after_a = trainer.tune_and_predict(b)
    assert torch.equal(after_a, alone)  # nothing of image a's step (prompts, AdamW moments) carried over
    assert trainer.prompt_init.startswith("MaPLe checkpoint")
    saved = torch.load(maple_run / CHECKPOINT_NAME / "model.pth.tar-1", weights_only=False)["state_dict"]
    assert torch.equal(initial["ctx"], saved["prompt_learner.ctx"])  # each image starts from the trained MaPLe


@pytest.mark.parametrize("trainer_name", ["MaPLeTPT", "PromptAlign"])
def test_load_epoch_picks_that_epochs_prompts_among_several(trainer_name, maple_run, tiny_data_root, deep_clip,
                                                            tmp_path):
    run = Path(shutil.copytree(maple_run, tmp_path / "maple", ignore=shutil.ignore_patterns("promptalign_*")))
    folder = run / CHECKPOINT_NAME
    checkpoint = torch.load(folder / "model.pth.tar-1", weights_only=False)
    first = checkpoint["state_dict"]["prompt_learner.ctx"].clone()
    checkpoint["state_dict"]["prompt_learner.ctx"] = first + 1.0
    checkpoint["epoch"] = 2
    torch.save(checkpoint, folder / "model.pth.tar-2")
    (folder / "checkpoint").write_text("model.pth.tar-2\n")  # the latest, as a second epoch's save leaves it
    trainer = build(tiny_data_root, deep_clip, tmp_path / "t", trainer_name)
    trainer.load_model(str(run), epoch=1)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), first)
    assert torch.equal(trainer.prompt_init_state["ctx"], first) and trainer.prompt_init.endswith("model.pth.tar-1")


def test_out_of_memory_names_the_classes_the_views_and_the_knobs(tiny_data_root, deep_clip, tmp_path):
    trainer = build(tiny_data_root, deep_clip, tmp_path, "MaPLeTPT")

    def too_big(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.view_loss = too_big
    trainer.prepare_for_test()
    with pytest.raises(UserError, match=r"^MaPLeTPT ran out of memory on cpu tuning MaPLe prompts for 6 classes on "
                                        r"8 views .* TRAINER.MAPLE_TPT.GRAD_CHECKPOINT True .* TRAINER.MAPLE_TPT"
                                        r".N_VIEWS \(now 8\)"):
        trainer.tune_and_predict(first_image_views(trainer))


@pytest.mark.parametrize("trainer_name", ["MaPLeTPT", "PromptAlign"])
def test_without_a_model_dir_every_image_starts_from_maples_initialisation(trainer_name, tiny_data_root, deep_clip,
                                                                           tmp_path):
    trainer = build(tiny_data_root, deep_clip, tmp_path, trainer_name)
    before = {k: v.clone() for k, v in trainer.prompt_init_state.items()}
    trainer.load_model("", epoch=3)  # whatever --load-epoch says: nothing is loaded
    assert trainer.prompt_init == "MaPLe's initialisation (no --model-dir)"
    for key, value in trainer.model.prompt_learner.named_parameters():
        assert torch.equal(value.detach(), before[key]) and torch.equal(trainer.prompt_init_state[key], before[key])


def test_a_depth_one_maple_checkpoint_loads_at_depth_one_and_is_refused_at_three(tiny_data_root, deep_clip,
                                                                                 tmp_path):
    out = tmp_path / "maple_depth1"
    maple = build_trainer(tiny_cfg(tiny_data_root, deep_clip, "MaPLe", ("OUTPUT_DIR", str(out), "SEED", "1",
                                                                        "TRAINER.MAPLE.PROMPT_DEPTH", "1")))
    maple.save_model(0, str(out))  # no deeper prompts in the checkpoint
    shallow = build(tiny_data_root, deep_clip, tmp_path / "a", "MaPLeTPT", *opts("MAPLE_TPT", "PROMPT_DEPTH", "1"))
    shallow.load_model(str(out), epoch=1)
    assert torch.equal(shallow.model.prompt_learner.ctx.detach(), maple.model.prompt_learner.ctx.detach())
    deep = build(tiny_data_root, deep_clip, tmp_path / "b", "MaPLeTPT")
    with pytest.raises(CheckpointError, match="depth 1 but TRAINER.MAPLE_TPT.PROMPT_DEPTH builds 3"):
        deep.load_model(str(out), epoch=1)


def test_a_maple_checkpoint_of_another_depth_is_refused_in_one_line(maple_run, tiny_data_root, deep_clip,
                                                                    tmp_path):
    trainer = build(tiny_data_root, deep_clip, tmp_path, "MaPLeTPT", *opts("MAPLE_TPT", "PROMPT_DEPTH", "2"))
    with pytest.raises(CheckpointError, match="depth 3 .* set TRAINER.MAPLE_TPT.PROMPT_DEPTH 3") as caught:
        trainer.load_model(str(maple_run), epoch=1)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("precision", ["fp16", "amp"])
@pytest.mark.parametrize("trainer_name", ["MaPLeTPT", "PromptAlign"])
def test_fp16_and_amp_are_finite_and_close_to_fp32(trainer_name, precision, tiny_data_root, deep_clip,
                                                   tmp_path):
    """Whole evaluations (a step per image) stay finite and close, and the first step's gradient points
    the same way. The evaluations run at a small lr: AdamW's first step moves every entry by about
    lr x sign(gradient), so at 5e-3 the signs of near-zero gradient entries (fp16 rounding) would
    decide much of the difference in this random tiny model."""
    node = {"MaPLeTPT": "MAPLE_TPT", "PromptAlign": "PROMPTALIGN"}[trainer_name]
    extra = (f"TRAINER.{node}.N_VIEWS", "8", f"TRAINER.{node}.LR", "1e-4")
    ref, ref_logits = run_in("fp32", tiny_data_root, deep_clip, tmp_path / "fp32", trainer_name, *extra)
    got, logits = run_in(precision, tiny_data_root, deep_clip, tmp_path / precision, trainer_name, *extra)
    assert torch.isfinite(logits).all()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in got.checkpoint_module.parameters())
    assert (logits - ref_logits).abs().max() <= 0.1 * ref_logits.abs().max()
    assert abs(got.test_result["metrics"]["accuracy"] - ref.test_result["metrics"]["accuracy"]) <= 10.0
    gradients = []
    for trainer in (ref, got):
        set_random_seed(3)
        views = first_image_views(trainer)
        trainer.reset()
        trainer.selected = None
        trainer.optim.zero_grad()
        with torch.enable_grad(), trainer.autocast():
            loss = trainer.view_loss(views)
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in trainer.checkpoint_module.parameters()]))
    assert torch.isfinite(gradients[1]).all()
    assert F.cosine_similarity(gradients[0], gradients[1], dim=0) > 0.95
