"""Objective-direction tests: each method optimises the objective its docs state, in the right direction.

On a fixed batch of the tiny random world (tiny CLIP, TinyShapes) these tests rebuild each
documented objective in the test from the trainer's own modules and compare it, or its
gradient, with what the trainer computes and applies (docs/method.md):

- Self-TPT stage 1: ``L = L_ce + LAMBDA_CPT * L_cpt + LAMBDA_GM * L_gm``,
  ``L_gm = 1 - cos(grad_ctx L_cpt, EMA(grad_ctx L_ce))`` (double backward);
- CPT: the supervised contrastive loss at ``TEMPERATURE`` over the configured views;
- TPT: one step lowers the marginal entropy of the confident views, the clean view is
  predicted with the tuned prompt, the prompt and optimiser are reset per image;
- Self-TPT-v: the ensemble of the views' predictions;
- CoOp / CoCoOp: the optimiser steps along minus the cross-entropy gradient;
- CoOp's prompt layouts with an odd number of context tokens.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import trainers  # noqa: F401  (registers the trainers)
import trainers.selftpt as selftpt_module
import trainers.tpt as tpt_module
from selftpt.clip_loader import load_clip, token_count, tokenize
from selftpt.cpt import HANDCRAFTED
from selftpt.losses import ensemble_views, supervised_contrastive_loss
from selftpt.prompt_learner import POSITIONS, PromptLearner
from selftpt.toolbox import build_trainer
from tests.helpers import tiny_cfg

# Classes of the CPT term in the Self-TPT tests (the sampler is replaced by this choice).
CPT_CLASSES = torch.tensor([0, 2, 3, 5])
# A template unlike the default context "a photo of a": with CTX_INIT "a photo of a" and the
# default template "a photo of a {}.", the untrained end view equals the hand-crafted one.
TEMPLATE = "a drawing of a {}."
EOT_TOKEN = 49407


# ---------------------------------------------------------------------------------- helpers
def make_trainer(kind: str, root, clip_path, tmp_path, *opts):
    """A trainer of ``kind`` on the tiny world (fp32, CPU), seed 1, extra ``KEY VALUE`` options;
    the global generator is reseeded first, so random initialisations do not depend on test order."""
    torch.manual_seed(0)
    cfg = tiny_cfg(root, clip_path, kind, ("OUTPUT_DIR", str(tmp_path / kind), "SEED", "1", *opts))
    return build_trainer(cfg)


def fixed_train_batch(trainer, seed: int = 0):
    """One training batch (drawn reproducibly) and its (images, labels); marks it a mid-epoch
    batch so that ``forward_backward`` leaves the learning rate alone."""
    torch.manual_seed(seed)
    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, 99
    return batch, trainer.parse_batch_train(batch)


def set_node(trainer, **values) -> None:
    """Change keys of the trainer's ``TRAINER.<NODE>`` config node after the build."""
    trainer.cfg.defrost()
    for key, value in values.items():
        trainer.node[key] = value
    trainer.cfg.freeze()


def record_optimiser_steps(trainer, monkeypatch) -> dict[str, list[list[torch.Tensor]]]:
    """Wrap every registered optimiser's ``step``: record the gradients it is about to apply."""
    seen: dict[str, list[list[torch.Tensor]]] = {}
    for name in trainer.get_model_names():
        optim = trainer._optims[name]
        if optim is None:
            continue
        original = optim.step

        def step(*args, _name=name, _optim=optim, _original=original, **kwargs):
            grads = [p.grad.detach().clone() for group in _optim.param_groups for p in group["params"]]
            seen.setdefault(_name, []).append(grads)
            return _original(*args, **kwargs)

        monkeypatch.setattr(optim, "step", step)
    return seen


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def cross_entropy_loss(trainer, images, labels, ctx=None) -> torch.Tensor:
    """Self-TPT's L_ce: cross-entropy of ``logit_scale * img @ txt.T`` in the classification layout."""
    model = trainer.model
    with torch.no_grad():
        image_features = F.normalize(model.image_encoder(images), dim=-1)
    text = F.normalize(model.text_features(trainer.node.CLASS_TOKEN_POSITION, ctx=ctx, normalize=False), dim=-1)
    return F.cross_entropy(model.logit_scale.exp() * image_features @ text.t(), labels)


def handcrafted_features(trainer, indices: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features of ``TEMPLATE.format(class name)``, encoded here."""
    learner = trainer.model.prompt_learner
    texts = [trainer.node.HANDCRAFTED_TEMPLATE.format(learner.classnames[i]) for i in indices.tolist()]
    tokens = tokenize(texts, learner.context_length)
    with torch.no_grad():
        return trainer.model.text_encoder(learner.embed_tokens(tokens), tokens).float()


def view_features(trainer, indices: torch.Tensor, ctx=None, views=None) -> dict[str, torch.Tensor]:
    """Per CPT view (default: the configured ones): normalised head outputs (n, D) of ``indices``."""
    out = {}
    for view in views or trainer.node.CPT_VIEWS:
        if view == HANDCRAFTED:
            raw = handcrafted_features(trainer, indices)
        else:
            raw = trainer.model.text_features(view, ctx=ctx, indices=indices, normalize=False).float()
        out[view] = F.normalize(trainer.cpt.head(raw), dim=-1)
    return out


def cpt_loss(trainer, indices: torch.Tensor, temperature: float, ctx=None, views=None) -> torch.Tensor:
    """L_cpt rebuilt in the test: supervised contrastive loss over the views of ``indices``."""
    feats = view_features(trainer, indices, ctx, views)
    z = torch.cat(list(feats.values()))
    labels = torch.arange(len(indices)).repeat(len(feats))
    return supervised_contrastive_loss(z, labels, temperature)


def cpt_alignment(trainer, ctx, target: torch.Tensor) -> float:
    """cos(grad_ctx L_cpt at context ``ctx``, ``target``) on the fixed CPT classes."""
    ctx = ctx.detach().clone().requires_grad_(True)
    g_cpt = torch.autograd.grad(cpt_loss(trainer, CPT_CLASSES, trainer.node.TEMPERATURE, ctx), ctx)[0]
    return F.cosine_similarity(g_cpt.flatten(), target.flatten(), dim=0).item()


def fix_cpt_classes(monkeypatch) -> list:
    """Replace the stage-1 class sampler by ``CPT_CLASSES``; returns the recorded calls."""
    calls = []

    def sample(required, n_cls, max_classes, generator=None):
        calls.append(required.detach().cpu().clone())
        return CPT_CLASSES.clone()

    monkeypatch.setattr(selftpt_module, "sample_classes", sample)
    return calls


def selftpt_trainer(root, clip_path, tmp_path, *opts):
    return make_trainer("SelfTPT", root, clip_path, tmp_path, "TRAINER.SELFTPT.HANDCRAFTED_TEMPLATE", TEMPLATE,
                        "TRAINER.SELFTPT.TEMPERATURE", "0.2", *opts)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Elementwise agreement to ``rel`` of the expected tensor's largest entry."""
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# ----------------------------------------------------------------------- Self-TPT stage 1
@pytest.mark.parametrize("seeded_ema", [False, True], ids=["first-step-ema", "running-ema"])
def test_selftpt_step_applies_the_gradient_of_the_documented_loss(seeded_ema, tiny_data_root, tiny_clip_path,
                                                                   tmp_path, monkeypatch):
    """The gradient one ``forward_backward`` hands to the optimisers (context and CPT head) is
    that of ``L_ce + LAMBDA_CPT * L_cpt + LAMBDA_GM * (1 - cos(grad L_cpt, EMA(grad L_ce)))``
    rebuilt here, with unequal lambdas (a swapped, dropped or negated term changes it) and,
    in ``running-ema``, an EMA whose previous value points elsewhere (raw grad L_ce differs)."""
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.LAMBDA_CPT", "0.7",
                              "TRAINER.SELFTPT.LAMBDA_GM", "1.3")
    node = trainer.node
    calls = fix_cpt_classes(monkeypatch)
    batch, (images, labels) = fixed_train_batch(trainer)
    ctx = trainer.model.prompt_learner.ctx
    head = trainable(trainer.cpt.head)
    assert head, "the CPT head is trained in stage 1"

    l_ce = cross_entropy_loss(trainer, images, labels)
    with sdpa_kernel(SDPBackend.MATH):  # double backward needs the math attention kernel
        l_cpt = cpt_loss(trainer, CPT_CLASSES, node.TEMPERATURE)
        g_ce = torch.autograd.grad(l_ce, ctx, retain_graph=True)[0]
        g_cpt = torch.autograd.grad(l_cpt, ctx, retain_graph=True, create_graph=True)[0]
        ema = g_ce
        if seeded_ema:
            previous = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(3))
            previous = previous * (g_ce.norm() / previous.norm())
            trainer.grad_ema.value = previous.clone()
            ema = node.GM_EMA * previous + (1.0 - node.GM_EMA) * g_ce
        l_gm = 1.0 - F.cosine_similarity(g_cpt.flatten(), ema.flatten(), dim=0)
        total = l_ce + node.LAMBDA_CPT * l_cpt + node.LAMBDA_GM * l_gm
        expected = torch.autograd.grad(total, [ctx, *head], retain_graph=True)
        # every term moves the context: a dropped one would be seen
        for term in (l_ce, node.LAMBDA_CPT * l_cpt, node.LAMBDA_GM * l_gm):
            part = torch.autograd.grad(term, ctx, retain_graph=True)[0]
            assert part.norm() > 1e-2 * expected[0].norm()

    with torch.no_grad():
        text = trainer.model.text_features(node.CLASS_TOKEN_POSITION)
        predicted = (trainer.model.encode_image(images) @ text.t()).argmax(dim=1)
    accuracy = 100.0 * (predicted == labels).float().mean().item()
    steps = record_optimiser_steps(trainer, monkeypatch)
    summary = trainer.forward_backward(batch)
    # the training log: each term before the step, and the batch accuracy in percent
    assert summary["loss_ce"] == pytest.approx(l_ce.item(), rel=1e-5)
    assert summary["loss_cpt"] == pytest.approx(l_cpt.item(), rel=1e-5)
    assert summary["acc"] == pytest.approx(accuracy)
    assert len(calls) == 1 and set(calls[0].tolist()) == set(labels.tolist())  # sampled around the batch's classes
    (ctx_grad,), = steps["prompt_learner"]
    head_grads, = steps["cpt_head"]
    assert_close(ctx_grad, expected[0])
    for got, want in zip(head_grads, expected[1:]):
        assert_close(got, want)
    assert summary["loss_gm"] == pytest.approx(l_gm.item(), rel=1e-4, abs=1e-6)
    assert summary["loss"] == pytest.approx(total.item(), rel=1e-5)


def test_the_gm_part_of_a_step_raises_gradient_alignment(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    """Sign of L_gm in a real step: two trainers from one state take a step on one batch, one
    with LAMBDA_GM 1.3 and one with 0; their difference is the GM-only update. It descends
    L_gm (first order), and a small move of the context along it raises the cosine between
    grad L_cpt and the step's CE gradient (the EMA target, fixed during the step), a move
    against it lowers it. (The cosine with a *recomputed* CE gradient is no such invariant:
    the CE gradient turns too, and L_gm does not differentiate through it.)"""
    fix_cpt_classes(monkeypatch)
    a = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path / "a", "TRAINER.SELFTPT.LAMBDA_GM", "1.3")
    b = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path / "b", "TRAINER.SELFTPT.LAMBDA_GM", "0.0")
    b.model.prompt_learner.load_state_dict(a.model.prompt_learner.state_dict())
    b.cpt.head.load_state_dict(a.cpt.head.state_dict())
    head0 = {k: v.clone() for k, v in a.cpt.head.state_dict().items()}
    ctx0 = a.model.prompt_learner.ctx.detach().clone()
    batch, (images, labels) = fixed_train_batch(a)
    b.batch_idx, b.num_batches = a.batch_idx, a.num_batches
    a.forward_backward(batch)
    b.forward_backward(batch)
    gm_update = a.model.prompt_learner.ctx.detach() - b.model.prompt_learner.ctx.detach()
    assert gm_update.norm() > 0

    b.cpt.head.load_state_dict(head0)  # measure every point with the initial head
    with sdpa_kernel(SDPBackend.MATH):
        ctx = ctx0.clone().requires_grad_(True)
        g_ce = torch.autograd.grad(cross_entropy_loss(b, images, labels, ctx), ctx)[0]
        g_cpt = torch.autograd.grad(cpt_loss(b, CPT_CLASSES, b.node.TEMPERATURE, ctx), ctx, create_graph=True)[0]
        l_gm = 1.0 - F.cosine_similarity(g_cpt.flatten(), g_ce.flatten(), dim=0)
        grad_gm = torch.autograd.grad(l_gm, ctx)[0]
    assert (gm_update * grad_gm).sum() < 0  # the GM update descends L_gm
    move = gm_update / gm_update.norm() * 1e-3
    before = cpt_alignment(b, ctx0, g_ce)
    assert cpt_alignment(b, ctx0 + move, g_ce) > before > cpt_alignment(b, ctx0 - move, g_ce)


# ------------------------------------------------------------------------------------ CPT
@pytest.mark.parametrize("temperature, views", [
    ("0.07", ["front", "middle", "end", "handcrafted"]),
    ("0.5", ["front", "middle", "end", "handcrafted"]),
    ("0.5", ["front", "handcrafted"]),
    ("0.3", ["end", "middle"]),
])
def test_cpt_loss_is_supcon_at_the_configured_temperature_over_the_configured_views(
        temperature, views, tiny_data_root, tiny_clip_path, tmp_path):
    """``trainer.cpt.loss`` (what stage 1 and stage 2 call) equals the supervised contrastive
    loss, rebuilt here, at TEMPERATURE over exactly the CPT_VIEWS; the reference itself
    depends on both (another temperature or the four views give another value)."""
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.TEMPERATURE", temperature,
                              "TRAINER.SELFTPT.CPT_VIEWS", str(views))
    tau = float(temperature)
    with torch.no_grad():
        expected = cpt_loss(trainer, CPT_CLASSES, tau)
        got = trainer.cpt.loss(trainer.model, CPT_CLASSES)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        other_tau = cpt_loss(trainer, CPT_CLASSES, 0.07 if tau != 0.07 else 0.5)
        assert abs(other_tau.item() - expected.item()) > 1e-3 * abs(expected.item())
        if len(views) < 4:
            all_views = cpt_loss(trainer, CPT_CLASSES, tau, views=["front", "middle", "end", "handcrafted"])
            assert abs(all_views.item() - expected.item()) > 1e-3 * abs(expected.item())


def test_the_four_cpt_views_are_distinct_renderings_of_each_class(tiny_data_root, tiny_clip_path, tmp_path):
    """The trainer's CPT features, split per view, are each view's features rebuilt here
    (front/middle/end layouts of the shared context, hand-crafted template), and no two views
    coincide."""
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path)
    with torch.no_grad():
        z, labels = trainer.cpt.features(trainer.model, CPT_CLASSES)
        expected = view_features(trainer, CPT_CLASSES)
    n = len(CPT_CLASSES)
    assert trainer.cpt.views == list(expected)
    assert torch.equal(labels, torch.arange(n).repeat(len(expected)))
    for i, view in enumerate(expected):
        assert_close(z[i * n:(i + 1) * n], expected[view], rel=1e-5)
    for a, b in itertools.combinations(expected, 2):
        assert (expected[a] - expected[b]).abs().max() > 1e-3, (a, b)


# ------------------------------------------------------------------------------------ TPT
def marginal_entropy_here(logits: torch.Tensor) -> float:
    """Entropy of the mean softmax over rows, computed directly."""
    p = logits.float().softmax(-1).mean(0)
    return -(p * p.log()).sum().item()


def test_tpt_lowers_the_confident_views_marginal_entropy_and_predicts_the_clean_view(
        tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    """One TPT image: the loss is taken on the int(N * SELECTION_P) lowest-entropy views
    (under the initial prompt); the step lowers their marginal entropy; the prediction is the
    clean view (view 0) under the tuned prompt. The next image starts from the initial
    context and fresh optimiser moments (tuning it after another image = tuning it alone)."""
    trainer = make_trainer("TPT", tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.TPT.N_VIEWS", "16",
                           "TRAINER.TPT.SELECTION_P", "0.25")
    trainer.prepare_for_test()
    model = trainer.model
    seen = []
    original = tpt_module.marginal_entropy
    monkeypatch.setattr(tpt_module, "marginal_entropy", lambda logits: seen.append(
        (logits.detach().clone(), model.prompt_learner.ctx.detach().clone())) or original(logits))
    torch.manual_seed(0)
    loader = iter(trainer.test_loader)
    first, second = next(loader)["img"], next(loader)["img"]
    assert first.shape == (1, 16, 3, 32, 32)
    ctx0 = model.prompt_learner.ctx.detach().clone()

    with torch.no_grad():
        feats = model.encode_image(first[0])
        logits0 = model.logits(feats, model.text_features(ctx=ctx0))
        entropy = -(logits0.softmax(-1) * logits0.log_softmax(-1)).sum(-1)
        keep = torch.argsort(entropy)[:int(16 * 0.25)]
        prediction = trainer.model_inference(first)
        ctx1 = model.prompt_learner.ctx.detach().clone()
        logits1 = model.logits(feats, model.text_features(ctx=ctx1))
    assert len(seen) == 1
    selected_logits, ctx_at_loss = seen[0]
    assert torch.equal(ctx_at_loss, ctx0)
    torch.testing.assert_close(selected_logits, logits0[keep], rtol=1e-5, atol=1e-5)
    assert not torch.equal(ctx1, ctx0)
    assert marginal_entropy_here(logits1[keep]) < marginal_entropy_here(logits0[keep])
    torch.testing.assert_close(prediction, logits1[:1], rtol=1e-5, atol=1e-5)
    assert (prediction - logits0[:1]).abs().max() > 1e-4  # the tuned prompt, not the initial one
    assert (logits1[1:] - prediction).abs().amax(dim=-1).min() > 1e-4  # not another view

    with torch.no_grad():
        trainer.model_inference(second)
        ctx_after_two = model.prompt_learner.ctx.detach().clone()
        trainer.model_inference(second)
    assert torch.equal(seen[1][1], ctx0)  # the second image starts from the initial context
    torch.testing.assert_close(model.prompt_learner.ctx.detach(), ctx_after_two, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Self-TPT-v
def ensemble_here(logits: torch.Tensor, mode: str, fraction: float) -> torch.Tensor:
    """log of the mean softmax over all views (mean) or over the int(V * fraction) lowest-entropy ones."""
    probs = logits.softmax(-1)
    if mode == "confident":
        entropy = -(probs * logits.log_softmax(-1)).sum(-1)  # (B, V)
        keep = torch.argsort(entropy, dim=1)[:, :int(logits.shape[1] * fraction)]
        probs = torch.gather(probs, 1, keep[..., None].expand(-1, -1, probs.shape[-1]))
    return probs.mean(1).log()


def test_selftpt_v_returns_the_view_ensemble(tiny_data_root, tiny_clip_path, tmp_path):
    """Self-TPT-v on (B, V, 3, H, W): for each VIEW_AGGREGATION the output is the ensemble
    (rebuilt here, and ``ensemble_views``) of the views' logits against the prompt's text
    features; mean and confident differ, and neither is the clean view's prediction."""
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.N_VIEWS", "8",
                              "TRAINER.SELFTPT.SELECTION_P", "0.25", "TRAINER.SELFTPT.TTA", "False",
                              "DATALOADER.TEST.BATCH_SIZE", "4")
    trainer.prepare_for_test()
    torch.manual_seed(0)
    images = next(iter(trainer.test_loader))["img"]
    assert images.shape == (4, 8, 3, 32, 32)
    model = trainer.model
    outputs = {}
    with torch.no_grad():
        feats = model.encode_image(images.flatten(0, 1))
        logits = model.logits(feats, model.text_features()).view(4, 8, -1)
        for mode in ("mean", "confident"):
            set_node(trainer, VIEW_AGGREGATION=mode)
            outputs[mode] = trainer.model_inference(images)
            expected = ensemble_here(logits, mode, 0.25)
            torch.testing.assert_close(outputs[mode], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outputs[mode], ensemble_views(logits, mode, 0.25), rtol=1e-5, atol=1e-5)
    clean = logits[:, 0].log_softmax(-1)
    assert (outputs["mean"] - outputs["confident"]).abs().max() > 1e-3
    for out in outputs.values():
        assert (out - clean).abs().max() > 1e-3


# ---------------------------------------------------------------------------- CoOp, CoCoOp
@pytest.mark.parametrize("kind, opts", [("CoOp", ("TRAINER.COOP.N_CTX", "4")),
                                        ("CoCoOp", ("TRAINER.COCOOP.N_CTX", "4"))])
def test_one_training_step_is_an_sgd_step_on_the_cross_entropy(kind, opts, tiny_data_root, tiny_clip_path,
                                                               tmp_path):
    """One ``forward_backward`` moves every trained tensor (context; CoCoOp's meta-net too) by
    Dassl's first SGD step, ``-LR * (grad CE + WEIGHT_DECAY * p)`` (momentum buffer starts as
    the gradient), with the CE gradient of the same batch computed here."""
    trainer = make_trainer(kind, tiny_data_root, tiny_clip_path, tmp_path, *opts)
    optim_cfg = trainer.cfg.OPTIM
    assert optim_cfg.NAME == "sgd" and not optim_cfg.SGD_NESTEROV and optim_cfg.SGD_DAMPNING == 0
    batch, (images, labels) = fixed_train_batch(trainer)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert "prompt_learner.ctx" in params
    assert kind == "CoOp" or any(n.startswith("prompt_learner.meta_net") for n in params)
    logits = trainer.model(images)
    loss = F.cross_entropy(logits, labels)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    unused = [n for n, g in grads.items() if g is None or not g.abs().max() > 0]
    assert not unused, f"the cross-entropy does not reach {unused}"
    before = {n: p.detach().clone() for n, p in params.items()}
    summary = trainer.forward_backward(batch)
    # what the training log shows: the batch's CE before the step and its accuracy in percent
    assert summary["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert summary["acc"] == pytest.approx(100.0 * (logits.argmax(dim=1) == labels).float().mean().item())
    for name, p in params.items():
        update = p.detach() - before[name]
        expected = -optim_cfg.LR * (grads[name] + optim_cfg.WEIGHT_DECAY * before[name])
        assert_close(update, expected, rel=1e-3)
        assert (update * grads[name]).sum() < 0, name  # downhill on the CE


# ------------------------------------------------------------------------- prompt layouts
@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_path):
    return load_clip(str(tiny_clip_path), precision="fp32")


@pytest.mark.parametrize("n_ctx", [1, 3, 5])
@pytest.mark.parametrize("position", POSITIONS)
def test_odd_context_lengths_render_coops_layouts(n_ctx, position, tiny_clip):
    """With M odd: [SOS] then, per layout, ctx + CLASS (end), ctx_1..ctx_floor(M/2) + CLASS +
    the rest (middle), CLASS + ctx (front), then ". [EOS] pad" — each context vector exactly
    once, the class tokens where CoOp puts them, the EOT at the tokenizer's position."""
    names = ["red square", "purple circle", "a rather long class name"]
    torch.manual_seed(n_ctx)
    learner = PromptLearner(names, tiny_clip, n_ctx=n_ctx, ctx_init="")
    with torch.no_grad():
        prompts = learner(position)  # (n_cls, L, d)
        ctx = learner.ctx.detach()
    embed = tiny_clip.token_embedding.weight.detach()
    half = n_ctx // 2
    for row, name in enumerate(names):
        length = token_count(name)
        name_ids = tokenize(name, learner.context_length)[0, 1:1 + length]
        ids = learner.tokenized_prompts[row]
        eot = int(ids.argmax())
        assert int(ids[eot]) == EOT_TOKEN and eot == 1 + n_ctx + length + 1  # SOS ctx CLASS . EOT
        class_at = {"end": 1 + n_ctx, "middle": 1 + half, "front": 1}[position]
        ctx_at = {"end": [1 + i for i in range(n_ctx)],
                  "middle": [1 + i if i < half else 1 + length + i for i in range(n_ctx)],
                  "front": [1 + length + i for i in range(n_ctx)]}[position]
        prompt = prompts[row]
        assert torch.equal(prompt[0], embed[ids[0]])  # SOS
        assert torch.equal(prompt[class_at:class_at + length], embed[name_ids])
        for i, at in enumerate(ctx_at):
            assert torch.equal(prompt[at], ctx[i])
            assert int((prompt == ctx[i]).all(dim=-1).sum()) == 1  # exactly once
        assert torch.equal(prompt[eot - 1:], embed[ids[eot - 1:]])  # ". [EOS] pad" in place
        assert int((prompt == embed[EOT_TOKEN]).all(dim=-1).sum()) == 1


# ------------------------------------------------------------------ evaluation on many classes
@pytest.mark.parametrize("kind, opts", [
    ("CoOp", ()),
    ("SelfTPT", ("TRAINER.SELFTPT.TTA", "False")),
    ("SelfTPT", ("TRAINER.SELFTPT.TTA", "False", "TRAINER.SELFTPT.CLS_VIEW", "mean")),
])
def test_evaluation_text_features_cover_a_class_set_larger_than_one_chunk(kind, opts, tiny_data_root,
                                                                          tiny_clip_path, tmp_path):
    """300 class names (the prompts are encoded 256 at a time): one feature per class, in order."""
    trainer = make_trainer(kind, tiny_data_root, tiny_clip_path, tmp_path, *opts)
    trainer.model.prompt_learner.set_classnames([f"shape number {i}" for i in range(300)])
    trainer.prepare_for_test()
    with torch.no_grad():
        if "mean" in opts:  # Self-TPT's CLS_VIEW mean: the renormalised mean of the three layouts
            expected = F.normalize(torch.stack([trainer.model.text_features(p) for p in POSITIONS]).mean(0), dim=-1)
        else:
            expected = trainer.model.text_features()
    assert trainer.eval_text_features.shape == (300, expected.shape[1])
    torch.testing.assert_close(trainer.eval_text_features, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["CoOp", "CoCoOp", "SelfTPT", "MaPLe", "PromptSRC"])
def test_the_learning_rate_schedule_steps_once_at_the_last_batch_of_an_epoch(kind, tiny_data_root,
                                                                            tiny_clip_path, tmp_path):
    trainer = make_trainer(kind, tiny_data_root, tiny_clip_path, tmp_path, "OPTIM.MAX_EPOCH", "2")
    batch, _ = fixed_train_batch(trainer)
    scheds = {n: s for n, s in trainer._scheds.items() if s is not None}
    assert scheds.keys() == set(trainer.get_model_names())  # every trained module follows the schedule
    trainer.epoch = 0

    def epochs():
        return {n: s.last_epoch for n, s in scheds.items()}

    start = epochs()
    trainer.batch_idx, trainer.num_batches = 0, 3  # a mid-epoch batch: no change
    trainer.forward_backward(batch)
    assert epochs() == start
    assert getattr(trainer, "gpa_sum", None) is None  # PromptSRC adds to its prompt average once per epoch, too
    trainer.batch_idx = 2  # the epoch's last batch: every scheduler steps once
    trainer.forward_backward(batch)
    assert epochs() == {n: e + 1 for n, e in start.items()}
    if kind == "PromptSRC":
        assert trainer.gpa_sum is not None


# ------------------------------------------------------------------------- Self-TPT stage 2
def test_stage_two_steps_down_the_cpt_gradient_of_every_class_and_reports_its_loss(tiny_data_root,
                                                                                  tiny_clip_path, tmp_path):
    """One adaptation pass with SGD (all six classes in one chunk): the context moves by
    ``-TTA_LR * grad L_cpt`` of the whole class set, and the results record L_cpt before and after."""
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.TTA_STEPS", "1",
                              "TRAINER.SELFTPT.TTA_OPTIM", "sgd", "TRAINER.SELFTPT.TTA_LR", "0.1")
    trainer.cpt.refresh_class_set(trainer.model)
    trainer.cpt.eval()
    every = torch.arange(6)
    ctx0 = trainer.model.prompt_learner.ctx.detach().clone()
    ctx = ctx0.clone().requires_grad_(True)
    loss0 = cpt_loss(trainer, every, trainer.node.TEMPERATURE, ctx)
    grad = torch.autograd.grad(loss0, ctx)[0]
    adapted = trainer.adapt_to_class_names(ctx0)
    assert_close(adapted - ctx0, -0.1 * grad, rel=1e-3)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), ctx0)  # a copy was adapted
    tta = trainer.result_extra["tta"]
    with torch.no_grad():
        loss1 = cpt_loss(trainer, every, trainer.node.TEMPERATURE, adapted)
    assert tta["cpt_loss_before"] == pytest.approx(loss0.item(), rel=1e-5)
    assert tta["cpt_loss_after"] == pytest.approx(loss1.item(), rel=1e-5)
    assert (tta["n_classes"], tta["steps"], tta["chunks_per_pass"], tta["classes_covered"]) == (6, 1, 1, 6)


def test_stage_two_accumulates_the_class_weighted_cpt_gradient_over_chunks(tiny_data_root, tiny_clip_path,
                                                                          tmp_path, monkeypatch):
    """CPT_MAX_CLASSES 3 on six classes: two chunks; one SGD step along minus the gradient of
    ``sum_chunks |chunk| / n_cls * L_cpt(chunk)``, the loss recorded being that weighted sum."""
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.TTA_STEPS", "1",
                              "TRAINER.SELFTPT.TTA_OPTIM", "sgd", "TRAINER.SELFTPT.TTA_LR", "0.1",
                              "TRAINER.SELFTPT.CPT_MAX_CLASSES", "3")
    partitions = []
    original = selftpt_module.class_chunks

    def spy(*args, **kwargs):
        partitions.append(original(*args, **kwargs))
        return partitions[-1]

    monkeypatch.setattr(selftpt_module, "class_chunks", spy)
    trainer.cpt.refresh_class_set(trainer.model)
    trainer.cpt.eval()
    ctx0 = trainer.model.prompt_learner.ctx.detach().clone()
    adapted = trainer.adapt_to_class_names(ctx0)
    chunks = partitions[0]
    assert sorted(len(c) for c in chunks) == [3, 3]
    ctx = ctx0.clone().requires_grad_(True)
    loss0 = sum(len(c) / 6 * cpt_loss(trainer, c, trainer.node.TEMPERATURE, ctx) for c in chunks)
    grad = torch.autograd.grad(loss0, ctx)[0]
    assert_close(adapted - ctx0, -0.1 * grad, rel=1e-3)
    assert trainer.result_extra["tta"]["cpt_loss_before"] == pytest.approx(loss0.item(), rel=1e-5)


def test_stage_two_class_partitions_follow_the_seed(tiny_data_root, tiny_clip_path, tmp_path, monkeypatch):
    """The chunks of stage 2 are drawn from a generator seeded with SEED: seeds 0 and 1 differ,
    the same seed repeats."""
    partitions = []
    original = selftpt_module.class_chunks

    def spy(*args, **kwargs):
        chunks = original(*args, **kwargs)
        partitions[-1].append(sorted(sorted(c.tolist()) for c in chunks))
        return chunks

    monkeypatch.setattr(selftpt_module, "class_chunks", spy)
    for run, seed in enumerate(("0", "1", "0")):
        trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path / str(run), "SEED", seed,
                                  "TRAINER.SELFTPT.TTA_STEPS", "2", "TRAINER.SELFTPT.CPT_MAX_CLASSES", "2")
        trainer.cpt.refresh_class_set(trainer.model)
        partitions.append([])
        torch.manual_seed((100, 105, 101)[run])  # the global RNG differs between the runs
        trainer.adapt_to_class_names(trainer.model.prompt_learner.ctx.detach())
    assert len(partitions[0]) == 2  # a new partition at each step
    assert partitions[0] == partitions[2]  # every step's partition follows SEED alone
    assert partitions[0][0] != partitions[1][0]


def test_stage_two_reports_the_cpt_loss_before_its_first_step(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.TTA_STEPS", "3")
    trainer.cpt.refresh_class_set(trainer.model)
    trainer.cpt.eval()
    ctx0 = trainer.model.prompt_learner.ctx.detach().clone()
    with torch.no_grad():
        before = cpt_loss(trainer, torch.arange(6), trainer.node.TEMPERATURE, ctx0).item()
    adapted = trainer.adapt_to_class_names(ctx0)
    with torch.no_grad():
        after = cpt_loss(trainer, torch.arange(6), trainer.node.TEMPERATURE, adapted).item()
    tta = trainer.result_extra["tta"]
    assert tta["cpt_loss_before"] == pytest.approx(before, rel=1e-5)
    assert tta["cpt_loss_after"] == pytest.approx(after, rel=1e-5) and after < before
    assert (tta["steps"], tta["passes"]) == (3, 3)


@pytest.mark.parametrize("cls_view", ["single", "mean"])
def test_inference_classifies_with_the_adapted_context(cls_view, tiny_data_root, tiny_clip_path, tmp_path):
    """Stage 3 uses the stage-2 context: in the configured layout, or the renormalised mean of
    the three layouts (CLS_VIEW mean)."""
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.TTA_STEPS", "1",
                              "TRAINER.SELFTPT.TTA_OPTIM", "sgd", "TRAINER.SELFTPT.TTA_LR", "1.0",
                              "TRAINER.SELFTPT.CLS_VIEW", cls_view, "TRAINER.SELFTPT.CLASS_TOKEN_POSITION", "front")
    ctx0 = trainer.model.prompt_learner.ctx.detach().clone()
    trainer.prepare_for_test()
    adapted = trainer.adapt_to_class_names(ctx0)  # the same seeded pass again
    assert not torch.allclose(adapted, ctx0)

    def features(ctx):
        with torch.no_grad():
            if cls_view == "single":
                return trainer.model.text_features("front", ctx=ctx)
            per_layout = torch.stack([trainer.model.text_features(p, ctx=ctx) for p in POSITIONS])
            return F.normalize(per_layout.mean(dim=0), dim=-1)

    torch.testing.assert_close(trainer.eval_text_features, features(adapted), rtol=0, atol=1e-5)
    assert (trainer.eval_text_features - features(ctx0)).abs().max() > 1e-4


def test_stage_one_extra_cpt_classes_come_from_the_trainers_seeded_generator(tiny_data_root, tiny_clip_path,
                                                                            tmp_path, monkeypatch):
    """The classes CPT adds to a small batch's are drawn from the trainer's own generator (seeded
    with SEED, saved on resume), not from the global RNG that data loading also consumes."""
    picked = []
    original = selftpt_module.sample_classes

    def spy(*args, **kwargs):
        picked.append(original(*args, **kwargs).tolist())
        return torch.tensor(picked[-1])

    monkeypatch.setattr(selftpt_module, "sample_classes", spy)
    for global_seed in (0, 123):
        trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path / str(global_seed),
                                  "TRAINER.SELFTPT.CPT_MAX_CLASSES", "4", "DATALOADER.TRAIN_X.BATCH_SIZE", "2",
                                  "TRAINER.SELFTPT.USE_GM", "False")
        batch, _ = fixed_train_batch(trainer)
        torch.manual_seed(global_seed)
        trainer.forward_backward(batch)
    assert len(picked) == 2 and len(picked[0]) == 4
    assert picked[0] == picked[1]


def test_stage_two_without_steps_reports_the_unadapted_loss_and_its_timings(tiny_data_root, tiny_clip_path,
                                                                           tmp_path):
    """TTA_STEPS 0: the prompt is not moved, before and after are L_cpt of the trained context;
    the recorded durations lie within the call."""
    import time
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.TTA_STEPS", "0")
    ctx0 = trainer.model.prompt_learner.ctx.detach().clone()
    start = time.perf_counter()
    trainer.prepare_for_test()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        expected = cpt_loss(trainer, torch.arange(6), trainer.node.TEMPERATURE, ctx0).item()
        torch.testing.assert_close(trainer.eval_text_features, trainer.class_text_features(ctx0), rtol=0, atol=1e-6)
    tta = trainer.result_extra["tta"]
    assert tta["cpt_loss_before"] == pytest.approx(expected, rel=1e-5)
    assert tta["cpt_loss_after"] == pytest.approx(expected, rel=1e-5)
    assert tta["loss_scale_backoffs"] == 0
    assert 0.0 <= tta["seconds"] <= elapsed
    assert 0.0 <= trainer.result_extra["text_features_seconds"] <= elapsed


def test_stage_two_without_steps_measures_the_context_it_is_given(tiny_data_root, tiny_clip_path, tmp_path):
    trainer = selftpt_trainer(tiny_data_root, tiny_clip_path, tmp_path, "TRAINER.SELFTPT.TTA_STEPS", "0")
    trainer.cpt.refresh_class_set(trainer.model)
    trainer.cpt.eval()
    ctx = trainer.model.prompt_learner.ctx.detach()
    other = ctx + 0.5 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(5))  # not the model's own
    assert torch.equal(trainer.adapt_to_class_names(other), other)
    with torch.no_grad():
        expected = cpt_loss(trainer, torch.arange(6), trainer.node.TEMPERATURE, other).item()
    assert trainer.result_extra["tta"]["cpt_loss_before"] == pytest.approx(expected, rel=1e-5)
