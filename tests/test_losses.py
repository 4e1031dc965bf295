"""Self-TPT's and TPT's losses against hand-computed values and finite differences."""
import math

import pytest
import torch
import torch.nn.functional as F

from selftpt.calibration import expected_calibration_error
from selftpt.losses import (
    GradientEMA,
    ensemble_views,
    gradient_matching_loss,
    marginal_entropy,
    select_confident,
    supervised_contrastive_loss,
)


def _supcon_by_hand(z, labels, tau):
    n, total, anchors = len(z), 0.0, 0
    for i in range(n):
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(sum(a * b for a, b in zip(z[i], z[a_])) / tau) for a_ in range(n) if a_ != i)
        term = 0.0
        for p in pos:
            term += math.log(math.exp(sum(a * b for a, b in zip(z[i], z[p])) / tau) / denom)
        total += -term / len(pos)
        anchors += 1
    return total / anchors


def test_supcon_equals_hand_computed_value():
    z = F.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.5], [-0.3, 1.0], [0.1, 0.8], [0.7, -0.7]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has no positive: not an anchor, still a negative
    got = supervised_contrastive_loss(z, labels, temperature=0.5)
    expected = _supcon_by_hand(z.tolist(), labels.tolist(), 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_supcon_gradient_matches_finite_differences():
    torch.manual_seed(0)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda x: supervised_contrastive_loss(x, labels, 0.3), (z,))


def test_supcon_refuses_a_single_class():
    z = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match="two classes"):
        supervised_contrastive_loss(z, torch.zeros(4, dtype=torch.long))


def test_supcon_default_temperature_is_007_and_two_classes_suffice():
    z = F.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.5], [-0.3, 1.0], [0.1, 0.8], [0.6, 0.6]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 0])  # exactly two classes; class 0 has two positives per anchor
    expected = _supcon_by_hand(z.tolist(), labels.tolist(), 0.07)
    assert supervised_contrastive_loss(z, labels).item() == pytest.approx(expected, rel=1e-3)


def test_supcon_of_half_features_is_computed_in_fp32():
    z = F.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.5], [-0.3, 1.0], [0.1, 0.8], [0.7, -0.7]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2])
    got = supervised_contrastive_loss(z.half(), labels, temperature=0.07)
    assert got.dtype == torch.float32
    expected = _supcon_by_hand(z.half().float().tolist(), labels.tolist(), 0.07)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_supcon_refusals_say_what_is_missing():
    z = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match=r"^The contrastive CPT loss needs at least two classes \(negatives\)"):
        supervised_contrastive_loss(z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^The contrastive CPT loss needs at least two views per class"):
        supervised_contrastive_loss(z, torch.arange(4))  # four classes, one view each: no positive


def test_gradient_matching_gradient_matches_hand_derivation():
    # L_cpt(c) = 0.5 c^T A c  =>  g = A c ;  L_gm = 1 - cos(g, e)
    # dL_gm/dc = -A^T [ e / (|g||e|) - cos(g, e) g / |g|^2 ]
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]], dtype=torch.float64)
    c = torch.tensor([0.4, -1.0, 0.7], dtype=torch.float64, requires_grad=True)
    e = torch.tensor([1.0, 0.2, -0.5], dtype=torch.float64)
    loss_cpt = 0.5 * c @ a @ c
    g = torch.autograd.grad(loss_cpt, c, create_graph=True)[0]
    loss_gm = gradient_matching_loss(g, e)
    (grad_c,) = torch.autograd.grad(loss_gm, c)
    g_val = (a @ c).detach()
    cos = (g_val @ e) / (g_val.norm() * e.norm())
    d_cos_d_g = e / (g_val.norm() * e.norm()) - cos * g_val / g_val.norm() ** 2
    expected = -(a.t() @ d_cos_d_g)
    assert torch.allclose(grad_c.double(), expected, atol=1e-6)
    assert loss_gm.item() == pytest.approx(1 - cos.item(), abs=1e-6)


def test_gradient_ema_follows_the_decay_rule():
    ema = GradientEMA(decay=0.9)
    assert torch.equal(ema.update(torch.tensor([1.0, 0.0])), torch.tensor([1.0, 0.0]))
    assert torch.allclose(ema.update(torch.tensor([0.0, 1.0])), torch.tensor([0.9, 0.1]))


def test_select_confident_keeps_the_lowest_entropy_tenth():
    logits = torch.zeros(20, 5)
    sharp = [3, 11]  # the 10% (2 of 20) most confident views
    logits[3, 0], logits[11, 2] = 9.0, 7.0
    logits[5, 1] = 2.0  # somewhat confident, but less so
    assert sorted(select_confident(logits, 0.1).tolist()) == sharp


def test_marginal_entropy_equals_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = torch.softmax(logits, dim=-1).mean(dim=0)
    expected = -(p * p.log()).sum()
    assert marginal_entropy(logits).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ensemble_views_means_probabilities():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]])  # (B=1, V=3, C=2)
    probs = ensemble_views(logits, "mean").exp()
    assert torch.allclose(probs, torch.softmax(logits, -1).mean(1), atol=1e-6)
    confident = ensemble_views(logits, "confident", fraction=0.34).exp()  # one view of three
    assert torch.allclose(confident, torch.softmax(logits[0, :1], -1), atol=1e-6) or \
        torch.allclose(confident, torch.softmax(logits[0, 1:2], -1), atol=1e-6)


def test_ece_equals_hand_computed_value():
    conf = torch.tensor([0.25, 0.75, 0.75, 1.0])
    correct = torch.tensor([0, 1, 0, 1])
    # 4 bins (0,.25] (.25,.5] (.5,.75] (.75,1]: |0-.25|*1/4 + |.5-.75|*2/4 + |1-1|*1/4
    assert expected_calibration_error(conf, correct, n_bins=4) == pytest.approx(100 * (0.0625 + 0.125))


# ------------------------------------------------------------ survivors of the mutation pilot
def test_ensemble_views_defaults_are_the_documented_mean_and_tpt_fraction():
    from selftpt.losses import ensemble_views

    logits = torch.randn(2, 20, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ensemble_views(logits), ensemble_views(logits, "mean", 0.1))
    assert torch.equal(ensemble_views(logits, "confident"), ensemble_views(logits, "confident", 0.1))
    assert not torch.equal(ensemble_views(logits, "confident"), ensemble_views(logits, "confident", 0.5))
    with pytest.raises(ValueError, match="VIEW_AGGREGATION must be 'mean' or 'confident'"):
        ensemble_views(logits, "median")


def test_cpt_class_sampling_never_exceeds_a_full_batch_and_follows_its_generator():
    from selftpt.cpt import sample_classes

    full = torch.arange(4)  # the batch already has CPT_MAX_CLASSES classes: nothing is added
    assert torch.equal(sample_classes(full, 10, 4), full)
    picks = []
    for _ in range(2):
        torch.manual_seed(len(picks))  # the global RNG differs between the draws; the generator does not
        picks.append(sample_classes(torch.tensor([0]), 50, 8, torch.Generator().manual_seed(3)))
    assert torch.equal(picks[0], picks[1]) and len(picks[0]) == 8


def test_two_classes_make_one_chunk():
    from selftpt.cpt import class_chunks

    (chunk,) = class_chunks(2, 64, torch.Generator().manual_seed(0))
    assert sorted(chunk.tolist()) == [0, 1]


@pytest.mark.parametrize("n_cls, size, sizes", [
    (3, 2, [3]), (5, 2, [2, 3]), (7, 2, [2, 2, 3]), (9, 4, [4, 5]),  # a lone last class joins the chunk before
    (6, 4, [4, 2]), (8, 3, [3, 3, 2]),                                 # a last chunk of two stays as it is
])
def test_class_chunks_partition_every_class_once_with_no_lone_class(n_cls, size, sizes):
    from selftpt.cpt import class_chunks

    chunks = class_chunks(n_cls, size, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(chunks).tolist()) == list(range(n_cls))
    assert [len(c) for c in chunks] == sizes


def test_cpt_class_sampling_adds_distinct_other_classes_up_to_the_maximum():
    from selftpt.cpt import sample_classes

    batch = torch.tensor([2, 0, 1, 0])  # three classes in the image batch
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        one_more = sample_classes(batch, 10, 4, generator)  # room for exactly one extra class
        assert len(one_more) == 4 and len(set(one_more.tolist())) == 4 and {0, 1, 2} < set(one_more.tolist())
        assert sample_classes(batch, 5, 5, generator).tolist() == [0, 1, 2, 3, 4]  # the others, never a repeat


def test_gradient_ema_decay_default_and_range():
    assert GradientEMA().decay == 0.9  # the documented TRAINER.SELFTPT.GM_EMA default
    latest = GradientEMA(decay=0.0)  # allowed: no memory, the latest gradient
    latest.update(torch.tensor([1.0, 0.0]))
    assert torch.equal(latest.update(torch.tensor([0.0, 2.0])), torch.tensor([0.0, 2.0]))
    for decay in (1.0, 1.5, -0.1):  # 1 would never move from the first gradient
        with pytest.raises(ValueError, match=rf"^GM_EMA decay must be in \[0, 1\), got {decay}$"):
            GradientEMA(decay=decay)


def test_cpt_heads_have_the_documented_layers():
    from selftpt.cpt import build_head

    mlp = build_head("mlp", 4)
    assert [type(m) for m in mlp] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert type(build_head("linear", 4)) is torch.nn.Linear and build_head("linear", 4).weight.shape == (4, 4)
    assert type(build_head("none", 4)) is torch.nn.Identity
    refusal = r"^TRAINER.SELFTPT.HEAD must be one of \('mlp', 'linear', 'none'\); got 'deep'$"
    with pytest.raises(ValueError, match=refusal):
        build_head("deep", 4)
