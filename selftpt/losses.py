"""Losses of Self-TPT and TPT, each a small pure function of tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selftpt.errors import ConfigError


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor,
                                temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020), Self-TPT's CPT objective.

    For anchor i with positives P(i) (other samples of its class) and candidates A(i) (all
    samples but i): ``-1/|P(i)| sum_p log(exp(z_i.z_p/t) / sum_a exp(z_i.z_a/t))``, averaged
    over the anchors that have a positive.

    Args:
        features: (N, D) L2-normalised features (N = classes x views).
        labels: (N,) class of each feature.
        temperature: tau.
    """
    n = features.shape[0]
    if torch.unique(labels).numel() < 2:
        raise ValueError("The contrastive CPT loss needs at least two classes (negatives); got one")
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    if features.dtype in (torch.float16, torch.bfloat16):  # exp/log need the range of fp32
        features = features.float()
    sim = features @ features.t() / temperature  # (N, N)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not has_pos.any():
        raise ValueError("The contrastive CPT loss needs at least two views per class (positives)")
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


def gradient_matching_loss(grad_cpt: torch.Tensor, ema_grad_ce: torch.Tensor) -> torch.Tensor:
    """Self-TPT's L_gm = 1 - cos(grad of L_cpt, EMA of grad of L_ce), over the flattened context.

    ``grad_cpt`` must be created with ``create_graph=True`` for L_gm to train the prompt.
    """
    return 1.0 - F.cosine_similarity(grad_cpt.flatten().float(), ema_grad_ce.flatten().float(), dim=0)


class GradientEMA:
    """Exponential moving average of a gradient, ``g <- a*g + (1-a)*new`` (first value: new).

    Starting from the first gradient rather than zero only changes the average's scale on
    the first steps, and the cosine of L_gm does not depend on scale.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"GM_EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.value: torch.Tensor | None = None

    def update(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.detach()
        self.value = grad.clone() if self.value is None else \
            self.decay * self.value + (1.0 - self.decay) * grad
        return self.value


def select_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``int(N * fraction)`` (at least 1) rows of lowest softmax entropy (TPT)."""
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # (N,)
    k = max(1, int(logits.shape[0] * fraction))
    return torch.argsort(entropy, descending=False)[:k]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean prediction over views (TPT's ``avg_entropy``).

    ``log p_bar = logsumexp_v(log_softmax(l_v)) - log V``, then ``-sum p_bar log p_bar``.
    """
    log_probs = logits.float().log_softmax(dim=-1)  # (V, C)
    avg = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])  # (C,)
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg.exp() * avg).sum()


def ensemble_views(logits: torch.Tensor, mode: str = "mean", fraction: float = 0.1) -> torch.Tensor:
    """Aggregate per-view logits (B, V, C) into (B, C) log-probabilities (Self-TPT-v).

    Args:
        mode: ``mean`` of softmax probabilities over all V views, or ``confident``: mean over
            the lowest-entropy ``fraction`` of views (TPT's selection).
    """
    if mode not in ("mean", "confident"):
        raise ConfigError(f"VIEW_AGGREGATION must be 'mean' or 'confident', got {mode!r}")
    probs = logits.float().softmax(dim=-1)  # (B, V, C)
    if mode == "confident":
        probs = torch.stack([p[select_confident(view_logits, fraction)] for p, view_logits in zip(probs, logits)])
    return probs.mean(dim=1).clamp_min(1e-12).log()


def text_feature_dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """C-TPT's average text feature dispersion (ATFD): the mean L2 distance of the class text
    features from their centroid, ``1/C sum_c ||t_c - mean_c' t_c'||``.

    C-TPT (Yoon et al., ICLR 2024) finds that prompts whose class features lie farther apart
    give better calibrated predictions, and maximises this next to TPT's entropy.

    Args:
        text_features: (C, D) L2-normalised class text features (C >= 1).
    """
    features = text_features.float()
    return (features - features.mean(dim=0, keepdim=True)).norm(dim=-1).mean()
