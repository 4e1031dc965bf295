"""Image-feature cache for evaluation sweeps (``TEST.FEATURE_CACHE``).

Methods that leave CLIP's image encoder untouched (zero-shot CLIP, CoOp, Self-TPT) compute the
same image features for a test split whatever their prompt; only the text side differs. When
``TEST.FEATURE_CACHE`` names a folder, ``ClipTrainer.test`` encodes each image of a split once,
stores the features there, and later evaluations (other seeds, methods, ablations) read them
back instead of decoding and encoding the images again.

An entry is one file ``<folder>/<sha256 of the key>.pt``. The key (``feature_cache_key``) holds
everything the features depend on:

- the image encoder's weights (a digest of its parameters and buffers, dtype included), the
  precision mode and the device type (fp16/amp/CUDA kernels change the numbers);
- the deep prompts installed on the encoder (``selftpt.deep_prompts``: layers and token values),
  when there are any. A trainer whose prompts are made at every forward hands the cache a module
  holding them (``PromptedImageEncoder``), whose digest covers them; prompts applied while a
  split is encoded that neither covers make the cache refuse the entry, and an encoder with
  other forward hooks (of unknown effect) is evaluated without the cache;
- the dataset name, ``SUBSAMPLE_CLASSES``, the split, and the split's ordered list of
  ``(image path, label, file size, mtime)`` (a changed or re-generated image file misses);
- the test transform's ``repr`` (resize, crop, interpolation, normalisation);
- ``FEATURES_VERSION``, bumped whenever what ``encode_images`` returns changes meaning.

Stale entries are never reused: a changed key is another file name, and the full key stored in
the file is compared on reading. Writes are atomic (temporary file in the same folder, fsync,
``os.replace``), and each entry carries the length and a sha256 of its tensors, so a torn or
damaged file is detected, reported and rebuilt. Old entries are not deleted automatically;
removing the folder is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from selftpt.deep_prompts import foreign_forward_hooks, installed_deep_prompts, recording_prompt_use
from selftpt.fsmode import atomic_write

# What ``encode_images`` returns: L2-normalised CLIP image-encoder outputs, in the model dtype.
FEATURES_VERSION = 1
ENTRY_FORMAT = 1

# module -> (signature of its tensors, digest); entries die with their module.
_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _tensor_signature(module: nn.Module) -> tuple:
    # data_ptr changes when a tensor is replaced, _version when it is modified in place.
    return tuple((name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), str(t.device))
                 for name, t in module.state_dict(keep_vars=True).items())


def _hash_tensor(h: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy


def deep_prompts_digest(module: nn.Module) -> str | None:
    """sha256 of the deep prompts installed on ``module`` or inside it (where, which layers,
    token values); None when none are, so the keys of unprompted encoders do not change."""
    installed = [(name, handle) for name, handle in installed_deep_prompts(module) if handle.prompts.n_tokens]
    if not installed:
        return None
    h = hashlib.sha256()
    for name, handle in installed:
        for layer, tokens in handle.prompts.layers.items():
            _hash_tensor(h, f"{name}|{layer}", tokens)
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and values).

    Memoised per module object and invalidated by any in-place change or replacement of one of
    its tensors, so the weights are hashed once per model rather than once per evaluation.
    """
    signature = _tensor_signature(module)
    known = _DIGESTS.get(module)
    if known is not None and known[0] == signature:
        return known[1]
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        _hash_tensor(h, name, tensor)
    digest = h.hexdigest()
    _DIGESTS[module] = (signature, digest)
    return digest


def _images_digest(data_source: list) -> str:
    h = hashlib.sha256()
    for item in data_source:
        try:
            st = os.stat(item.impath)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{item.impath}|{item.label}|{stamp}\n".encode())
    return h.hexdigest()


def feature_cache_key(encoder: nn.Module, precision: str, device: torch.device | str, dataset: str,
                      subsample_classes: str, split: str, data_source: list, transform: Any) -> dict:
    """Everything a split's image features depend on, as a JSON-able dict (see module docstring).

    Args:
        encoder: the frozen image encoder (its weights are hashed).
        precision: the trainer's resolved precision (fp16 | fp32 | amp).
        device: where the features are computed.
        dataset, subsample_classes, split: ``DATASET.NAME``, ``DATASET.SUBSAMPLE_CLASSES``, split.
        data_source: the split's ``Datum`` list, in loader order.
        transform: the split's test transform (its ``repr`` is part of the key).
    """
    key = {
        "features_version": FEATURES_VERSION,
        "encoder_sha256": module_digest(encoder),
        "precision": precision,
        "device": torch.device(device).type,
        "dataset": dataset,
        "subsample_classes": subsample_classes,
        "split": split,
        "num_images": len(data_source),
        "images_sha256": _images_digest(data_source),
        "transform": repr(transform),
    }
    prompts = deep_prompts_digest(encoder)
    if prompts is not None:
        key["deep_prompts_sha256"] = prompts
    return key


def _payload_checksum(features: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (features, labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FeatureCache:
    """A folder of image-feature entries, one file per key.

    Args:
        root: the cache folder (created on the first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def path_for(self, key: dict) -> Path:
        canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
        return self.root / f"{hashlib.sha256(canonical.encode()).hexdigest()[:40]}.pt"

    def load(self, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features (N, D), labels (N,)) of ``key``, or None on a miss or a damaged entry."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            problem = self._check(entry, key)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a damaged entry
            problem = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if problem:
            print(f"Feature cache entry {path} is damaged ({problem}); rebuilding it")
            path.unlink(missing_ok=True)
            return None
        return entry["features"], entry["labels"]

    @staticmethod
    def _check(entry: Any, key: dict) -> str:
        if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT:
            return "not a feature-cache entry of this format"
        if entry.get("key") != key:
            return "its stored key differs from the requested one"
        features, labels = entry.get("features"), entry.get("labels")
        if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
            return "tensors missing"
        n = key["num_images"]
        if features.shape[0] != n or labels.shape[0] != n or entry.get("num_images") != n:
            return f"holds {features.shape[0]} features / {labels.shape[0]} labels for {n} images"
        if entry.get("sha256") != _payload_checksum(features, labels):
            return "checksum mismatch"
        return ""

    def save(self, key: dict, features: torch.Tensor, labels: torch.Tensor) -> Path:
        """Write an entry atomically (a reader sees the old state or the complete new file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        features, labels = features.detach().cpu().contiguous(), labels.detach().cpu().contiguous()
        entry = {"format": ENTRY_FORMAT, "key": key, "num_images": int(features.shape[0]),
                 "features": features, "labels": labels, "sha256": _payload_checksum(features, labels)}
        # fsync: after a power cut the entry is the old or the complete new one, not a torn file
        with atomic_write(path, fsync=True) as f:
            torch.save(entry, f)
        return path


def cached_eval_logits(trainer: Any, split: str, data_loader: Any,
                       root: str | os.PathLike) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) per batch of ``data_loader``, with the image features taken from (or
    written to) the cache under ``root``; falls back to ``model_inference`` when the loader
    does not expose its data source and transform.

    The trainer provides ``image_encoder_for_cache()``, ``encode_images(images)`` and
    ``logits_from_features(features)``. On a miss the features are computed batch by batch
    exactly as without the cache and written once the split is complete; on a hit, the logits
    are computed from the stored features in batches of the loader's size, in the same order.
    """
    dataset = getattr(data_loader, "dataset", None)
    data_source = getattr(dataset, "data_source", None)
    encoder = trainer.image_encoder_for_cache()
    hooked = foreign_forward_hooks(encoder)
    if data_source is None or not hasattr(dataset, "transform") or hooked:
        why = (f"the image encoder has forward hooks of unknown effect ({', '.join(hooked)})" if hooked
               else "this data loader does not expose its images")
        print(f"TEST.FEATURE_CACHE: {why}; evaluating without the cache")
        for batch in data_loader:
            images, labels = trainer.parse_batch_test(batch)
            yield trainer.model_inference(images), labels
        return
    cfg = trainer.cfg
    key = feature_cache_key(encoder, trainer.precision, trainer.device,
                            cfg.DATASET.NAME, cfg.DATASET.get("SUBSAMPLE_CLASSES", "all"), split,
                            list(data_source), dataset.transform)
    if re.search(r" at 0x[0-9a-fA-F]+", key["transform"]):
        print("TEST.FEATURE_CACHE: the test transform's repr holds a memory address, so its cache "
              "entries can never be found again; give the transform a stable __repr__")
    cache = FeatureCache(root)
    hit = cache.load(key)
    if hit is not None:
        features, labels = hit
        print(f"Image features of the {split} split ({len(labels)} images) read from the cache "
              f"{cache.path_for(key)}")
        step = data_loader.batch_size or 1
        for i in range(0, len(labels), step):
            yield (trainer.logits_from_features(features[i:i + step].to(trainer.device)),
                   labels[i:i + step].to(trainer.device))
        return
    print(f"Image features of the {split} split not cached yet: encoding it once into {cache.path_for(key)}")
    all_features, all_labels = [], []
    keyed = [handle for _, handle in installed_deep_prompts(encoder)]
    with recording_prompt_use(encoder) as prompted_by:
        for batch in data_loader:
            images, labels = trainer.parse_batch_test(batch)
            features = trainer.encode_images(images)
            all_features.append(features.detach().cpu())
            all_labels.append(labels.detach().cpu())
            yield trainer.logits_from_features(features), labels
    inside = set(encoder.modules())
    unkeyed = [h for h in prompted_by if h not in keyed and h.source not in inside]
    if unkeyed:  # a trainer bug: another run with other prompts would be served these features
        raise RuntimeError(
            f"{type(trainer).__name__}: deep prompts changed the image features but are not part of the "
            "feature-cache key; image_encoder_for_cache() must return a module holding them "
            "(selftpt.deep_prompts.PromptedImageEncoder), or they must be installed before test()")
    n_encoded = sum(len(f) for f in all_features)
    if n_encoded != key["num_images"]:  # e.g. unreadable images skipped (DATASET.SKIP_CORRUPT_IMAGES)
        print(f"Image features not cached: {n_encoded} of the {key['num_images']} images of the split were encoded")
        return
    cache.save(key, torch.cat(all_features), torch.cat(all_labels))
