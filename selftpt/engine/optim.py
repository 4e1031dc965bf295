"""Optimisers and per-epoch LR schedulers from ``cfg.OPTIM`` (Dassl's ``dassl.optim``).

The warm-up schedulers follow Dassl 0.6.3's logic on top of torch's current ``LRScheduler``
API (Dassl's own pass ``verbose`` positionally and crash with torch >= 2.2):
a warm-up scheduler owns a *successor* (StepLR / MultiStepLR / CosineAnnealingLR) built
first. During the ``WARMUP_EPOCH`` first epochs the lr is ``WARMUP_CONS_LR`` (constant) or
ramps linearly from ``WARMUP_MIN_LR`` (linear); at epoch ``WARMUP_EPOCH`` it takes the
successor's current lr (its base lr), and every later ``step()`` steps the successor.
``WARMUP_RECOUNT=True`` starts the successor's count at 0 after warm-up; ``False`` sets the
successor's ``last_epoch`` to ``WARMUP_EPOCH`` before wrapping it, as Dassl does.
Example (LR 0.002, cosine, MAX_EPOCH 5, constant warm-up 1 epoch at 1e-5):
- recount: epoch 0: 1e-5; epoch e >= 1: 0.001 * (1 + cos(pi * (e - 1) / 5)).
- no recount (Dassl's quirk, kept): epoch 1 gets the base lr 0.002, then torch's chained
  cosine continues from it: epoch e >= 2: 0.002 * (1 + cos(pi*e/5)) / (1 + cos(pi/5)).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from selftpt.errors import ConfigError

from .registry import check_availability

__all__ = [
    "AVAI_OPTIMS",
    "AVAI_SCHEDS",
    "build_optimizer",
    "build_lr_scheduler",
    "ConstantWarmupScheduler",
    "LinearWarmupScheduler",
]

AVAI_OPTIMS = ["adam", "amsgrad", "sgd", "rmsprop", "radam", "adamw"]
AVAI_SCHEDS = ["single_step", "multi_step", "cosine"]


def _staged_param_groups(model: nn.Module, optim_cfg) -> list[dict]:
    """Two groups: children named in NEW_LAYERS at LR, the others at LR * BASE_LR_MULT."""
    if not isinstance(model, nn.Module):
        raise TypeError("When OPTIM.STAGED_LR is True, build_optimizer() needs an nn.Module")
    if isinstance(model, nn.DataParallel):
        model = model.module
    new_layers = optim_cfg.NEW_LAYERS
    if isinstance(new_layers, str):
        new_layers = [new_layers]
    if not new_layers:
        warnings.warn("OPTIM.NEW_LAYERS is empty (STAGED_LR is useless)")
    base_params, new_params = [], []
    for name, module in model.named_children():
        (new_params if name in new_layers else base_params).extend(module.parameters())
    return [
        {"params": base_params, "lr": optim_cfg.LR * optim_cfg.BASE_LR_MULT},
        {"params": new_params},
    ]


def build_optimizer(
    model: Union[nn.Module, Iterable[Any]], optim_cfg, param_groups: Optional[Iterable] = None
) -> Optimizer:
    """Build the optimiser ``optim_cfg.NAME`` (adam, amsgrad, sgd, rmsprop, radam, adamw).

    Args:
        model: an ``nn.Module`` or an iterable of parameters / param-group dicts.
        optim_cfg: ``cfg.OPTIM``.
        param_groups: if given, optimised instead of ``model`` (STAGED_LR is then ignored).
    """
    name = optim_cfg.NAME
    check_availability(name, AVAI_OPTIMS, kind="optimizer")
    lr, wd = optim_cfg.LR, optim_cfg.WEIGHT_DECAY
    betas = (optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)

    if param_groups is not None and optim_cfg.STAGED_LR:
        warnings.warn("STAGED_LR is ignored when param_groups are given; bind it there yourself")
    if param_groups is None:
        if optim_cfg.STAGED_LR:
            param_groups = _staged_param_groups(model, optim_cfg)
        elif isinstance(model, nn.Module):
            param_groups = model.parameters()
        else:
            param_groups = model

    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=wd, betas=betas)
    if name == "amsgrad":
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=wd, betas=betas, amsgrad=True)
    if name == "sgd":
        return torch.optim.SGD(
            param_groups, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd,
            dampening=optim_cfg.SGD_DAMPNING, nesterov=optim_cfg.SGD_NESTEROV,
        )
    if name == "rmsprop":
        return torch.optim.RMSprop(
            param_groups, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd,
            alpha=optim_cfg.RMSPROP_ALPHA,
        )
    if name == "radam":
        return torch.optim.RAdam(param_groups, lr=lr, weight_decay=wd, betas=betas)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=wd, betas=betas)  # adamw


class _BaseWarmupScheduler(LRScheduler):
    """Warm-up for ``warmup_epoch`` epochs, then hands every step to ``successor``."""

    def __init__(self, optimizer: Optimizer, successor: LRScheduler, warmup_epoch: int,
                 last_epoch: int = -1) -> None:
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def step(self, epoch: Optional[int] = None) -> None:
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Own state plus the successor's state dict (not the successor object)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        successor = state.pop("successor", None)
        if isinstance(successor, LRScheduler):  # a Dassl-made checkpoint pickles the object
            successor = successor.state_dict()
        if successor is not None:
            self.successor.load_state_dict(successor)
        self.__dict__.update(state)


class ConstantWarmupScheduler(_BaseWarmupScheduler):
    """lr = ``cons_lr`` for the first ``warmup_epoch`` epochs, then ``successor``."""

    def __init__(self, optimizer: Optimizer, successor: LRScheduler, warmup_epoch: int,
                 cons_lr: float, last_epoch: int = -1) -> None:
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


class LinearWarmupScheduler(_BaseWarmupScheduler):
    """lr = ``min_lr`` at epoch 0, then ``base_lr * epoch / warmup_epoch``, then ``successor``."""

    def __init__(self, optimizer: Optimizer, successor: LRScheduler, warmup_epoch: int,
                 min_lr: float, last_epoch: int = -1) -> None:
        self.min_lr = min_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        if self.last_epoch == 0:
            return [self.min_lr for _ in self.base_lrs]
        return [lr * self.last_epoch / self.warmup_epoch for lr in self.base_lrs]


def build_lr_scheduler(optimizer: Optimizer, optim_cfg) -> LRScheduler:
    """Build the per-epoch scheduler ``optim_cfg.LR_SCHEDULER``, wrapped in a warm-up
    scheduler when ``WARMUP_EPOCH > 0``. Step it once per epoch.
    """
    name = optim_cfg.LR_SCHEDULER
    check_availability(name, AVAI_SCHEDS, kind="lr scheduler")
    stepsize, gamma, max_epoch = optim_cfg.STEPSIZE, optim_cfg.GAMMA, optim_cfg.MAX_EPOCH

    if name == "single_step":
        if isinstance(stepsize, (list, tuple)):
            stepsize = stepsize[-1]
        if not isinstance(stepsize, int):
            raise TypeError(f"For single_step, OPTIM.STEPSIZE must be an int, got {stepsize!r}")
        if stepsize <= 0:
            stepsize = max_epoch
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=stepsize, gamma=gamma)
    elif name == "multi_step":
        if not isinstance(stepsize, (list, tuple)):
            raise TypeError(f"For multi_step, OPTIM.STEPSIZE must be a list, got {stepsize!r}")
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(stepsize), gamma=gamma
        )
    else:  # cosine
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))

    if optim_cfg.WARMUP_EPOCH > 0:
        if not optim_cfg.WARMUP_RECOUNT:
            scheduler.last_epoch = optim_cfg.WARMUP_EPOCH
        if optim_cfg.WARMUP_TYPE == "constant":
            scheduler = ConstantWarmupScheduler(
                optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_CONS_LR
            )
        elif optim_cfg.WARMUP_TYPE == "linear":
            scheduler = LinearWarmupScheduler(
                optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_MIN_LR
            )
        else:
            raise ConfigError(
                f"Unknown OPTIM.WARMUP_TYPE {optim_cfg.WARMUP_TYPE!r}; use 'constant' or 'linear'"
            )
    return scheduler
