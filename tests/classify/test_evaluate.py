"""Classifier metrics on crafted predictions, and batched prediction on tensors and dicts."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unbackdoor.classify.evaluate import (accuracy, attack_success_rate, der, evaluate_classifier,
                                          metrics_from_predictions, per_class_accuracy, predict, robust_accuracy,
                                          with_der)
from unbackdoor.core.errors import DataError

torch.set_num_threads(1)


def test_asr_and_ra_ignore_images_whose_true_label_is_the_target():
    true = torch.tensor([0, 1, 2, 3, 0, 1])
    pred = torch.tensor([0, 0, 0, 3, 0, 1])
    # non-target images: 1, 2, 3, 1 -> predicted 0, 0, 3, 1
    assert attack_success_rate(pred, true, target=0) == pytest.approx(2 / 4)
    assert robust_accuracy(pred, true, target=0) == pytest.approx(2 / 4)


def test_all_to_all_targets_are_per_sample():
    true = torch.tensor([0, 1, 2, 3])
    target = (true + 1) % 4
    pred = torch.tensor([1, 2, 2, 0])
    assert attack_success_rate(pred, true, target) == pytest.approx(3 / 4)
    assert robust_accuracy(pred, true, target) == pytest.approx(1 / 4)


def test_der_follows_the_backdoorbench_formula():
    assert der(0.95, 0.05, 0.90, 0.88) == pytest.approx((0.90 - 0.02 + 1) / 2)
    assert der(0.95, 0.99, 0.90, 0.95) == pytest.approx(0.5)  # no gain in either direction clamps to 0
    assert der(1.0, 0.0, 0.9, 0.9) == 1.0 and der(0.0, 0.0, 1.0, 0.0) == 0.0


def test_per_class_accuracy_and_target_recall():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    pca = per_class_accuracy(pred, labels, 4)
    assert pca[:3] == pytest.approx([0.5, 2 / 3, 0.0]) and math.isnan(pca[3])
    m = metrics_from_predictions(pred, labels, torch.tensor([0, 0]), torch.tensor([1, 2]), 0, 4)
    assert m["target_recall"] == pytest.approx(0.5)
    assert m["acc"] == pytest.approx(accuracy(pred, labels)) == pytest.approx(3 / 6)
    assert m["asr"] == 1.0 and m["ra"] == 0.0


def test_with_der_adds_der_to_the_after_record():
    after = with_der({"acc": 0.9, "asr": 1.0}, {"acc": 0.85, "asr": 0.1})
    assert after["der"] == pytest.approx((0.9 - 0.05 + 1) / 2)


def test_length_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="3 predictions but 2 labels"):
        accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


class _Picker(nn.Module):
    """Predicts the class stored in the first pixel (x 255), to check batching and uint8 handling."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(cls, 4).float()


def test_predict_batches_uint8_images_and_restores_train_mode():
    x = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 3], dtype=torch.uint8)
    model = _Picker().train()
    pred = predict(model, x, batch_size=3)
    assert pred.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 3, 3]
    assert model.training
    m = evaluate_classifier(model, x, pred, x, torch.zeros(10, dtype=torch.long), target=3, num_classes=4)
    assert m["acc"] == 1.0 and m["target_recall"] == 1.0


def test_predict_accepts_dict_inputs_of_a_hugging_face_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                     max_position_embeddings=8))
    ids = torch.randint(0, 30, (7, 5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pred = predict(model, inputs, batch_size=2)
    with torch.no_grad():
        expect = model.eval()(**inputs).logits.argmax(-1)
    assert pred.tolist() == expect.tolist()
