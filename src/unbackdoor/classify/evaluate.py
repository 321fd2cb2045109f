"""Classifier metrics: ACC, ASR, RA, DER, target-class recall and per-class accuracy.

The metric functions are pure (predictions and labels in, numbers out) so tests can check
them on crafted vectors; :func:`predict` is the only part that runs a model (batched, no
grad, eval mode restored afterwards) and it accepts image tensors or dicts of tensors
(Hugging Face sequence classifiers). A defense never calls anything here: evaluation is the
judge's job, not part of removing the backdoor.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core import distributed
from ..core.errors import DataError
from .batching import Inputs, Prepare, default_prepare, model_device, num_samples, take, to_device
from .models import forward_logits


@torch.no_grad()
def predict(model: nn.Module, inputs: Inputs, *, batch_size: int = 256,
            prepare: Prepare | None = None) -> torch.Tensor:
    """Predicted labels (CPU int64) for every sample, batched, without gradients."""
    prepare = prepare or default_prepare
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        n = num_samples(inputs)

        def batch_preds(start: int) -> torch.Tensor:
            batch = to_device(prepare(take(inputs, slice(start, start + batch_size))), device)
            return forward_logits(model, batch).argmax(dim=-1).cpu()

        # under `accelerate launch` each process predicts whole batches; all get every prediction, in order
        preds = distributed.distributed_map(batch_preds, range(0, n, batch_size))
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    finally:
        model.train(was_training)


# ---- pure metrics ----------------------------------------------------------------------------

def _check_same_length(pred: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if pred.shape[0] != labels.shape[0]:
        raise DataError(f"{what}: {pred.shape[0]} predictions but {labels.shape[0]} labels", where=what,
                        fix="evaluate the model on the same samples the labels belong to")


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions (NaN for an empty set)."""
    _check_same_length(pred, labels, "accuracy")
    if labels.numel() == 0:
        return float("nan")
    return float((pred == labels).float().mean())


def _targets(target: int | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        if target.shape != labels.shape:
            raise DataError(f"per-sample targets have shape {tuple(target.shape)}, labels {tuple(labels.shape)}",
                            where="attack targets", fix="give one target label per triggered sample")
        return target.long()
    return torch.full_like(labels, int(target))


def attack_success_rate(pred_triggered: torch.Tensor, true_labels: torch.Tensor,
                        target: int | torch.Tensor) -> float:
    """Fraction of triggered images whose true label is not the target that are classified as the target.

    ``target`` is one label (all-to-one) or one label per sample (all-to-all).
    """
    _check_same_length(pred_triggered, true_labels, "attack success rate")
    tgt = _targets(target, true_labels)
    keep = true_labels != tgt
    if not bool(keep.any()):
        return float("nan")
    return float((pred_triggered[keep] == tgt[keep]).float().mean())


def robust_accuracy(pred_triggered: torch.Tensor, true_labels: torch.Tensor,
                    target: int | torch.Tensor) -> float:
    """Fraction of the same non-target triggered images classified as their true label."""
    _check_same_length(pred_triggered, true_labels, "robust accuracy")
    tgt = _targets(target, true_labels)
    keep = true_labels != tgt
    if not bool(keep.any()):
        return float("nan")
    return float((pred_triggered[keep] == true_labels[keep]).float().mean())


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Recall of each class (NaN for a class absent from ``labels``)."""
    _check_same_length(pred, labels, "per-class accuracy")
    out = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((pred[mask] == c).float().mean()) if bool(mask.any()) else float("nan"))
    return out


def der(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """BackdoorBench's defense effectiveness rating, in [0, 1] (0.5 = no change).

    ``(max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2``.
    """
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def metrics_from_predictions(clean_pred: torch.Tensor, clean_labels: torch.Tensor,
                             triggered_pred: torch.Tensor, triggered_labels: torch.Tensor,
                             target: int | torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The classifier metric record of docs/ARCHITECTURE.md (without ``der``, which needs two models)."""
    pca = per_class_accuracy(clean_pred, clean_labels, num_classes)
    recall = float("nan")
    if not isinstance(target, torch.Tensor) and 0 <= int(target) < num_classes:
        recall = pca[int(target)]
    return {
        "acc": accuracy(clean_pred, clean_labels),
        "asr": attack_success_rate(triggered_pred, triggered_labels, target),
        "ra": robust_accuracy(triggered_pred, triggered_labels, target),
        "target_recall": recall,
        "per_class_acc": pca,
    }


def evaluate_classifier(model: nn.Module, clean_inputs: Inputs, clean_labels: torch.Tensor,
                        triggered_inputs: Inputs, triggered_labels: torch.Tensor, *,
                        target: int | torch.Tensor, num_classes: int, batch_size: int = 256,
                        prepare: Prepare | None = None) -> dict[str, Any]:
    """ACC, ASR, RA, target-class recall and per-class accuracy of one model.

    ``triggered_labels`` are the TRUE labels of the triggered images; images whose true label
    is the target are excluded from ASR and RA.
    """
    clean_pred = predict(model, clean_inputs, batch_size=batch_size, prepare=prepare)
    trig_pred = predict(model, triggered_inputs, batch_size=batch_size, prepare=prepare)
    return metrics_from_predictions(clean_pred, clean_labels.long().cpu(), trig_pred,
                                    triggered_labels.long().cpu(), target, num_classes)


def with_der(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after`` plus its DER against ``before`` (NaN when a metric is missing)."""
    out = dict(after)
    vals = [before.get("asr"), after.get("asr"), before.get("acc"), after.get("acc")]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        out["der"] = float("nan")
    else:
        out["der"] = der(*[float(v) for v in vals])  # type: ignore[arg-type]
    return out


def evaluate_attack(model: nn.Module, test: Any, attack: Any, triggered: Any = None, *,
                    with_predictions: bool = False) -> Any:
    """ACC, ASR, RA, target recall and per-class accuracy of ``model`` against ``attack`` on ``test``.

    ``triggered`` (the triggered test set) is built from ``attack`` when not given. With
    ``with_predictions``: ``(metrics, {"clean": [...], "triggered": [...]})``, every predicted label.
    """
    from .attacks import attack_targets, build_attack

    trig = triggered if triggered is not None else build_attack(attack).triggered_test_set(test)
    target: int | torch.Tensor = (attack.target if attack.mode == "all2one"
                                  else attack_targets(trig.labels, attack, test.num_classes))
    clean_pred = predict(model, test.images)
    trig_pred = predict(model, trig.images)
    metrics = metrics_from_predictions(clean_pred, test.labels.long().cpu(), trig_pred, trig.labels.long().cpu(),
                                       target, test.num_classes)
    if with_predictions:
        return metrics, {"clean": clean_pred.tolist(), "triggered": trig_pred.tolist()}
    return metrics
