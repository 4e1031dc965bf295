"""Saving/loading checkpoints and network-weight helpers (Dassl's ``torchtools``).

Checkpoints are written atomically (temp file in the same folder + ``os.replace``) and carry
the random-number-generator states, so that a resumed run continues the same random stream.
Epoch checkpoints keep Dassl's names (``<name>/model.pth.tar-<epoch>`` plus the ``checkpoint``
text file naming the latest); ``checkpoint_epochs`` and ``prune_checkpoints`` work on them.
"""
from __future__ import annotations

import errno
import os
import os.path as osp
import pickle
import random
import re
import warnings
from collections import OrderedDict
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from selftpt.fsmode import atomic_write

from .utils import mkdir_if_missing

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "resume_from_checkpoint",
    "restore_checkpoint",
    "IncompleteCheckpointError",
    "DamagedCheckpointError",
    "read_checkpoint_pointer",
    "checkpoint_epochs",
    "prune_checkpoints",
    "get_rng_state",
    "set_rng_state",
    "open_all_layers",
    "open_specified_layers",
    "count_num_param",
    "load_pretrained_weights",
    "init_network_weights",
]


# Dassl's name of the checkpoint saved after an epoch: ``model.pth.tar-<epoch>``.
EPOCH_CHECKPOINT = re.compile(r"model\.pth\.tar-(\d+)")


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint set (one folder per registered model) with no epoch saved for every model."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that ``torch.load`` cannot read: cut short (a copy or download stopped
    midway, a full disk) or damaged on disk. It cannot be repaired, only written again.

    A ``RuntimeError`` (what ``torch.load`` raised for it before) so existing handlers still
    apply; ``train.py`` prints it as one line, with the fix that fits where the file came from.

    Args:
        path: the checkpoint file.
        reason: what ``torch.load`` said, in one line.
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"checkpoint {path} is truncated or damaged and cannot be loaded ({reason}); it cannot be "
            "repaired, only written again: re-run the training that saved it"
        )

    def __reduce__(self):  # picklable despite the custom __init__ (multiprocessing)
        return (type(self), (self.path, self.reason))


def _damage_reason(exc: RuntimeError) -> Optional[str]:
    """torch's reading error for a cut or damaged file, as one line; None for other errors.

    torch reports a bad zip container as ``PytorchStreamReader failed reading ...: <what>.
    This is an internal miniz error. If you are seeing ...`` (several lines); the legacy format
    as ``Invalid magic number; corrupt file?``. Other RuntimeErrors (devices, storages) are not
    the file's fault and pass through unchanged.
    """
    message = str(exc)
    if "PytorchStreamReader" not in message and "corrupt" not in message.lower():
        return None
    return message.split(". This is an internal")[0].strip().splitlines()[0]


def _strip_module_prefix(state_dict: dict) -> "OrderedDict[str, Any]":
    """Drop the ``module.`` prefix that ``nn.DataParallel`` adds to keys."""
    return OrderedDict(
        (k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items()
    )


def get_rng_state() -> dict:
    """Snapshot of Python, NumPy, torch CPU and (if available) CUDA random states."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # plain types so the checkpoint holds no NumPy objects
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot made by :func:`get_rng_state` (missing parts are skipped)."""
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn("CUDA device count changed since the checkpoint; CUDA RNG not restored")


def save_checkpoint(
    state: dict,
    save_dir: str,
    is_best: bool = False,
    remove_module_from_keys: bool = True,
    model_name: str = "",
) -> str:
    """Save ``state`` as ``save_dir/model.pth.tar-<state['epoch']>`` (or ``model_name``).

    Also writes ``save_dir/checkpoint`` (a text file holding the latest file name) and,
    when ``is_best``, ``save_dir/model-best.pth.tar``. Every file is written atomically.

    Returns:
        The path of the saved checkpoint.
    """
    mkdir_if_missing(save_dir)
    if remove_module_from_keys:
        state["state_dict"] = _strip_module_prefix(state["state_dict"])

    fname = model_name or f"model.pth.tar-{state['epoch']}"
    fpath = osp.join(save_dir, fname)
    with atomic_write(fpath) as f:
        torch.save(state, f)
    print(f"Checkpoint saved to {fpath}")
    with atomic_write(osp.join(save_dir, "checkpoint"), "w") as f:
        f.write(f"{fname}\n")

    if is_best:
        best_fpath = osp.join(save_dir, "model-best.pth.tar")
        with atomic_write(best_fpath) as f:
            torch.save(state, f)
        print(f'Best checkpoint saved to "{best_fpath}"')
    return fpath


def load_checkpoint(fpath: str) -> dict:
    """Load a checkpoint (onto CPU when CUDA is unavailable).

    Full unpickling is used (``weights_only=False``): checkpoints are the user's own training
    outputs, and Dassl-made ones pickle whole scheduler objects.  Python-2 pickles are read
    with a latin1 fallback.

    Raises:
        DamagedCheckpointError: the file is cut short or damaged (names the file).
    """
    if fpath is None:
        raise ValueError("File path is None")
    if not osp.exists(fpath):
        raise FileNotFoundError(f'File is not found at "{fpath}"')
    map_location = None if torch.cuda.is_available() else "cpu"
    try:
        try:
            return torch.load(fpath, map_location=map_location, weights_only=False)
        except UnicodeDecodeError:
            return torch.load(fpath, map_location=map_location, weights_only=False, encoding="latin1")
    except (EOFError, pickle.UnpicklingError) as exc:  # a cut or damaged (legacy-format) pickle
        raise DamagedCheckpointError(fpath, f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        # torch's zip reader seeks to where the file's own index points; in a cut file that is
        # past its end: EINVAL, without a file name. Other OSErrors (permissions, I/O) are not damage.
        if exc.errno != errno.EINVAL or exc.filename is not None:
            raise
        raise DamagedCheckpointError(fpath, f"reading it fails: {exc.strerror}") from None
    except RuntimeError as exc:
        reason = _damage_reason(exc)
        if reason is None:
            raise
        raise DamagedCheckpointError(fpath, reason) from None


def read_checkpoint_pointer(fdir: str) -> str:
    """The file name held by ``fdir/checkpoint`` (the latest checkpoint saved in ``fdir``)."""
    pointer = osp.join(fdir, "checkpoint")
    if not osp.isfile(pointer):
        raise FileNotFoundError(f"No 'checkpoint' file in {fdir}; nothing to resume from")
    with open(pointer, "r") as f:
        return f.readline().strip()


def checkpoint_epochs(fdir: str) -> list[int]:
    """Epochs of the ``model.pth.tar-<epoch>`` files in ``fdir``, ascending ([] if none)."""
    if not osp.isdir(fdir):
        return []
    found = (EPOCH_CHECKPOINT.fullmatch(name) for name in os.listdir(fdir))
    return sorted(int(m.group(1)) for m in found if m)


def prune_checkpoints(fdir: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest ``model.pth.tar-<epoch>`` files of ``fdir``.

    ``keep <= 0`` keeps every file (Dassl's behaviour). The file named by ``fdir/checkpoint``
    and ``model-best.pth.tar`` are never deleted.

    Returns:
        The paths deleted.
    """
    if keep <= 0:
        return []
    try:
        latest = read_checkpoint_pointer(fdir)
    except FileNotFoundError:
        latest = ""
    removed = []
    for epoch in checkpoint_epochs(fdir)[:-keep]:
        name = f"model.pth.tar-{epoch}"
        if name != latest:
            os.remove(osp.join(fdir, name))
            removed.append(osp.join(fdir, name))
    return removed


def restore_checkpoint(
    checkpoint: dict,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
) -> int:
    """Load a loaded checkpoint dict into model/optimizer/scheduler and restore its RNG states.

    Returns:
        The saved epoch, i.e. the epoch to start from.
    """
    model.load_state_dict(checkpoint["state_dict"])
    print("Loaded model weights")
    if optimizer is not None and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        print("Loaded optimizer")
    if scheduler is not None and "scheduler" in checkpoint:
        scheduler.load_state_dict(checkpoint["scheduler"])
        print("Loaded scheduler")
    if checkpoint.get("rng_state") is not None:
        set_rng_state(checkpoint["rng_state"])
        print("Restored random number generator states")
    start_epoch = checkpoint["epoch"]
    print(f"Previous epoch: {start_epoch}")
    return start_epoch


def resume_from_checkpoint(
    fdir: str,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    fname: str = "",
) -> int:
    """Load the latest checkpoint named in ``fdir/checkpoint`` (or ``fdir/fname``) into
    model/optimizer/scheduler.

    Restores the RNG states when the checkpoint holds them (``rng_state``).

    Returns:
        The saved epoch, i.e. the epoch to start from.
    """
    fpath = osp.join(fdir, fname or read_checkpoint_pointer(fdir))
    print(f'Loading checkpoint from "{fpath}"')
    return restore_checkpoint(load_checkpoint(fpath), model, optimizer, scheduler)


def open_all_layers(model: nn.Module) -> None:
    """Put ``model`` in train mode and make every parameter trainable."""
    model.train()
    for p in model.parameters():
        p.requires_grad = True


def open_specified_layers(model: nn.Module, open_layers: Union[str, list[str]]) -> None:
    """Train only the named child modules of ``model``; freeze (and eval) the others."""
    if isinstance(model, nn.DataParallel):
        model = model.module
    if isinstance(open_layers, str):
        open_layers = [open_layers]
    for layer in open_layers:
        if not hasattr(model, layer):
            raise AttributeError(f"{layer} is not an attribute of the model")
    for name, module in model.named_children():
        is_open = name in open_layers
        module.train(is_open)
        for p in module.parameters():
            p.requires_grad = is_open


def count_num_param(
    model: Optional[nn.Module] = None, params: Optional[Iterable[Any]] = None
) -> int:
    """Number of parameters of ``model``, or of ``params`` (tensors or param-group dicts)."""
    if model is not None:
        return sum(p.numel() for p in model.parameters())
    if params is not None:
        total = 0
        for p in params:
            if isinstance(p, dict):
                group = p["params"]
                group = [group] if isinstance(group, torch.Tensor) else group
                total += sum(q.numel() for q in group)
            else:
                total += p.numel()
        return total
    raise ValueError("model and params must provide at least one.")


def load_pretrained_weights(model: nn.Module, weight_path: str) -> None:
    """Load the weights of ``weight_path`` whose names and shapes match ``model``.

    Accepts a checkpoint dict (with ``state_dict``) or a bare state dict; strips
    ``module.``; warns when nothing matches; prints the discarded keys.
    """
    checkpoint = load_checkpoint(weight_path)
    state_dict = checkpoint.get("state_dict", checkpoint)
    model_dict = model.state_dict()
    matched, discarded = OrderedDict(), []
    for k, v in _strip_module_prefix(state_dict).items():
        if k in model_dict and model_dict[k].size() == v.size():
            matched[k] = v
        else:
            discarded.append(k)
    model_dict.update(matched)
    model.load_state_dict(model_dict)
    if not matched:
        warnings.warn(f"Cannot load {weight_path} (check the key names manually)")
    else:
        print(f"Successfully loaded pretrained weights from {weight_path}")
        if discarded:
            print(f"Layers discarded due to unmatched keys or size: {discarded}")


def init_network_weights(model: nn.Module, init_type: str = "normal", gain: float = 0.02) -> None:
    """Initialise Conv/Linear weights (normal|xavier|kaiming|orthogonal) and norm layers."""

    def init(m: nn.Module) -> None:
        classname = m.__class__.__name__
        weight = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        if weight is not None and ("Conv" in classname or "Linear" in classname):
            if init_type == "normal":
                nn.init.normal_(weight.data, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(weight.data, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(weight.data, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                nn.init.orthogonal_(weight.data, gain=gain)
            else:
                raise NotImplementedError(f"Unknown init_type {init_type!r}")
            if bias is not None:
                nn.init.constant_(bias.data, 0.0)
        elif ("BatchNorm" in classname or "InstanceNorm" in classname) and weight is not None:
            nn.init.constant_(weight.data, 1.0)
            if bias is not None:
                nn.init.constant_(bias.data, 0.0)

    model.apply(init)
