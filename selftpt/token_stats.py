"""PromptAlign's token statistics (Abdul Samadh et al., NeurIPS 2023): per-layer mean and variance
of the ViT's tokens, on the source data (computed once, stored in a file) and on a test image's
views (at every tuning step), and the L1 alignment loss between them.

The tokens of layer l are what enters transformer block l after its deep prompts are placed
(the original code records them there): (L, N, D), class token, patches and prompt tokens. The
statistics are per token position and channel, over the images (source) or the selected views
(test): mean and population variance, each (L, D).

A source-statistics file records a fingerprint of everything its numbers depend on (the
backbone's weights, the prompts, the source images, the transform, the layers); a file made for
other settings is refused in one line naming what differs, never silently reused.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from selftpt.deep_prompts import layer_tokens, vision_tower
from selftpt.errors import UserError
from selftpt.fsmode import atomic_write

STATS_FORMAT = 1


class SourceStatsError(UserError):
    """A source-statistics file that cannot be used for this run."""


@contextlib.contextmanager
def recording_tokens(visual: nn.Module, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the (L, N, D) tokens entering each of ``layers`` of CLIP's ViT during the block.

    The hook sits on the block's first norm (the block computes ``x + attn(ln_1(x))``; EVA's
    ``norm1``), so it sees the tokens after deep prompts placed by the block's own pre-hooks;
    gradients flow. Batch-first blocks see (N, L, D), recorded transposed, so statistics have one layout.
    """
    recorded: dict[int, torch.Tensor] = {}
    handles = []
    tower = vision_tower(visual)
    for layer in layers:
        def hook(module: nn.Module, args: tuple, layer: int = layer) -> None:
            recorded[layer] = layer_tokens(visual, args[0])
        handles.append(tower.block_norm(layer).register_forward_pre_hook(hook))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def token_moments(tokens: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, N, D) tokens -> mean and population variance over the N sequences (or ``rows`` of them), each (L, D)."""
    x = tokens.float() if rows is None else tokens[:, rows].float()
    mean = x.mean(dim=1)
    return mean, ((x - mean.unsqueeze(1)) ** 2).mean(dim=1)


def alignment_loss(test: dict[int, tuple[torch.Tensor, torch.Tensor]], source_mean: torch.Tensor,
                   source_var: torch.Tensor, layers: list[int], weight: float) -> torch.Tensor:
    """``weight * sum_l (0.5 |mu_l - mu_l^src|_1 + 0.5 |var_l - var_l^src|_1)``, L1 as element means.

    Args:
        test: ``{layer: (mean, var)}`` of the test views.
        source_mean, source_var: (len(layers), L, D), row k for ``layers[k]``.
        layers: the aligned layers.
        weight: the factor in front (PromptAlign: DISTR_LOSS_W / (ALIGN_LAYER_TO - ALIGN_LAYER_FROM)).
    """
    total = torch.zeros((), device=source_mean.device)
    for k, layer in enumerate(layers):
        mean, var = test[layer]
        total = total + 0.5 * F.l1_loss(mean, source_mean[k].to(mean)) + 0.5 * F.l1_loss(var, source_var[k].to(var))
    return weight * total


@torch.no_grad()
def source_moments(encode: Callable[[torch.Tensor], Any], visual: nn.Module, layers: list[int],
                   batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and population variance over every source image of the tokens of ``layers``.

    Args:
        encode: runs the prompted image encoder on a batch (its output is not used).
        visual: the ViT whose blocks are recorded.
        layers: the layers to record.
        batches: (B, 3, H, W) image batches.

    Returns:
        mean, var: (len(layers), L, D) in fp32; the number of images. Sums are kept in float64.
    """
    sums = sq = None
    count = 0
    for images in batches:
        with recording_tokens(visual, layers) as recorded:
            encode(images)
        x = torch.stack([recorded[layer].double() for layer in layers])  # (K, L, B, D)
        s, q = x.sum(dim=2), (x * x).sum(dim=2)
        sums, sq = (s, q) if sums is None else (sums + s, sq + q)
        count += x.shape[2]
    if sums is None:
        raise SourceStatsError("The source split has no images to compute PromptAlign's statistics from; "
                               "set TRAINER.PROMPTALIGN.SOURCE_DATASET / SOURCE_SPLIT to a split with images")
    mean = sums / count
    var = (sq / count - mean * mean).clamp_min(0.0)
    return mean.float().cpu(), var.float().cpu(), count


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and values (for fingerprints)."""
    h = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: file {saved.get(k)!r}, now {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]


def read_source_stats(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load a statistics file, refusing (one line) one made for other settings or damaged."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable file gets the same advice)
        raise SourceStatsError(f"Cannot read PromptAlign source statistics {path} ({type(exc).__name__}); "
                               "delete it to recompute them") from None
    if not isinstance(payload, dict) or payload.get("format") != STATS_FORMAT:
        raise SourceStatsError(f"{path} is not a PromptAlign source-statistics file of format {STATS_FORMAT}; "
                               "delete it to recompute them")
    changed = _differences(payload.get("fingerprint", {}), fingerprint)
    if changed:
        raise SourceStatsError(f"PromptAlign source statistics {path} were computed for other settings "
                               f"({'; '.join(changed)}); delete the file to recompute them, or set "
                               "TRAINER.PROMPTALIGN.SOURCE_STATS to another path")
    return payload


def load_or_compute_source_stats(path: Path, fingerprint: dict[str, Any],
                                 compute: Callable[[], tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[dict, bool]:
    """The statistics in ``path`` if it exists (checked against ``fingerprint``), else computed
    once and written atomically. Runs sharing the file (a sweep's targets of one model) hold a
    lock on ``<path>.lock`` meanwhile, so only the first computes. Returns (payload, computed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.is_file():
                return read_source_stats(path, fingerprint), False
            mean, var, count = compute()
            payload = {"format": STATS_FORMAT, "fingerprint": fingerprint, "mean": mean, "var": var,
                       "num_images": count}
            with atomic_write(path) as f:
                torch.save(payload, f)
            return payload, True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stats_path_for(model_dir: str, checkpoint_name: str, epoch: int | None, output_dir: str) -> Path:
    """Next to the loaded model (``<model-dir>/<name>/promptalign_source_stats-<epoch>.pt``), else
    in the run's output folder (prompts from their initialisation)."""
    if model_dir:
        suffix = f"-{epoch}" if epoch is not None else ""
        return Path(model_dir) / checkpoint_name / f"promptalign_source_stats{suffix}.pt"
    return Path(output_dir) / "promptalign_source_stats.pt"

