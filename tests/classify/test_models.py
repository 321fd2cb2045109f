"""Architectures, the generic head finder and the forward helper (tensor and dict inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unbackdoor.classify.models import (PreActResNet18, VGG16BN, build_model, find_head, forward_logits,
                                        num_parameters, preact_resnet_tiny)
from unbackdoor.core.errors import ConfigError, ModelError


def test_preactresnet18_matches_backdoorbench_size_and_head_name():
    m = PreActResNet18(10)
    assert 11_100_000 < num_parameters(m) < 11_200_000  # BackdoorBench's PreActResNet18: 11.17 M
    name, head = find_head(m, 10)
    assert name == "linear" and head.in_features == 512
    assert "linear.weight" in m.state_dict() and not any("normalize" in k for k in m.state_dict())


def test_tiny_preactresnet_runs_on_32px_images_and_shares_the_head_name():
    m = preact_resnet_tiny(10).eval()
    assert num_parameters(m) < 400_000
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert find_head(m, 10)[0] == "linear"


def test_vgg16_bn_head_is_classifier_6_like_torchvision():
    full = VGG16BN(10)
    assert find_head(full, 10)[0] == "classifier.6"
    assert full.classifier[0].in_features == 512 * 7 * 7  # torchvision's layout
    small = VGG16BN(4, hidden=32, pool_size=1, width_div=16).eval()
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert find_head(small, 4)[0] == "classifier.6"


def test_last_matching_linear_wins_and_a_named_path_overrides_it():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 5))
    assert find_head(m, 5)[0] == "3"
    assert find_head(m, 5, path="1")[0] == "1"
    with pytest.raises(ModelError, match="outputs"):
        find_head(m, 7, path="3")
    with pytest.raises(ModelError, match="not nn.Linear"):
        find_head(m, 5, path="2")
    with pytest.raises(ModelError, match="no module"):
        find_head(m, 5, path="fc")


def test_model_without_a_matching_head_lists_the_linear_layers_found():
    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with pytest.raises(ModelError) as e:
        find_head(m, 10)
    msg = str(e.value)
    assert "0 (4->8)" in msg and "1 (8->3)" in msg and "--head" in msg


def test_hugging_face_sequence_classifiers_heads_and_dict_inputs():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=16)).eval()
    # the pooler's dense layer is also 16 -> 16: the head is the last one, 'classifier'
    assert find_head(bert, 16)[0] == "classifier"
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, num_key_value_heads=2,
                                                       intermediate_size=32, num_labels=3, pad_token_id=0)).eval()
    assert find_head(llama, 3)[0] == "score"
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    with torch.no_grad():
        assert forward_logits(llama, inputs).shape == (2, 3)
        assert forward_logits(bert, inputs).shape == (2, 16)


def test_forward_logits_rejects_models_that_do_not_return_logits():
    class Weird(nn.Module):
        def forward(self, x):
            return "nope"
    with pytest.raises(ModelError, match="logits"):
        forward_logits(Weird(), torch.zeros(1))


def test_normalisation_lives_in_the_model_not_in_the_state_dict():
    plain = build_model("preact_resnet_tiny", 10).eval()
    norm = build_model("preact_resnet_tiny", 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    norm.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(norm(x), plain((x - 0.5) / 0.25), atol=1e-5)
    assert norm.normalize.stats == {"mean": [0.5] * 3, "std": [0.25] * 3}


def test_registry_rejects_unknown_names_and_bad_arguments():
    with pytest.raises(ConfigError, match="preactresnet18"):
        build_model("resnet50", 10)
    with pytest.raises(ConfigError, match="bad arguments"):
        build_model("vgg16_bn", 10, depth=3)
    with pytest.raises(ConfigError):
        build_model("preact_resnet_tiny", 1)
