"""The benchmark's ViT backbone, Bench-ViT-S (selftpt/benchmark/distill.py): the student keeps
the teacher's text tower, its batches are functions of (seed, step), distillation moves its image
features towards the teacher's, and the shipped asset loads by name and takes deep prompts."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selftpt.benchmark import distill
from selftpt.clip_loader import ASSET_DIR, BUILTIN_BACKBONES, CLIP_ARCHS, build_random_clip


@pytest.fixture(scope="module")
def teacher():
    return build_random_clip("Bench-RN-S", seed=3)


def test_student_is_a_vit_with_the_teachers_text_tower(teacher):
    from clip.model import VisionTransformer

    student = distill.build_student(teacher, seed=1)
    assert isinstance(student.visual, VisionTransformer)
    assert student.visual.input_resolution == CLIP_ARCHS[distill.BACKBONE_NAME]["image_resolution"] == 64
    tokens = torch.randint(1, 400, (2, 32))
    with torch.no_grad():
        assert torch.equal(student.encode_text(tokens), teacher.encode_text(tokens))
    assert torch.equal(student.logit_scale, teacher.logit_scale)
    assert not torch.equal(student.visual.proj, distill.build_student(teacher, seed=2).visual.proj)


def test_a_teacher_with_another_text_tower_is_refused():
    other = build_random_clip(dict(CLIP_ARCHS["Bench-RN-S"], transformer_layers=2))
    with pytest.raises(RuntimeError, match="text towers differ"):
        distill.build_student(other, seed=1)


def test_batches_are_functions_of_seed_and_step_with_the_fashion_share():
    recipe = distill.Recipe(batch_size=10, fashion_share=0.2, steps=3)
    pool = np.random.default_rng(0).integers(0, 255, (30, 28, 28), dtype=np.uint8)
    data = distill.DistillBatches(recipe, 64, pool)
    x = data[1]
    assert x.shape == (10, 3, 64, 64) and torch.equal(x, data[1]) and not torch.equal(x, data[0])
    assert distill.DistillBatches(recipe, 64, None)[1].shape == (10, 3, 64, 64)  # world images fill the batch
    # the Fashion-MNIST images are grey: the last two of each batch have equal channels before normalising
    gray = x[-2:] * torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None] \
        + torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)
    assert not torch.allclose(x[:8, 0], x[:8, 1], atol=1e-2)


def test_distillation_moves_the_students_features_towards_the_teachers(teacher):
    recipe = distill.Recipe(steps=6, batch_size=16, warmup=1, fashion_share=0.0, eval_every=0, kd_weight=0.0,
                            hint_weight=0.0)
    student = distill.build_student(teacher, seed=1)
    held_out = distill.DistillBatches(distill.Recipe(seed=9, batch_size=32, fashion_share=0.0), 64, None)[0]

    def cosine():
        with torch.no_grad():
            return float(F.cosine_similarity(student.encode_image(held_out), teacher.encode_image(held_out)).mean())

    before = cosine()
    visual_before = {k: v.clone() for k, v in student.state_dict().items()}
    info = distill.distill_image_tower(student, teacher, recipe, None, workers=0)
    assert cosine() > before + 0.05
    assert len(info["cosine_curve"]) == 1 and info["zeroshot_shapeworld_base_curve"] == []
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, visual_before[k])}
    assert changed and all(k.startswith("visual.") for k in changed)  # the text tower stays the teacher's
    assert all(p.requires_grad for p in student.parameters()) and not student.visual.training


def test_caption_bank_is_unit_norm_deterministic_and_holds_the_fashion_share(teacher):
    recipe = distill.Recipe(bank_size=20, fashion_share=0.25)
    bank = distill.caption_bank(teacher, recipe, ["t-shirt", "coat"])
    assert bank.shape == (20, 128) and torch.allclose(bank.norm(dim=-1), torch.ones(20), atol=1e-5)
    assert torch.equal(bank, distill.caption_bank(teacher, recipe, ["t-shirt", "coat"]))
    world_only = distill.caption_bank(teacher, recipe, None)
    assert not torch.equal(world_only, bank)  # without Fashion-MNIST, all 20 are world captions
    assert not torch.equal(distill.caption_bank(teacher, distill.Recipe(seed=2, bank_size=20), None), world_only)


def test_the_first_step_descends_the_cosine_plus_the_weighted_caption_bank_divergence(teacher):
    """AdamW's first step moves each weight by -lr * sign(gradient): its signs must be those of the
    documented loss (1 - cosine + kd_weight * KL over the caption bank) computed here, and not
    those of the cosine alone."""
    recipe = distill.Recipe(steps=1, batch_size=16, warmup=1, fashion_share=0.0, eval_every=0, kd_weight=5.0,
                            bank_size=64, weight_decay=0.0, hint_weight=0.0)
    student = distill.build_student(teacher, seed=1)
    start = {n: p.detach().clone() for n, p in student.visual.named_parameters()}
    x = distill.DistillBatches(recipe, 64, None)[0]
    bank = distill.caption_bank(teacher, recipe, None)
    scale = teacher.logit_scale.exp().item()
    with torch.no_grad():
        target = F.normalize(teacher.encode_image(x), dim=-1)
    feature = F.normalize(student.visual(x), dim=-1)
    cosine_loss = 1 - (feature * target).sum(-1).mean()
    kl = F.kl_div((scale * feature @ bank.t()).log_softmax(-1), (scale * target @ bank.t()).log_softmax(-1),
                  reduction="batchmean", log_target=True)
    names = [n for n, _ in student.visual.named_parameters()]
    params = list(student.visual.parameters())
    full = torch.autograd.grad(cosine_loss + recipe.kd_weight * kl, params, retain_graph=True)
    cosine_only = torch.autograd.grad(cosine_loss, params)
    distill.distill_image_tower(student, teacher, recipe, None, workers=0)
    moved = dict(student.visual.named_parameters())

    def agreement(grads):
        same = total = 0
        for n, g in zip(names, grads):
            keep = g.abs() > 1e-6
            same += int((torch.sign(moved[n].detach() - start[n])[keep] == -torch.sign(g)[keep]).sum())
            total += int(keep.sum())
        return same / total

    assert agreement(full) > 0.99
    assert agreement(cosine_only) < 0.95


def test_hint_loss_compares_adapted_patch_tokens_with_the_pooled_teacher_map():
    torch.manual_seed(0)
    tokens = {block: torch.randn(1 + 16, 2, 8) for block, _ in distill.HINTS}  # LND, class token first
    maps = {stage: torch.randn(2, 8, 8, 8) for _, stage in distill.HINTS}
    adapters = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in distill.HINTS)
    expected = []
    for (block, stage), adapter in zip(distill.HINTS, adapters):
        pooled = maps[stage].reshape(2, 8, 4, 2, 4, 2).mean((3, 5))  # 8x8 -> the 4x4 patch grid
        for n in range(2):
            for i in range(16):
                a = adapter(tokens[block][1 + i, n])
                expected.append(F.cosine_similarity(a, pooled[n, :, i // 4, i % 4], dim=0))
    want = 1 - torch.stack(expected).mean()
    assert torch.allclose(distill.hint_loss(tokens, maps, adapters), want, atol=1e-6)


def test_distillation_with_hints_leaves_no_hooks_behind(teacher):
    student = distill.build_student(teacher, seed=1)
    recipe = distill.Recipe(steps=1, batch_size=4, fashion_share=0.0, eval_every=0, kd_weight=0.0, hint_weight=1.0)
    distill.distill_image_tower(student, teacher, recipe, None, workers=0)
    modules = [*student.visual.transformer.resblocks, *(getattr(teacher.visual, s) for _, s in distill.HINTS)]
    assert not any(m._forward_hooks for m in modules)


def test_bench_vit_s_asset_loads_by_name_with_its_recorded_settings():
    from clip.model import VisionTransformer

    from selftpt.clip_loader import load_clip
    from selftpt.deep_prompts import require_vit_backbone

    name = distill.BACKBONE_NAME
    assert BUILTIN_BACKBONES[name] == distill.ASSET_FILE
    model = load_clip(name)  # the normal loading path, from selftpt/assets
    assert isinstance(model.visual, VisionTransformer) and model.visual.input_resolution == 64
    require_vit_backbone("MaPLe", name, model.visual)  # deep prompts accept it (a ResNet is refused)
    teacher = load_clip(distill.Recipe.teacher)
    text = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in text.items())  # the teacher's text tower
    asset = ASSET_DIR / distill.ASSET_FILE
    assert asset.stat().st_size <= 20 * 2 ** 20
    record = json.loads(asset.with_suffix(".json").read_text())
    assert record["backbone"] == name and record["recipe"] == "distilled"
    assert record["arch"] == CLIP_ARCHS[name] and distill.Recipe(**record["settings"]) == distill.Recipe()
    assert set(record["quality"]["zeroshot"]) >= {"ShapeWorld", "MoreShapes", "ShapePatterns"}
    assert len(record["quality"]["probe_shapeworld_base"]["values"]) == 3


def test_pretraining_writes_a_deterministic_fp16_asset_and_its_evaluated_sidecar(tmp_path, monkeypatch):
    from clip.model import VisionTransformer

    from selftpt.benchmark import quality
    from selftpt.benchmark.catalog import DATASETS
    from selftpt.clip_loader import load_clip

    measured = {"probe_shapeworld_base": {"mean": 1.0}, "proxy_shapeworld_base": {"zeroshot": 2.0, "mean": 3.0},
                "zeroshot": {"ShapeWorld": {"all": 4.0, "chance_all": 1.6, "base": 5.0, "new": 6.0}}}
    seen = []

    def table(model, seeds, root, names):  # the quality table's inputs, without measuring
        seen.append((type(model.visual), list(seeds), names))
        return measured

    monkeypatch.setattr(quality, "quality_table", table)
    recipe = distill.Recipe(steps=2, batch_size=8, bank_size=16, eval_every=0)
    kwargs = dict(workers=0, use_fashion=False)
    record = distill.pretrain_distilled(tmp_path / "a.pt", recipe, **kwargs)
    distill.pretrain_distilled(tmp_path / "b.pt", recipe, evaluate=False, **kwargs)
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())
    assert isinstance(load_clip(str(tmp_path / "a.pt")).visual, VisionTransformer)
    # evaluated through the normal loading path, on every dataset but the unused Fashion-MNIST
    assert seen == [(VisionTransformer, [1, 2, 3], [n for n in DATASETS if n != "FashionMNIST"])]
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert sidecar["quality"] == record["quality"] == measured
    assert sidecar["settings"]["steps"] == 2 and len(sidecar["distil"]["cosine_curve"]) == 1
    assert "quality" not in json.loads((tmp_path / "b.json").read_text())
