"""Top-k accuracy (Dassl's ``compute_accuracy``)."""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["compute_accuracy"]


def compute_accuracy(
    output: Union[torch.Tensor, Sequence[torch.Tensor]],
    target: torch.Tensor,
    topk: Sequence[int] = (1,),
) -> list[torch.Tensor]:
    """Top-k accuracy in percent.

    Args:
        output: logits ``(batch, n_cls)``, or a tuple/list whose first element is used.
        target: labels ``(batch,)``.
        topk: the k values.

    Returns:
        One 1-element float tensor per k.
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    maxk = max(topk)
    batch_size = target.size(0)
    _, pred = output.topk(maxk, dim=1, largest=True, sorted=True)  # (batch, maxk)
    correct = pred.t().eq(target.view(1, -1).expand(maxk, -1))  # (maxk, batch)
    return [
        correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size)
        for k in topk
    ]
