"""Evaluators (Dassl's ``dassl.evaluation``): registry, factory and ``Classification``."""
from __future__ import annotations

import os.path as osp
from collections import OrderedDict, defaultdict
from typing import Optional, Sequence

import numpy as np
import torch

from .registry import Registry, check_availability
from .utils import mkdir_if_missing

__all__ = [
    "EVALUATOR_REGISTRY",
    "EvaluatorBase",
    "Classification",
    "build_evaluator",
    "macro_f1_score",
    "confusion_matrix_true_normalized",
]

EVALUATOR_REGISTRY = Registry("EVALUATOR")


def macro_f1_score(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Macro-averaged F1 in [0, 1] over the labels present in ``y_true``.

    Per label F1 = 2TP / (2TP + FP + FN), which is 0 when TP = 0 (as scikit-learn's
    ``f1_score(average="macro", labels=np.unique(y_true))`` gives).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return 0.0
    scores = []
    for label in np.unique(y_true):
        tp = np.sum((y_pred == label) & (y_true == label))
        fp = np.sum((y_pred == label) & (y_true != label))
        fn = np.sum((y_pred != label) & (y_true == label))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def confusion_matrix_true_normalized(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    """Confusion matrix over the sorted labels of ``y_true`` and ``y_pred``, each row
    divided by its number of true samples (scikit-learn's ``normalize="true"``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.unique(np.concatenate([y_true, y_pred]))
    index = {label: i for i, label in enumerate(labels)}
    cmat = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for t, p in zip(y_true, y_pred):
        cmat[index[t], index[p]] += 1
    row_sums = cmat.sum(axis=1, keepdims=True)
    return np.divide(cmat, row_sums, out=np.zeros_like(cmat), where=row_sums > 0)


class EvaluatorBase:
    """Interface: ``reset()``, ``process(mo, gt)``, ``evaluate() -> OrderedDict``."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        raise NotImplementedError

    def evaluate(self) -> "OrderedDict[str, float]":
        raise NotImplementedError


@EVALUATOR_REGISTRY.register()
class Classification(EvaluatorBase):
    """Accuracy, error rate and macro-F1 of argmax predictions (+ per-class accuracy when
    ``TEST.PER_CLASS_RESULT``; confusion matrix to ``OUTPUT_DIR/cmat.pt`` when
    ``TEST.COMPUTE_CMAT``)."""

    def __init__(self, cfg, lab2cname: Optional[dict] = None, **kwargs) -> None:
        super().__init__(cfg)
        self._lab2cname = lab2cname
        if cfg.TEST.PER_CLASS_RESULT and lab2cname is None:
            raise ValueError("TEST.PER_CLASS_RESULT needs lab2cname for the Classification evaluator")
        self._per_class = cfg.TEST.PER_CLASS_RESULT
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._total = 0
        self._y_true: list[int] = []
        self._y_pred: list[int] = []
        self._per_class_res: Optional[defaultdict] = defaultdict(list) if self._per_class else None

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        """Accumulate a batch: ``mo`` logits ``(batch, n_cls)``, ``gt`` labels ``(batch,)``."""
        pred = mo.argmax(dim=1)
        matches = pred.eq(gt).int()
        self._correct += int(matches.sum().item())
        self._total += gt.shape[0]
        self._y_true.extend(gt.cpu().tolist())
        self._y_pred.extend(pred.cpu().tolist())
        if self._per_class_res is not None:
            for label, match in zip(gt.cpu().tolist(), matches.cpu().tolist()):
                self._per_class_res[label].append(match)

    def evaluate(self) -> "OrderedDict[str, float]":
        """Print the result block and return ``accuracy``, ``error_rate``, ``macro_f1``
        (percent) [and ``perclass_accuracy``]; the first value is what ``test()`` returns."""
        if self._total == 0:
            raise ValueError("Classification.evaluate(): no samples were processed")
        acc = 100.0 * self._correct / self._total
        err = 100.0 - acc
        macro_f1 = 100.0 * macro_f1_score(self._y_true, self._y_pred)
        results: OrderedDict[str, float] = OrderedDict()
        results["accuracy"] = acc
        results["error_rate"] = err
        results["macro_f1"] = macro_f1
        print(
            "=> result\n"
            f"* total: {self._total:,}\n"
            f"* correct: {self._correct:,}\n"
            f"* accuracy: {acc:.1f}%\n"
            f"* error: {err:.1f}%\n"
            f"* macro_f1: {macro_f1:.1f}%"
        )

        if self._per_class_res is not None:
            print("=> per-class result")
            accs = []
            for label in sorted(self._per_class_res):
                res = self._per_class_res[label]
                correct, total = sum(res), len(res)
                class_acc = 100.0 * correct / total
                accs.append(class_acc)
                print(
                    f"* class: {label} ({self._lab2cname.get(label, '?')})\t"
                    f"total: {total:,}\tcorrect: {correct:,}\tacc: {class_acc:.1f}%"
                )
            mean_acc = float(np.mean(accs))
            print(f"* average: {mean_acc:.1f}%")
            results["perclass_accuracy"] = mean_acc

        if self.cfg.TEST.COMPUTE_CMAT:
            cmat = confusion_matrix_true_normalized(self._y_true, self._y_pred)
            mkdir_if_missing(self.cfg.OUTPUT_DIR)
            save_path = osp.join(self.cfg.OUTPUT_DIR, "cmat.pt")
            torch.save(cmat, save_path)
            print(f"Confusion matrix is saved to {save_path}")
        return results


def build_evaluator(cfg, **kwargs) -> EvaluatorBase:
    """Instantiate the evaluator registered as ``cfg.TEST.EVALUATOR``."""
    check_availability(cfg.TEST.EVALUATOR, EVALUATOR_REGISTRY.registered_names(), kind="evaluator")
    if cfg.VERBOSE:
        print(f"Loading evaluator: {cfg.TEST.EVALUATOR}")
    return EVALUATOR_REGISTRY.get(cfg.TEST.EVALUATOR)(cfg, **kwargs)
