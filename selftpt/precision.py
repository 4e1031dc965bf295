"""The precision policy of every trainer, in one place.

``TRAINER.<NODE>.PREC`` takes:

- ``fp32``: fp32 weights, no autocast.
- ``fp16``: CLIP's half weights, as CoOp runs on a GPU.
- ``amp``: fp32 weights, forward passes under ``autocast`` to float16, as TPT runs.
- ``auto``: the trainer's choice on CUDA (``ClipTrainer.AUTO_CUDA_PRECISION``: fp16 for the
  CoOp family, amp for TPT), fp32 elsewhere.

An explicit fp16 or amp is honoured on every device (torch runs both on CPU, slowly), so the
CPU test suite exercises the code paths a GPU user runs.

Whatever the precision, three rules hold (``docs/method.md``, "Precision"):

1. Tuned parameters are fp32 master copies, rendered in the model's dtype where they enter
   CLIP. An adaptive optimiser on an fp16 tensor breaks: Adam's second moment (g² of a 1e-3
   gradient is 1e-6) and its eps (1e-8) underflow, and the update divides by zero.
2. In fp16 and amp, losses are scaled before backward (torch's ``GradScaler``) so that small
   gradients survive the fp16 activations; a step whose gradients overflowed is skipped and
   the scale backs off.
3. Gradients taken with ``torch.autograd.grad`` outside an optimiser step (Self-TPT's gradient
   matching and its class-name adaptation) are scaled the same way by ``GradientScale``.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

PRECISIONS = ("fp16", "fp32", "amp", "auto")
# autocast's dtype for amp, on CUDA and CPU alike: the CPU run is a faithful rehearsal of the GPU one.
AMP_DTYPE = torch.float16


class PrecisionError(ValueError):
    """An unknown PREC value."""


def resolve_precision(precision: str, device: str | torch.device, auto_cuda: str = "fp16") -> str:
    """The precision a run uses: ``auto`` -> ``auto_cuda`` on CUDA, fp32 elsewhere.

    Args:
        precision: one of ``PRECISIONS``.
        device: where the model runs.
        auto_cuda: what ``auto`` means on CUDA (fp16 for CoOp's family, amp for TPT).
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    on_cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return auto_cuda if on_cuda else "fp32"
    if precision in ("fp16", "amp") and not on_cuda:
        warnings.warn(f"PREC {precision} on {torch.device(device).type}: honoured, but slow off a GPU "
                      "(PREC auto runs fp32 here)", stacklevel=2)
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast to float16 when ``precision`` is amp; a disabled context otherwise."""
    return torch.autocast(device.type, dtype=AMP_DTYPE, enabled=precision == "amp")


def make_grad_scaler(device: torch.device, precision: str,
                     init_scale: float = 2.0 ** 16) -> torch.amp.GradScaler | None:
    """torch's dynamic loss scaler for fp16 and amp (None in fp32).

    Args:
        init_scale: torch's default; TPT uses 1000.
    """
    if precision not in ("fp16", "amp"):
        return None
    return torch.amp.GradScaler(device.type, init_scale=init_scale)


class GradientScale:
    """Loss scaling for ``torch.autograd.grad`` in fp16/amp, where no ``GradScaler`` steps an
    optimiser (gradient matching, class-name adaptation).

    The loss is multiplied by ``scale`` before differentiation so that small gradients do not
    flush to zero in fp16 activations, and the gradients are divided by it afterwards. When
    they overflow, the scale is halved and the gradients are taken again: the caller always
    gets finite, unscaled gradients, or a ``FloatingPointError`` when even scale 1 overflows.

    Args:
        enabled: False (fp32) = plain ``autograd.grad``.
        init_scale: first scale (fp16's range is ~6e-8 to 65504: 2^10 lifts gradients of
            1e-10 into it and leaves 60x headroom to a gradient of 1).
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 10) -> None:
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.backoffs = 0  # how often an overflow halved the scale

    def grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor], retain_graph: bool | None = None,
             create_graph: bool = False) -> list[torch.Tensor]:
        """``torch.autograd.grad(loss, inputs)``, finite and unscaled (see the class)."""
        if not self.enabled:
            return list(torch.autograd.grad(loss, inputs, retain_graph=retain_graph, create_graph=create_graph))
        while True:
            grads = torch.autograd.grad(loss * self.scale, inputs, retain_graph=True, create_graph=create_graph)
            if all(bool(torch.isfinite(g).all()) for g in grads):
                return [g / self.scale for g in grads]
            if self.scale <= 1.0:
                raise FloatingPointError("Non-finite gradient even without loss scaling; the loss itself "
                                         "overflows in this precision (try PREC fp32)")
            self.scale /= 2.0
            self.backoffs += 1

