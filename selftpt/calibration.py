"""Expected calibration error (Guo et al., 2017), recorded for every evaluation."""
from __future__ import annotations

import torch


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor,
                               n_bins: int = 15) -> float:
    """ECE in percent: sum over equal-width confidence bins of |accuracy - confidence| x share.

    Args:
        confidences: (N,) max softmax probability of each prediction, in [0, 1].
        correct: (N,) bool or 0/1, whether each prediction was right.
        n_bins: number of equal-width bins on [0, 1]; a confidence on a bin's upper edge
            belongs to that bin (bins are (lo, hi]), as in the usual implementation.
    """
    confidences = confidences.detach().double().flatten()
    correct = correct.detach().double().flatten()
    if confidences.numel() == 0:
        raise ValueError("ECE of an empty prediction set is undefined")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize with right=False puts c in bin i where edges[i] < c <= edges[i+1]
    bins = torch.bucketize(confidences, edges[1:-1], right=False)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidences[in_bin].mean()).abs()
            ece += gap * in_bin.double().mean()
    return float(ece) * 100.0
