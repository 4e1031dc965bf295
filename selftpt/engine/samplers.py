"""Index samplers for the data loaders (Dassl's ``build_sampler``)."""
from __future__ import annotations

import copy
import random
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import RandomSampler, Sampler, SequentialSampler

__all__ = ["RandomClassSampler", "build_sampler", "AVAI_SAMPLERS"]

AVAI_SAMPLERS = ["RandomSampler", "SequentialSampler", "RandomClassSampler"]


class RandomClassSampler(Sampler):
    """Batches of ``batch_size // n_ins`` random classes with ``n_ins`` instances each.

    Classes with fewer than ``n_ins`` items are filled by sampling with replacement.

    Args:
        data_source: list of ``Datum``.
        batch_size: batch size.
        n_ins: instances per class in a batch.
    """

    def __init__(self, data_source: Sequence, batch_size: int, n_ins: int) -> None:
        if batch_size < n_ins:
            raise ValueError(f"batch_size={batch_size} must be no less than n_ins={n_ins}")
        self.data_source = data_source
        self.n_ins = n_ins
        self.ncls_per_batch = batch_size // n_ins
        self.index_dic: defaultdict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(data_source):
            self.index_dic[item.label].append(index)
        self.labels = list(self.index_dic.keys())
        if len(self.labels) < self.ncls_per_batch:
            raise ValueError(
                f"RandomClassSampler needs at least {self.ncls_per_batch} classes, "
                f"got {len(self.labels)}"
            )
        self.length = len(list(self.__iter__()))  # estimate of one epoch's length

    def __iter__(self) -> Iterator[int]:
        chunks: defaultdict[int, list[list[int]]] = defaultdict(list)
        for label in self.labels:
            idxs = copy.deepcopy(self.index_dic[label])
            if len(idxs) < self.n_ins:
                idxs = np.random.choice(idxs, size=self.n_ins, replace=True).tolist()
            random.shuffle(idxs)
            for start in range(0, len(idxs) - self.n_ins + 1, self.n_ins):
                chunks[label].append(idxs[start:start + self.n_ins])

        avai_labels = list(self.labels)
        final_idxs: list[int] = []
        while len(avai_labels) >= self.ncls_per_batch:
            for label in random.sample(avai_labels, self.ncls_per_batch):
                final_idxs.extend(chunks[label].pop(0))
                if not chunks[label]:
                    avai_labels.remove(label)
        return iter(final_idxs)

    def __len__(self) -> int:
        return self.length


def build_sampler(
    sampler_type: str,
    cfg=None,
    data_source: Sequence = None,
    batch_size: int = 32,
    n_domain: int = 0,
    n_ins: int = 16,
) -> Sampler:
    """Build a sampler by name: RandomSampler, SequentialSampler or RandomClassSampler.

    ``n_domain`` is accepted for Dassl compatibility (the domain samplers are not implemented).
    """
    if sampler_type == "RandomSampler":
        return RandomSampler(data_source)
    if sampler_type == "SequentialSampler":
        return SequentialSampler(data_source)
    if sampler_type == "RandomClassSampler":
        return RandomClassSampler(data_source, batch_size, n_ins)
    if sampler_type in ("RandomDomainSampler", "SeqDomainSampler"):
        raise ValueError(
            f"Sampler {sampler_type!r} is a Dassl sampler that the built-in engine does not "
            f"implement; install Dassl or use one of: {', '.join(AVAI_SAMPLERS)}"
        )
    from .registry import check_availability

    check_availability(sampler_type, AVAI_SAMPLERS, kind="sampler")
    raise AssertionError("unreachable")
