"""Unreadable images met during a run: a clear error, or a counted skip when allowed.

Datasets are checked for corrupt files before a run with ``prepare_data.py check
--verify-images``; this covers the ones found only while loading. ``SafeDatasetWrapper``
(passed to Dassl's ``DataManager`` as ``dataset_wrapper``, so it works on both backends)
turns a decoding failure into a one-line ``DatasetError`` naming the file, or, when
``DATASET.SKIP_CORRUPT_IMAGES`` is True, into a placeholder item with label -1 that
``drop_skipped`` removes from the batch before the model sees it.
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from selftpt.errors import DatasetError
from selftpt.toolbox import DatasetWrapper

SKIPPED_LABEL = -1


class SafeDatasetWrapper(DatasetWrapper):
    """Dassl's ``DatasetWrapper`` that reports (or, if allowed, skips) unreadable images."""

    def __getitem__(self, idx: int) -> dict:
        try:
            return super().__getitem__(idx)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            # PIL raises OSError/UnidentifiedImageError (and, for some formats, SyntaxError
            # or ValueError) on truncated or corrupt files
            item = self.data_source[idx]
            if not self.cfg.DATASET.SKIP_CORRUPT_IMAGES:
                raise DatasetError(
                    self.cfg.DATASET.NAME, f"unreadable image ({type(exc).__name__}: {exc})", item.impath,
                    "re-extract it from the dataset archive (find all with `python prepare_data.py check "
                    "--verify-images`), or set DATASET.SKIP_CORRUPT_IMAGES True to skip such images",
                ) from None
            return self._placeholder(idx, item)

    def _placeholder(self, idx: int, item: Any) -> dict:
        """An item of the right shape with label -1, built from a blank image."""
        size = tuple(self.cfg.INPUT.SIZE)
        blank = Image.new("RGB", (size[1], size[0]))
        tfm = self.transform[0] if isinstance(self.transform, (list, tuple)) else self.transform
        img = tfm(blank) if tfm is not None else torch.zeros(3, *size)
        return {"label": SKIPPED_LABEL, "domain": item.domain, "impath": item.impath, "index": idx, "img": img}


def drop_skipped(batch: dict, skipped: set[str]) -> dict:
    """Remove placeholder items (label -1) from a collated batch; record their paths."""
    keep = batch["label"] != SKIPPED_LABEL
    if bool(keep.all()):
        return batch
    skipped.update(p for p, k in zip(batch["impath"], keep.tolist()) if not k)
    return {key: (value[keep] if torch.is_tensor(value) and value.shape[:1] == keep.shape
                  else [v for v, k in zip(value, keep.tolist()) if k] if isinstance(value, list) else value)
            for key, value in batch.items()}
