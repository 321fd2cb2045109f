"""The shared training loop: resume equivalence, NaN guard, hooks, custom losses, saving and loading."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.classify.attacks import attack_config
from unbackdoor.classify.loop import TrainConfig, evaluate_accuracy, fit
from unbackdoor.classify.model_io import load_classifier, save_classifier
from unbackdoor.classify.victim import train_backdoored
from unbackdoor.classify.models import preact_resnet_tiny
from unbackdoor.core.errors import ConfigError, ModelError, NumericalError


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(16, 10))


class _Killed(Exception):
    pass


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=32, lr=0.05, checkpoint_every=1, scheduler="cosine", seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(random_images, tmp_path):
    torch.manual_seed(0)
    full = _net()
    fit(full, random_images, _cfg())

    def kill_after_second_epoch(info):
        if info.epoch == 2:  # epochs are 0-based: killed after the 3rd epoch's training, before its checkpoint
            raise _Killed
    torch.manual_seed(0)
    first = _net()
    with pytest.raises(_Killed):
        fit(first, random_images, _cfg(), checkpoint_dir=tmp_path, on_epoch_end=kill_after_second_epoch)
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    assert state["epoch"] == 2

    torch.manual_seed(123)  # a different init and RNG: everything must come from the checkpoint
    resumed = _net()
    result = fit(resumed, random_images, _cfg(), checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from == 2 and result.epochs_done == 4 and len(result.history) == 4
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_non_finite_loss_raises_naming_the_step_and_keeps_the_last_checkpoint(random_images, tmp_path):
    calls = {"n": 0}

    def loss_fn(logits, targets, **_):
        calls["n"] += 1
        loss = F.cross_entropy(logits, targets)
        return loss * float("nan") if calls["n"] == 6 else loss  # 4 steps per epoch: epoch 2, step 2
    torch.manual_seed(0)
    with pytest.raises(NumericalError) as e:
        fit(_net(), random_images, _cfg(), loss_fn=loss_fn, checkpoint_dir=tmp_path)
    msg = str(e.value)
    assert "epoch 2, step 2" in msg and "after epoch 1" in msg
    assert json.loads((tmp_path / "last" / "state.json").read_text())["epoch"] == 1
    model = _net()
    from unbackdoor.core.safeio import load_into
    load_into(model, tmp_path / "last" / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_infinite_gradient_is_caught_even_with_a_finite_loss(random_images):
    def loss_fn(logits, targets, *, model, **_):
        return F.cross_entropy(logits, targets) + (model[-1].bias * 0).sum() * float("inf")
    with pytest.raises(NumericalError):
        fit(_net(), random_images, _cfg(epochs=1), loss_fn=loss_fn)


def test_negated_loss_with_a_stop_hook_unlearns_and_stops_early(random_images):
    torch.manual_seed(0)
    model = _net()
    fit(model, random_images, _cfg(epochs=15, checkpoint_every=0, augment=False))
    seen = []

    def stop(info):
        seen.append(info.running_acc)
        return info.running_acc <= 0.2
    r = fit(model, random_images, _cfg(epochs=20, lr=0.01, checkpoint_every=0, grad_clip=20.0, augment=False),
            loss_fn=lambda logits, y, **_: -F.cross_entropy(logits, y), on_batch=stop)
    assert r.stopped_early and seen[-1] <= 0.2 and r.global_step == len(seen)


def test_grad_clip_bounds_the_reported_norm_and_parameters_filter_what_trains(random_images):
    torch.manual_seed(0)
    model = _net()
    frozen = model[0].weight.detach().clone()
    norms = []
    fit(model, random_images, _cfg(epochs=1, lr=1.0, grad_clip=0.5, checkpoint_every=0),
        parameters=model[-1].parameters(), on_batch=lambda i: norms.append(i.grad_norm))
    assert torch.equal(model[0].weight, frozen)
    assert norms and all(n > 0 for n in norms)


def test_fit_accepts_batches_of_dict_inputs():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.classifier = nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            h = (self.emb(input_ids) * attention_mask[..., None]).sum(1)
            return {"logits": self.classifier(h)}
    g = torch.Generator().manual_seed(0)
    batches = [({"input_ids": torch.randint(0, 20, (8, 5), generator=g), "attention_mask": torch.ones(8, 5)},
                torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    r = fit(DictModel(), batches, TrainConfig(epochs=2, batch_size=8, lr=0.1))
    assert r.global_step == 6 and r.history[-1]["steps"] == 3


def test_train_backdoored_saves_a_model_that_loads_without_unpickling(tiny_world_small, tmp_path):
    train, test = tiny_world_small
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=1)
    model = train_backdoored(train, attack_config("badnets", rate=0.1), "preact_resnet_tiny", cfg, tmp_path / "m",
                             model_kwargs={"width": 4}, normalization=((0.5,) * 3, (0.25,) * 3))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["architecture"] == "preact_resnet_tiny" and meta["kwargs"] == {"width": 4}
    assert meta["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3} and meta["head"] == "linear"
    assert len(meta["poisoned_indices"]) == 20 and meta["attack"]["name"] == "badnets"
    loaded = load_classifier(tmp_path / "m")
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert 0 <= evaluate_accuracy(loaded, test) <= 1
    with pytest.raises(ModelError, match="model.json"):
        load_classifier(tmp_path)


def test_save_classifier_refuses_a_model_without_a_head(tmp_path):
    with pytest.raises(ModelError):
        save_classifier(nn.Sequential(nn.Linear(3, 4)), tmp_path, architecture="x", num_classes=10)
    save_classifier(preact_resnet_tiny(10, width=2), tmp_path / "ok", architecture="preact_resnet_tiny",
                    num_classes=10, kwargs={"width": 2})
    assert load_classifier(tmp_path / "ok" / "model.json").linear.in_features == 16


def test_train_config_rejects_out_of_range_values():
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="grad_clip"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(ConfigError, match="resume"):
        fit(_net(), [], TrainConfig(epochs=1), resume=True)
