"""Contrastive Prompt Tuning (CPT), Self-TPT's self-supervised task on class names.

Each class name is rendered in several views — the shared learnable context with the
class token at the front, middle and end, and one hand-crafted prompt — and encoded by
the frozen text encoder. A projection head maps the features to a space where the
supervised contrastive loss pulls the views of one class together and pushes classes
apart. Only class *names* are needed, so the task can run on a target class set before
any test image is seen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selftpt.errors import ConfigError
from selftpt.losses import supervised_contrastive_loss
from selftpt.prompt_learner import POSITIONS
from selftpt.prompted_clip import PromptedCLIP
from selftpt.text_encoder import encode_in_chunks

HANDCRAFTED = "handcrafted"
VIEWS = (*POSITIONS, HANDCRAFTED)
HEADS = ("mlp", "linear", "none")
# Optimisers of the stage-2 adaptation (TRAINER.SELFTPT.TTA_OPTIM), torch's defaults otherwise.
ADAPTATION_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def build_head(kind: str, dim: int) -> nn.Module:
    """CPT projection head: ``mlp`` (Linear-ReLU-Linear), ``linear`` or ``none``."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
    if kind == "linear":
        return nn.Linear(dim, dim)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"TRAINER.SELFTPT.HEAD must be one of {HEADS}; got {kind!r}")


def sample_classes(required: torch.Tensor, n_cls: int, max_classes: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The classes of one stage-1 CPT step: all ``required`` ones (the image batch's) plus
    random others, up to ``max_classes`` in total (more only if the batch alone has more)."""
    required = torch.unique(required.cpu())
    n_extra = max(0, min(max_classes, n_cls) - len(required))
    if n_extra == 0:
        return required
    mask = torch.ones(n_cls, dtype=torch.bool)
    mask[required] = False
    others = mask.nonzero().squeeze(1)
    pick = others[torch.randperm(len(others), generator=generator)[:n_extra]]
    return torch.cat([required, pick]).sort().values


def class_chunks(n_cls: int, max_classes: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A shuffled partition of all classes into chunks of at most ``max_classes`` (>= 2 each)."""
    if n_cls < 2:
        raise ValueError(f"CPT needs at least two class names (it contrasts them); got {n_cls}")
    size = max(2, max_classes)
    perm = torch.randperm(n_cls, generator=generator)
    chunks = list(perm.split(size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:  # a lone class has no negatives
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


class ContrastivePromptTask(nn.Module):
    """Views of class names -> projection head -> supervised contrastive loss.

    Args:
        model: the prompted CLIP whose learner renders the learnable views.
        views: which views take part (subset of ``VIEWS``, at least two).
        head: projection head kind (``build_head``).
        temperature: tau of the contrastive loss.
        template: hand-crafted template for the ``handcrafted`` view ("{}" = class name).
    """

    def __init__(self, model: PromptedCLIP, views: list[str], head: str = "mlp",
                 temperature: float = 0.07, template: str = "a photo of a {}.") -> None:
        super().__init__()
        unknown = [v for v in views if v not in VIEWS]
        if unknown:
            raise ConfigError(f"Unknown CPT view(s) {unknown}; choose from {VIEWS}")
        if len(set(views)) < 2:
            raise ConfigError(f"CPT needs at least two distinct views to have positives; got {list(views)}")
        self.views = list(dict.fromkeys(views))
        self.temperature = temperature
        self.template = template
        dim = model.text_encoder.output_dim
        self.head = build_head(head, dim)
        self.register_buffer("handcrafted_features", torch.empty(0), persistent=False)
        self.refresh_class_set(model)

    @torch.no_grad()
    def refresh_class_set(self, model: PromptedCLIP) -> None:
        """Encode the fixed hand-crafted view of the learner's current class names, once."""
        learner = model.prompt_learner
        if HANDCRAFTED not in self.views or getattr(self, "_encoded_for", None) == learner.classnames:
            return  # nothing to encode, or already encoded for these class names
        texts = [self.template.format(name) for name in learner.classnames]

        def encode(chunk: list[str]) -> torch.Tensor:
            tokens = learner.tokenize(chunk).to(learner.token_prefix.device)  # the model's own tokenizer
            return model.text_encoder(learner.embed_tokens(tokens).to(tokens.device), tokens)

        self.handcrafted_features = encode_in_chunks(encode, texts).float()  # (n_cls, D), not normalised
        self._encoded_for = list(learner.classnames)

    def features(self, model: PromptedCLIP, indices: torch.Tensor,
                 ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n*V, D) normalised head outputs for classes ``indices``, and their class labels."""
        indices = indices.to(model.prompt_learner.token_prefix.device)
        raw = []
        for view in self.views:
            if view == HANDCRAFTED:
                raw.append(self.handcrafted_features[indices])
            else:
                raw.append(model.text_features(view, ctx=ctx, indices=indices, normalize=False).float())
        z = F.normalize(self.head(torch.cat(raw)), dim=-1)  # (V*n, D)
        labels = torch.arange(len(indices), device=z.device).repeat(len(self.views))
        return z, labels

    def loss(self, model: PromptedCLIP, indices: torch.Tensor,
             ctx: torch.Tensor | None = None) -> torch.Tensor:
        """L_cpt over the classes ``indices`` (at least two)."""
        z, labels = self.features(model, indices, ctx)
        return supervised_contrastive_loss(z, labels, self.temperature)
