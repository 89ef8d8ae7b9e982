"""Classification metrics on integer predictions, and eva-style aggregation over runs.

Balanced accuracy is the mean recall over the classes present in the labels (as sklearn and
torchmetrics compute it); macro F1 averages over classes that occur in labels or predictions.
"""

from __future__ import annotations

import statistics

import torch


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> dict:
    cm = confusion_matrix(labels, preds, num_classes).double()
    true, predicted, hit = cm.sum(1), cm.sum(0), cm.diag()
    present = true > 0
    recall = hit[present] / true[present]
    used = present | (predicted > 0)
    f1 = 2 * hit[used] / (true[used] + predicted[used])  # = 2PR / (P + R), 0 when a class is never hit
    return {
        "accuracy": (hit.sum() / cm.sum()).item(),
        "balanced_accuracy": recall.mean().item(),
        "macro_f1": f1.mean().item(),
        "confusion_matrix": cm.long().tolist(),
    }


def aggregate(runs: list[dict]) -> dict:
    """[{metric: value}, ...] over runs -> {metric: {"mean", "stdev", "values"}} (eva's results.json layout;
    sample standard deviation, 0 for a single run). Non-scalar entries (confusion matrices) are skipped."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if len(values) == len(runs):
            out[key] = {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": values}
    return out
