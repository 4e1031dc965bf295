"""Running averages of training statistics (Dassl's ``AverageMeter``, ``MetricMeter``)."""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Optional

import torch

__all__ = ["AverageMeter", "MetricMeter"]


class AverageMeter:
    """Current value and running (or exponential moving, ``ema=True``) average."""

    def __init__(self, ema: bool = False) -> None:
        self.ema = ema
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        """Record ``val`` (a number or a one-element tensor) seen ``n`` times."""
        if isinstance(val, torch.Tensor):
            val = val.item()
        self.val = val
        self.sum += val * n
        self.count += n
        if self.ema:
            self.avg = self.avg * 0.9 + self.val * 0.1
        else:
            self.avg = self.sum / self.count


class MetricMeter:
    """A named set of ``AverageMeter``s; ``str()`` gives ``name val (avg)`` with 4 decimals."""

    def __init__(self, delimiter: str = " ") -> None:
        self.meters: defaultdict[str, AverageMeter] = defaultdict(AverageMeter)
        self.delimiter = delimiter

    def update(self, input_dict: Optional[Mapping[str, float]]) -> None:
        """Update one meter per key of ``input_dict`` (None is ignored)."""
        if input_dict is None:
            return
        if not isinstance(input_dict, Mapping):
            raise TypeError("Input to MetricMeter.update() must be a dictionary")
        for k, v in input_dict.items():
            self.meters[k].update(v)

    def __str__(self) -> str:
        return self.delimiter.join(
            f"{name} {meter.val:.4f} ({meter.avg:.4f})" for name, meter in self.meters.items()
        )
