"""Configuration matrix: every documented switch of every trainer does what the docs say.

Each switch runs in the tiny world (tests/helpers.py: random tiny CLIP, TinyShapes, fp32 on
CPU, one epoch) and is checked against its DOCUMENTED effect (docs/method.md,
selftpt/config.py), not merely for running. Checks that only need evaluation reuse one trained
run per trainer (module-scoped fixtures, loaded as ``--eval-only --model-dir`` would).
Unknown choices and values out of range are refused before training, in one line naming the key.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import selftpt.views as views_module
import trainers  # noqa: F401  (registers the trainers)
import trainers.tpt as tpt_module
from selftpt.clip_loader import load_clip, tokenize
from selftpt.launch import main
from selftpt.prompt_learner import POSITIONS
from selftpt.templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT
from selftpt.toolbox import build_trainer, read_image, set_random_seed
from tests.helpers import first_batch, one_step_gradients, recorded_checkpoints, tiny_cfg, tiny_opts, train_step

S = "TRAINER.SELFTPT."
FAST = ("OPTIM.MAX_EPOCH", "1")


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def build(tiny_data_root, tiny_clip_path, tmp_path_factory):
    """build(trainer, *KEY VALUE) -> a fresh trainer (1 epoch, seeded before building)."""
    def _build(trainer: str, *opts, seed: int = 1):
        out = tmp_path_factory.mktemp(trainer.lower())
        set_random_seed(seed)
        cfg = tiny_cfg(tiny_data_root, tiny_clip_path, trainer,
                       ("OUTPUT_DIR", str(out), *FAST, "SEED", str(seed), *[str(o) for o in opts]))
        return build_trainer(cfg)
    return _build


@pytest.fixture(scope="module")
def fresh_clip(tiny_clip_path):
    """The tiny CLIP loaded independently of any trainer, for expected values."""
    return load_clip(str(tiny_clip_path), device="cpu", precision="fp32")


def record_calls(obj, name: str, record):
    """Wrap the bound method ``obj.name`` (instance attribute) to log ``record(args, kwargs, out)``."""
    original = getattr(obj, name)
    log = []

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        log.append(record(args, kwargs, out))
        return out

    setattr(obj, name, wrapper)
    return log


def summaries_of(trainer):
    """The dict every ``forward_backward`` returns (the training summary), batch by batch."""
    return record_calls(trainer, "forward_backward", lambda a, k, out: dict(out))


def encoded_prompts(model):
    """(prompt embeddings, token ids) of every call of the model's text encoder."""
    return record_calls(model.text_encoder, "forward",
                        lambda a, k, out: (a[0].detach().clone(), a[1].detach().clone()))


def text_feature_calls(model):
    """(position, normalize) of every ``PromptedCLIP.text_features`` call."""
    return record_calls(model, "text_features",
                        lambda a, k, out: ((a[0] if a else k.get("position")), k.get("normalize", True)))


class OptimizerSteps:
    """Context manager logging (optimiser class, lr) of every optimiser step taken inside it."""

    def __enter__(self):
        self.steps = []
        self.handle = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: self.steps.append((type(opt), opt.param_groups[0]["lr"])))
        return self.steps

    def __exit__(self, *exc):
        self.handle.remove()


def word_embeddings(learner, words: str) -> torch.Tensor:
    """(n_words, d) CLIP embeddings of the tokens of ``words`` (no SOS/EOT)."""
    tokens = tokenize(words, learner.context_length)
    eot = int(tokens.argmax())
    return learner.embed_tokens(tokens)[0, 1:eot]


def expected_prompt(learner, name: str, ctx: torch.Tensor, layout: str) -> torch.Tensor:
    """[SOS] + CoOp's layout of ``ctx`` around the class name + '.' + [EOT], built from scratch."""
    sos_period_eot = learner.embed_tokens(tokenize(".", learner.context_length))[0, :3]
    sos, tail = sos_period_eot[:1], sos_period_eot[1:]
    cls = word_embeddings(learner, name)
    half = ctx.shape[0] // 2
    body = {"end": [ctx, cls], "front": [cls, ctx], "middle": [ctx[:half], cls, ctx[half:]]}[layout]
    return torch.cat([sos, *body, tail])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


# ============================================================================== CoOp
@pytest.fixture(scope="module")
def coop_layouts(build):
    """One CoOp run per CLASS_TOKEN_POSITION (same seed, same random 4-token init)."""
    runs = {}
    for layout in POSITIONS:
        trainer = build("CoOp", "TRAINER.COOP.N_CTX", 4, "TRAINER.COOP.CLASS_TOKEN_POSITION", layout)
        init = trainer.model.prompt_learner.ctx.detach().clone()
        prompts = encoded_prompts(trainer.model)
        trainer.train()  # ends with test(): prepare_for_test encodes the final prompt
        runs[layout] = {"trainer": trainer, "init": init, "prompts": prompts}
    return runs


@pytest.mark.parametrize("layout", POSITIONS)
def test_coop_class_token_position_places_the_class_tokens(coop_layouts, layout):
    run = coop_layouts[layout]
    learner = run["trainer"].model.prompt_learner
    trained = learner.ctx.detach()
    assert learner.class_token_position == layout
    # first prompt encoded in training (initial context), last one at evaluation (trained context)
    for (prompts, tokens), ctx in ((run["prompts"][0], run["init"]), (run["prompts"][-1], trained)):
        assert prompts.shape[0] == tokens.shape[0] == learner.n_cls
        for i, name in enumerate(learner.classnames):
            want = expected_prompt(learner, name, ctx, layout)
            assert torch.equal(prompts[i, :len(want)], want), (layout, name)
            assert int(tokens[i].argmax()) == len(want) - 1  # the feature is read at this EOT
    others = [coop_layouts[o]["trainer"] for o in POSITIONS if o != layout]
    for other in others:  # the layout changes the features and what is learnt
        assert not torch.allclose(run["trainer"].eval_text_features, other.eval_text_features, atol=1e-4)
        assert not torch.allclose(trained, other.model.prompt_learner.ctx.detach())


def test_coop_csc_learns_one_context_per_class(build):
    trainer = build("CoOp", "TRAINER.COOP.N_CTX", 4, "TRAINER.COOP.CSC", True, "TEST.NO_TEST", True)
    learner = trainer.model.prompt_learner
    d = trainer.model.text_encoder.ln_final.weight.shape[0]
    assert learner.csc and learner.ctx.shape == (6, 4, d)
    before = learner.ctx.detach().clone()
    prompts = encoded_prompts(trainer.model)
    trainer.train()
    after = learner.ctx.detach()
    # class c's prompt carries class c's own context
    first, _ = prompts[0]
    for c, name in enumerate(learner.classnames):
        assert torch.equal(first[c, :8], expected_prompt(learner, name, before[c], "end")[:8])
    deltas = (after - before).flatten(1)  # (n_cls, n_ctx*d)
    assert (deltas.norm(dim=1) > 0).all()  # every class's context is trained...
    for a in range(6):  # ...by its own gradient: the classes' contexts diverge
        for b in range(a + 1, 6):
            assert not torch.allclose(deltas[a], deltas[b], atol=1e-7), (a, b)


def test_coop_csc_with_ctx_init_is_ignored_with_a_note(build, capsys):
    trainer = build("CoOp", "TRAINER.COOP.CSC", True, "TRAINER.COOP.CTX_INIT", "a photo of a", "TEST.NO_TEST", True)
    assert "CSC is ignored" in capsys.readouterr().out
    learner = trainer.model.prompt_learner
    assert not learner.csc and learner.ctx.shape == (4, learner.ctx.shape[-1])  # one shared context
    assert torch.equal(learner.ctx.detach(), word_embeddings(learner, "a photo of a"))
    trainer.train()
    prompts = learner().detach()  # every class renders the same context
    assert all(torch.equal(prompts[0, 1:5], prompts[c, 1:5]) for c in range(6))


@pytest.mark.parametrize("n_ctx", [2, 7])
def test_coop_n_ctx_without_ctx_init_is_a_random_context_of_that_many_tokens(build, n_ctx):
    trainer = build("CoOp", "TRAINER.COOP.N_CTX", n_ctx, "TRAINER.COOP.CTX_INIT", "", "TEST.NO_TEST", True)
    learner = trainer.model.prompt_learner
    ctx = learner.ctx.detach()
    assert ctx.shape == (n_ctx, 64) and learner.prompt_prefix == " ".join(["X"] * n_ctx)
    assert abs(ctx.mean().item()) < 0.01 and 0.014 < ctx.std().item() < 0.026  # N(0, 0.02^2), as CoOp
    tokens = learner.tokenized_prompts
    for i, name in enumerate(learner.classnames):  # [SOS] ctx*n name . [EOT]
        assert int(tokens[i].argmax()) == 1 + n_ctx + len(word_embeddings(learner, name)) + 1
    other = build("CoOp", "TRAINER.COOP.N_CTX", n_ctx, seed=2)
    assert not torch.allclose(ctx, other.model.prompt_learner.ctx.detach())  # random, seeded


def test_coop_prec_fp32_runs_everything_in_float32(build):
    trainer = build("CoOp", "TRAINER.COOP.PREC", "fp32", "TRAINER.COOP.N_CTX", 4)
    assert trainer.precision == "fp32" and trainer.scaler is None
    assert trainer.model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    trainer.train()
    assert trainer.eval_text_features.dtype == torch.float32
    images, _ = trainer.parse_batch_test(next(iter(trainer.test_loader)))
    with torch.no_grad():
        assert trainer.model_inference(images).dtype == torch.float32


# ============================================================================== Self-TPT
@pytest.fixture(scope="module")
def selftpt_run(build):
    """Self-TPT trained for one epoch with the defaults (CPT + GM, mlp head); checkpoints only."""
    trainer = build("SelfTPT", S + "TTA_STEPS", 3, "TEST.NO_TEST", True)
    trainer.train()
    return trainer.output_dir


@pytest.fixture(scope="module")
def selftpt_eval(build, selftpt_run):
    """selftpt_eval(*KEY VALUE) -> a Self-TPT trainer with these settings and the trained run loaded."""
    def _eval(*opts):
        trainer = build("SelfTPT", S + "TTA_STEPS", 3, *opts)
        trainer.load_model(selftpt_run, epoch=1)
        return trainer
    return _eval


def plain_text_features(trainer):
    """Classification features of the loaded (not adapted) prompt."""
    with torch.no_grad():
        return trainer.class_text_features()


@pytest.mark.parametrize("cls_view, position", [("single", "end"), ("single", "front"), ("single", "middle"),
                                                ("mean", "end")])
def test_selftpt_cls_view(selftpt_eval, cls_view, position):
    trainer = selftpt_eval(S + "CLS_VIEW", cls_view, S + "CLASS_TOKEN_POSITION", position, S + "TTA", False)
    trainer.prepare_for_test()
    with torch.no_grad():
        per_layout = {p: trainer.model.text_features(p) for p in POSITIONS}
    mean = F.normalize(torch.stack([per_layout[p] for p in POSITIONS]).mean(dim=0), dim=-1)
    expected = per_layout[position] if cls_view == "single" else mean
    assert torch.allclose(trainer.eval_text_features, expected, atol=1e-6)
    if cls_view == "mean":  # the mean is none of the layouts
        assert all(not torch.allclose(mean, f, atol=1e-4) for f in per_layout.values())
    # training classifies with the same view(s)
    calls = text_feature_calls(trainer.model)
    train_step(trainer, first_batch(trainer))
    classified = [pos for pos, normalize in calls if normalize]
    assert classified == ([position] if cls_view == "single" else list(POSITIONS))


@pytest.mark.parametrize("head", ["mlp", "linear", "none"])
def test_selftpt_head(build, head):
    trainer = build("SelfTPT", S + "HEAD", head, "TEST.NO_TEST", True)
    module, d = trainer.cpt.head, 64
    if head == "mlp":
        assert [type(m) for m in module] == [nn.Linear, nn.ReLU, nn.Linear]
        assert (module[0].in_features, module[0].out_features, module[2].out_features) == (d, d, d)
    elif head == "linear":
        assert type(module) is nn.Linear and (module.in_features, module.out_features) == (d, d)
    else:
        assert type(module) is nn.Identity
    has_params = head != "none"
    assert ("cpt_head" in trainer.get_model_names()) == has_params
    head_before = [p.detach().clone() for p in module.parameters()]
    trainer.train()
    out = Path(trainer.output_dir)
    assert (out / "prompt_learner" / "model.pth.tar-1").is_file()
    assert (out / "cpt_head").is_dir() == has_params  # checkpointed only with parameters
    assert all(not torch.equal(b, p.detach()) for b, p in zip(head_before, module.parameters()))  # trained
    reloaded = build("SelfTPT", S + "HEAD", head)  # eval-only reload: the checkpointed models fit
    reloaded.load_model(str(out), epoch=1)
    assert torch.equal(reloaded.model.prompt_learner.ctx, trainer.model.prompt_learner.ctx)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.cpt.head.parameters(), module.parameters()))
    # CPT features: head outputs, normalised; with "none", the normalised text features themselves
    indices = torch.arange(6)
    with torch.no_grad():
        z, labels = trainer.cpt.features(trainer.model, indices)
        raw = [trainer.model.text_features(v, indices=indices) for v in ("front", "middle", "end")]
        raw.append(F.normalize(trainer.cpt.handcrafted_features, dim=-1))
    plain = torch.cat(raw)
    assert z.shape == (24, d) and torch.equal(labels, torch.arange(6).repeat(4))
    assert torch.allclose(z, plain, atol=1e-6) == (head == "none")


def test_selftpt_use_cpt_false_drops_the_cpt_task_from_training(build):
    trainer = build("SelfTPT", S + "USE_CPT", False, S + "USE_GM", False, S + "TTA", False, "TEST.NO_TEST", True)
    ctx = trainer.model.prompt_learner.ctx
    batch = first_batch(trainer)
    images, labels = trainer.parse_batch_train(batch)
    logits = trainer.model.logits(trainer.model.encode_image(images), trainer.class_text_features())
    grad_ce = torch.autograd.grad(F.cross_entropy(logits, labels), ctx)[0]
    cpt_calls = record_calls(trainer.cpt, "loss", lambda a, k, out: out.item())
    summaries = summaries_of(trainer)
    head_before = [p.detach().clone() for p in trainer.cpt.head.parameters()]
    assert torch.allclose(one_step_gradients(trainer, batch)["ctx"], grad_ce, atol=1e-7)  # CE alone
    trainer.train()
    assert cpt_calls == []  # the CPT loss is never computed in stage 1
    assert all("loss_cpt" not in s and "loss_gm" not in s for s in summaries)
    assert all(s["loss"] == pytest.approx(s["loss_ce"], rel=1e-6) for s in summaries)
    assert all(torch.equal(b, p.detach()) for b, p in zip(head_before, trainer.cpt.head.parameters()))


@pytest.mark.parametrize("use_gm", [True, False])
def test_selftpt_use_gm(build, use_gm):
    trainer = build("SelfTPT", S + "USE_GM", use_gm, S + "GRAD_COS_FREQ", 1, "TEST.NO_TEST", True)
    summaries = summaries_of(trainer)
    trainer.train()
    assert len(summaries) == 6 and all("loss_cpt" in s and "grad_cos" in s for s in summaries)
    assert all(("loss_gm" in s) == use_gm for s in summaries)
    assert (trainer.grad_ema.value is not None) == use_gm
    for s in summaries:  # L = L_ce + LAMBDA_CPT L_cpt (+ LAMBDA_GM L_gm)
        assert s["loss"] == pytest.approx(s["loss_ce"] + s["loss_cpt"] + s.get("loss_gm", 0.0), rel=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_selftpt_tta(selftpt_eval, tta):
    trainer = selftpt_eval(S + "TTA", tta)
    trained_ctx = trainer.model.prompt_learner.ctx.detach().clone()
    with OptimizerSteps() as steps:
        trainer.prepare_for_test()
    assert torch.allclose(trainer.eval_text_features, plain_text_features(trainer), atol=1e-6) == (not tta)
    assert ("tta" in trainer.result_extra) == tta and len(steps) == (3 if tta else 0)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), trained_ctx)  # the trained prompt stays


@pytest.fixture(scope="module")
def tta_optim_runs(selftpt_eval):
    runs = {}
    for name in ("adamw", "adam", "sgd"):
        trainer = selftpt_eval(S + "TTA_OPTIM", name, S + "TTA_LR", 0.01)
        with OptimizerSteps() as steps:
            trainer.prepare_for_test()
        runs[name] = (steps, trainer.eval_text_features)
    return runs


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_selftpt_tta_optim(tta_optim_runs, name, cls):
    steps, feats = tta_optim_runs[name]
    assert steps == [(cls, 0.01)] * 3  # exactly this class (AdamW subclasses Adam), TTA_STEPS steps, TTA_LR
    for other, (_, other_feats) in tta_optim_runs.items():
        if other != name:
            assert not torch.allclose(feats, other_feats, atol=1e-6), (name, other)


@pytest.mark.parametrize("n_steps", [0, 3])
def test_selftpt_tta_steps(selftpt_eval, n_steps):
    trainer = selftpt_eval(S + "TTA_STEPS", n_steps)
    with OptimizerSteps() as steps:
        trainer.prepare_for_test()
    tta = trainer.result_extra["tta"]
    assert len(steps) == n_steps and tta["steps"] == n_steps
    unchanged = torch.allclose(trainer.eval_text_features, plain_text_features(trainer), atol=1e-6)
    assert unchanged == (n_steps == 0)  # 0 steps: the context is the trained one
    assert (tta["cpt_loss_after"] == tta["cpt_loss_before"]) == (n_steps == 0)


@pytest.mark.parametrize("views", [["front", "end"], ["middle", "handcrafted"], ["front", "middle", "end"],
                                   ["end", "handcrafted"]])
def test_selftpt_cpt_views(build, views):
    trainer = build("SelfTPT", S + "CPT_VIEWS", repr(views), S + "TTA_STEPS", 1, S + "USE_GM", False,
                    S + "GRAD_COS_FREQ", 0)
    assert trainer.cpt.views == views
    assert (trainer.cpt.handcrafted_features.numel() > 0) == ("handcrafted" in views)
    learnable = [v for v in views if v != "handcrafted"]
    calls = text_feature_calls(trainer.model)
    cpt_sizes = record_calls(trainer.cpt, "features", lambda a, k, out: (len(a[1]), out[0].shape[0]))
    train_step(trainer, first_batch(trainer))  # stage 1
    assert [p for p, normalize in calls if not normalize] == learnable
    n, rows = cpt_sizes[-1]
    assert rows == n * len(views)
    calls.clear()
    trainer.prepare_for_test()  # stage 2: one step + the before/after losses
    cpt_positions = [p for p, normalize in calls if not normalize]
    assert cpt_positions and set(cpt_positions) == set(learnable)
    assert cpt_positions[:len(learnable)] == learnable


@pytest.mark.parametrize("template", ["", "a drawing of a {}, a shape."])
def test_selftpt_handcrafted_template(build, fresh_clip, template):
    trainer = build("SelfTPT", S + "HANDCRAFTED_TEMPLATE", template)
    used = template or "a photo of a {}."  # "" = the dataset's template (TinyShapes: the default)
    assert trainer.cpt.template == used
    texts = [used.format(c) for c in trainer.classnames]
    with torch.no_grad():
        expected = fresh_clip.encode_text(tokenize(texts, fresh_clip.context_length)).float()
        other = fresh_clip.encode_text(tokenize([("a photo of a {}." if template else "a drawing of a {}, a shape.")
                                                 .format(c) for c in trainer.classnames],
                                                fresh_clip.context_length)).float()
    assert torch.allclose(trainer.cpt.handcrafted_features, expected, atol=1e-5)
    assert not torch.allclose(trainer.cpt.handcrafted_features, other, atol=1e-3)
    z, _ = trainer.cpt.features(trainer.model, torch.arange(6))  # the 4th view is those features
    with torch.no_grad():
        assert torch.allclose(z[18:], F.normalize(trainer.cpt.head(expected), dim=-1), atol=1e-5)


@pytest.mark.parametrize("use_gm", [True, False])
def test_selftpt_grad_checkpoint_gives_the_same_gradients(build, use_gm, monkeypatch):
    checkpointed = recorded_checkpoints(monkeypatch)
    grads = {}
    for flag in (False, True):
        trainer = build("SelfTPT", S + "GRAD_CHECKPOINT", flag, S + "USE_GM", use_gm, S + "GRAD_COS_FREQ", 1)
        assert trainer.model.text_encoder.grad_checkpoint == flag
        batch = first_batch(trainer)
        checkpointed.clear()
        grads[flag] = one_step_gradients(trainer, batch)  # with GM: double backward through recomputed blocks
        assert bool(checkpointed) == flag
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) > 1  # context + head
    for key in grads[False]:
        assert torch.allclose(grads[False][key], grads[True][key], atol=1e-7, rtol=1e-5), key


@pytest.mark.parametrize("max_classes", [3, 4, 64])
def test_selftpt_cpt_max_classes(build, max_classes):
    trainer = build("SelfTPT", S + "CPT_MAX_CLASSES", max_classes, S + "USE_GM", False, S + "GRAD_COS_FREQ", 0,
                    S + "TTA_STEPS", 1, "DATALOADER.TRAIN_X.BATCH_SIZE", 2, "TEST.NO_TEST", True)
    labels = record_calls(trainer, "parse_batch_train", lambda a, k, out: set(out[1].tolist()))
    classes = record_calls(trainer.cpt, "loss", lambda a, k, out: a[1].tolist())
    trainer.train()
    assert len(labels) == len(classes) == 24
    for batch_classes, cpt_classes in zip(labels, classes):  # stage 1: the batch's + others, that many
        assert len(cpt_classes) == len(set(cpt_classes)) == min(max_classes, 6)
        assert batch_classes <= set(cpt_classes)
    if max_classes < 6:  # the other classes are drawn at random
        assert len({tuple(c) for c in classes}) > 1
    classes.clear()
    trainer.prepare_for_test()  # stage 2: every class, in chunks of at most that many
    n_chunks = trainer.result_extra["tta"]["chunks_per_pass"]
    one_pass = classes[:n_chunks]
    assert sorted(c for chunk in one_pass for c in chunk) == list(range(6))
    assert all(len(chunk) <= max(2, max_classes) for chunk in one_pass)
    assert n_chunks == math.ceil(6 / max_classes)


@pytest.fixture(scope="module")
def selftpt_v(build):
    """Self-TPT-v (N_VIEWS 4) with each aggregation, same prompt; one batch of views."""
    runs = {}
    for mode in ("mean", "confident"):
        trainer = build("SelfTPT", S + "N_VIEWS", 4, S + "VIEW_AGGREGATION", mode, S + "SELECTION_P", 0.5,
                        S + "TTA", False)
        trainer.prepare_for_test()
        runs[mode] = trainer
    set_random_seed(5)
    images, _ = runs["mean"].parse_batch_test(next(iter(runs["mean"].test_loader)))
    return runs, images


@pytest.mark.parametrize("mode", ["mean", "confident"])
def test_selftpt_view_aggregation(selftpt_v, mode):
    runs, images = selftpt_v
    trainer = runs[mode]
    assert images.shape[1:] == (4, 3, 32, 32)
    with torch.no_grad():
        out = trainer.model_inference(images)
        feats = trainer.model.encode_image(images.flatten(0, 1))
        per_view = trainer.model.logits(feats, trainer.eval_text_features).view(images.shape[0], 4, -1)
    probs = per_view.softmax(-1)
    if mode == "mean":
        expected = probs.mean(dim=1).log()
    else:  # the int(4 * 0.5) = 2 lowest-entropy views
        keep = entropy(per_view).argsort(dim=1)[:, :2]
        expected = torch.stack([probs[b, keep[b]].mean(0) for b in range(len(keep))]).log()
    assert torch.allclose(out, expected, atol=1e-5)
    other = runs["confident" if mode == "mean" else "mean"]
    with torch.no_grad():
        assert not torch.allclose(out, other.model_inference(images), atol=1e-5)


@pytest.mark.parametrize("use_gm, freq, measured", [(False, 0, []), (False, 1, [0, 1, 2, 3, 4, 5]),
                                                    (False, 4, [0, 4]), (False, 10, [0]),
                                                    (True, 0, [0, 1, 2, 3, 4, 5])])
def test_selftpt_grad_cos_freq(build, use_gm, freq, measured):
    trainer = build("SelfTPT", S + "USE_GM", use_gm, S + "GRAD_COS_FREQ", freq, "TEST.NO_TEST", True)
    calls = record_calls(trainer, "gradient_alignment", lambda a, k, out: trainer.batch_idx)
    summaries = summaries_of(trainer)
    trainer.train()
    assert calls == measured
    assert [i for i, s in enumerate(summaries) if "grad_cos" in s] == measured
    assert len(trainer.result_extra["grad_cos_per_epoch"]) == (1 if measured else 0)


@pytest.mark.parametrize("key, value, reference, same", [
    ("LAMBDA_CPT", 0.0, (S + "USE_CPT", False, S + "TTA", False), True),  # no CPT term: CE's gradient
    ("LAMBDA_CPT", 1.0, (S + "USE_CPT", False, S + "TTA", False), False),
    ("LAMBDA_GM", 0.0, (S + "USE_GM", False), True),  # no GM term: CE + CPT's gradient
    ("LAMBDA_GM", 1.0, (S + "USE_GM", False), False),
])
def test_selftpt_lambda_zero_removes_the_term(build, key, value, reference, same):
    gm = ("LAMBDA_GM" == key)
    base = (S + "USE_GM", gm, S + "GRAD_COS_FREQ", 0)
    with_term = build("SelfTPT", *base, S + key, value)
    batch = first_batch(with_term)
    grad = one_step_gradients(with_term, batch)["ctx"]
    ref = one_step_gradients(build("SelfTPT", *base, *reference), batch)["ctx"]
    # (with USE_GM the CPT forward runs under the math attention kernel: rounding-level differences)
    difference = ((grad - ref).abs().max() / ref.abs().max()).item()
    assert difference < 1e-5 if same else difference > 1e-3


def test_selftpt_lambda_cpt_scales_the_cpt_gradient(build):
    base = (S + "USE_GM", False, S + "GRAD_COS_FREQ", 0)
    grads = {}
    for lam in (0.0, 0.5, 1.0):
        trainer = build("SelfTPT", *base, S + "LAMBDA_CPT", lam)
        grads[lam] = one_step_gradients(trainer, first_batch(trainer))["ctx"]
    assert torch.allclose(grads[0.5], (grads[0.0] + grads[1.0]) / 2, atol=1e-7, rtol=1e-5)


# ============================================================================== TPT
def tpt(build, *opts):
    trainer = build("TPT", *opts)
    trainer.prepare_for_test()
    return trainer


def views_of(trainer, index=0, seed=0):
    torch.manual_seed(seed)
    return trainer.views(read_image(trainer.dm.dataset.test[index].impath))


@pytest.mark.parametrize("n_views", [4, 16])
def test_tpt_n_views(build, n_views):
    trainer = tpt(build, "TRAINER.TPT.N_VIEWS", n_views)
    batch = next(iter(trainer.test_loader))
    assert batch["img"].shape == (1, n_views, 3, 32, 32) and trainer.result_extra["tpt_n_views"] == n_views
    seen = record_calls(trainer.model.image_encoder, "forward", lambda a, k, out: a[0].shape[0])
    images, _ = trainer.parse_batch_test(batch)
    with torch.no_grad():
        assert trainer.model_inference(images).shape == (1, 6)
    assert seen == [n_views]  # every view of the image goes through the encoder, once


@pytest.mark.parametrize("n_views, p, k", [(16, 0.1, 1), (16, 0.25, 4), (8, 0.5, 4), (4, 0.1, 1), (16, 1.0, 16)])
def test_tpt_selection_p(build, monkeypatch, n_views, p, k):
    trainer = tpt(build, "TRAINER.TPT.N_VIEWS", n_views, "TRAINER.TPT.SELECTION_P", p)
    assert trainer.result_extra["tpt_selected_views"] == k
    inputs = []
    original = tpt_module.marginal_entropy
    monkeypatch.setattr(tpt_module, "marginal_entropy",
                        lambda logits: inputs.append(logits.detach().clone()) or original(logits))
    views = views_of(trainer)
    with torch.no_grad():
        logits = trainer.model.logits(trainer.model.encode_image(views), trainer.model.text_features())
    trainer.tune_and_predict(views)
    assert len(inputs) == 1 and inputs[0].shape == (k, 6)
    lowest = entropy(logits).argsort()[:k]
    assert torch.allclose(inputs[0], logits[lowest], atol=1e-6)  # the k most confident views


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_tpt_steps(build, steps):
    trainer = tpt(build, "TRAINER.TPT.N_VIEWS", 8, "TRAINER.TPT.STEPS", steps)
    views = views_of(trainer)
    with torch.no_grad():
        untuned = trainer.model.logits(trainer.model.encode_image(views[:1]), trainer.model.text_features())
    with OptimizerSteps() as opt_steps:
        tuned = trainer.tune_and_predict(views)
    assert len(opt_steps) == steps
    assert torch.allclose(tuned, untuned, atol=1e-6) == (steps == 0)  # 0 steps: the untuned prompt's


@pytest.fixture(scope="module")
def tpt_lr_runs(build):
    runs = {}
    for lr in (1e-3, 1e-2):
        trainer = tpt(build, "TRAINER.TPT.N_VIEWS", 8, "TRAINER.TPT.LR", lr)
        ctx0 = trainer.model.prompt_learner.ctx.detach().clone()
        with OptimizerSteps() as steps:
            logits = trainer.tune_and_predict(views_of(trainer))
        runs[lr] = (steps, ctx0, trainer.model.prompt_learner.ctx.detach().clone(), logits)
    return runs


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_tpt_lr(tpt_lr_runs, lr):
    steps, ctx0, ctx1, logits = tpt_lr_runs[lr]
    assert steps == [(torch.optim.AdamW, lr)]
    # One AdamW step from fresh moments (torch defaults, weight decay 0.01):
    # ctx1 = ctx0 (1 - lr wd) - lr g / (|g| + eps): the largest move is lr itself
    move = (ctx0 * (1 - lr * 0.01) - ctx1) / lr
    assert move.abs().max().item() == pytest.approx(1.0, rel=1e-3)
    other = tpt_lr_runs[1e-2 if lr == 1e-3 else 1e-3][3]
    assert not torch.allclose(logits, other, atol=1e-6)


@pytest.mark.parametrize("setting, dataset, blended", [
    ("on", "TinyShapes", True), ("off", "TinyShapes", False), ("auto", "TinyShapes", True),
    ("auto", "ImageNet", False), ("auto", "ImageNetA", False), ("auto", "ImageNetSketch", False),
    ("on", "ImageNet", True), ("off", "ImageNet", False)])
def test_tpt_augmix(build, monkeypatch, setting, dataset, blended):
    trainer = build("TPT", "TRAINER.TPT.N_VIEWS", 6, "TRAINER.TPT.AUGMIX", setting)
    if dataset != "TinyShapes":  # the trainer's own wiring, for a dataset of that name
        trainer.cfg.defrost()
        trainer.cfg.DATASET.NAME = dataset
        trainer.custom_test_transform()
    trainer.prepare_for_test()
    assert trainer.result_extra["tpt_augmix"] == blended and trainer.views.augmix == blended
    blends = []
    original = views_module.augmix_blend
    monkeypatch.setattr(views_module, "augmix_blend", lambda *a, **k: blends.append(1) or original(*a, **k))
    image = read_image(trainer.dm.dataset.test[0].impath)
    views = views_of(trainer)
    assert len(blends) == (5 if blended else 0)
    torch.manual_seed(0)  # the same crops and flips, without AugMix
    plain = [trainer.views.clean_view(image)] + [trainer.views.preprocess(trainer.views.preaugment(image))]
    assert torch.equal(views[0], plain[0])  # the clean view is never blended
    assert torch.equal(views[1], plain[1]) == (not blended)


def test_tpt_grad_checkpoint_gives_the_same_tuning(build, monkeypatch):
    checkpointed = recorded_checkpoints(monkeypatch)
    out = {}
    for flag in (False, True):
        trainer = tpt(build, "TRAINER.TPT.N_VIEWS", 8, "TRAINER.TPT.STEPS", 2, "TRAINER.TPT.GRAD_CHECKPOINT", flag)
        assert trainer.model.text_encoder.grad_checkpoint == flag
        checkpointed.clear()
        logits = trainer.tune_and_predict(views_of(trainer))
        assert bool(checkpointed) == flag
        out[flag] = (logits, trainer.model.prompt_learner.ctx.detach().clone())
    assert torch.allclose(out[False][0], out[True][0], atol=1e-5)
    assert torch.allclose(out[False][1], out[True][1], atol=1e-6)


# ============================================================================== CoCoOp
@pytest.mark.parametrize("n_ctx", [2, 5])
def test_cocoop_n_ctx(build, n_ctx):
    trainer = build("CoCoOp", "TRAINER.COCOOP.N_CTX", n_ctx, "TRAINER.COCOOP.CTX_INIT", "", "TEST.NO_TEST", True)
    learner = trainer.model.prompt_learner
    ctx0 = learner.ctx.detach().clone()
    meta0 = [p.detach().clone() for p in learner.meta_net.parameters()]
    assert ctx0.shape == (n_ctx, 64) and 0.012 < ctx0.std().item() < 0.028  # random N(0, 0.02^2)
    feats = torch.randn(3, 64)
    assert learner.conditional_context(feats).shape == (3, n_ctx, 64)
    prompts = encoded_prompts(trainer.model)
    trainer.train()
    tokens = prompts[0][1]
    for i, name in enumerate(learner.classnames):
        assert int(tokens[i].argmax()) == 1 + n_ctx + len(word_embeddings(learner, name)) + 1
    assert not torch.equal(ctx0, learner.ctx.detach())  # context and meta-net are trained
    assert all(not torch.equal(a, b.detach()) for a, b in zip(meta0, learner.meta_net.parameters()))


@pytest.mark.parametrize("ctx_init", ["a photo of a", "a drawing of"])
def test_cocoop_ctx_init(build, ctx_init):
    trainer = build("CoCoOp", "TRAINER.COCOOP.CTX_INIT", ctx_init, "TRAINER.COCOOP.N_CTX", 16)
    learner = trainer.model.prompt_learner
    n_words = len(ctx_init.split())
    assert learner.n_ctx == n_words and learner.prompt_prefix == ctx_init  # N_CTX is ignored
    assert torch.equal(learner.ctx.detach(), word_embeddings(learner, ctx_init))
    with torch.no_grad():  # the shared context renders as the literal sentence
        prompts = learner()
        for i, name in enumerate(learner.classnames):
            sentence = learner.embed_tokens(tokenize(f"{ctx_init} {name}.", learner.context_length))[0]
            assert torch.equal(prompts[i], sentence)


# ============================================================================== ZeroshotCLIP2
@pytest.mark.parametrize("ensemble, templates", [
    ("coop_select", [*IMAGENET_TEMPLATES_SELECT, "a photo of a {}."]), ("clip80", list(IMAGENET_TEMPLATES))])
def test_zeroshotclip2_ensemble(build, fresh_clip, ensemble, templates):
    trainer = build("ZeroshotCLIP2", "TRAINER.ZSCLIP.ENSEMBLE", ensemble)
    trainer.prepare_for_test()
    assert trainer.templates == templates
    assert trainer.result_extra == {"prompt_ensemble": ensemble, "num_templates": len(templates)}
    with torch.no_grad():
        per_template = [F.normalize(fresh_clip.encode_text(tokenize([t.format(c) for c in trainer.classnames],
                                                                    fresh_clip.context_length)), dim=-1)
                        for t in templates]
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    assert torch.allclose(trainer.text_features.float(), expected, atol=1e-5)
    assert all(not torch.allclose(expected, f, atol=1e-4) for f in per_template[:3])  # not one template


# ============================================================================== refusals
REFUSALS = [
    pytest.param("CoOp", ("TRAINER.COOP.PREC", "fp8"), id="coop-prec"),
    pytest.param("CoOp", ("TRAINER.COOP.CLASS_TOKEN_POSITION", "side"), id="coop-position"),
    pytest.param("CoOp", ("TRAINER.COOP.N_CTX", 40), id="coop-n-ctx-longer-than-the-context"),
    pytest.param("CoCoOp", ("TRAINER.COCOOP.N_CTX", 0), id="cocoop-n-ctx-zero"),
    pytest.param("SelfTPT", (S + "CLS_VIEW", "max"), id="selftpt-cls-view"),
    pytest.param("SelfTPT", (S + "TTA_OPTIM", "AdamW"), id="selftpt-tta-optim"),
    pytest.param("SelfTPT", (S + "USE_GM", True, S + "USE_CPT", False), id="selftpt-gm-without-cpt"),
    pytest.param("SelfTPT", (S + "CLASS_TOKEN_POSITION", "side"), id="selftpt-position"),
    pytest.param("SelfTPT", (S + "HEAD", "deep"), id="selftpt-head"),
    pytest.param("SelfTPT", (S + "CPT_VIEWS", "['end']"), id="selftpt-one-view"),
    pytest.param("SelfTPT", (S + "CPT_VIEWS", "['end', 'end']"), id="selftpt-duplicate-views"),
    pytest.param("SelfTPT", (S + "CPT_VIEWS", "['end', 'side']"), id="selftpt-unknown-view"),
    pytest.param("SelfTPT", (S + "VIEW_AGGREGATION", "median", S + "N_VIEWS", 4), id="selftpt-aggregation"),
    pytest.param("SelfTPT", (S + "VIEW_AGGREGATION", "median"), id="selftpt-aggregation-one-view"),
    pytest.param("SelfTPT", (S + "AUGMIX", "maybe"), id="selftpt-augmix"),
    pytest.param("SelfTPT", (S + "HANDCRAFTED_TEMPLATE", "a photo of a thing."), id="selftpt-template-no-slot"),
    pytest.param("SelfTPT", (S + "HANDCRAFTED_TEMPLATE", "a {} of a {}."), id="selftpt-template-two-slots"),
    pytest.param("SelfTPT", (S + "USE_CPT", False, S + "USE_GM", False), id="selftpt-tta-without-cpt"),
    pytest.param("TPT", ("TRAINER.TPT.AUGMIX", "maybe"), id="tpt-augmix"),
    pytest.param("TPT", ("TRAINER.TPT.SELECTION_P", 0.0), id="tpt-selection-p-zero"),
    pytest.param("TPT", ("TRAINER.TPT.SELECTION_P", 1.5), id="tpt-selection-p-above-one"),
    pytest.param("TPT", ("TRAINER.TPT.STEPS", -1), id="tpt-steps-negative"),
    pytest.param("ZeroshotCLIP2", ("TRAINER.ZSCLIP.ENSEMBLE", "clip81"), id="zsclip2-ensemble"),
]


@pytest.mark.parametrize("trainer, opts", REFUSALS)
def test_bad_value_is_refused_in_one_line_before_training(tiny_data_root, tiny_clip_path, tmp_path, capsys,
                                                          trainer, opts):
    out = tmp_path / "run"
    code = main(["--output-dir", str(out), "--seed", "1", *tiny_opts(tiny_data_root, tiny_clip_path, trainer),
                 *FAST, S + "TTA_STEPS", "1", *[str(o) for o in opts]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and opts[0] in err[0]
    assert not (out / "prompt_learner").exists() and not (out / "results.json").exists()  # nothing ran
