"""Numerical faults: a NaN or inf in the loss stops the run with a ``NumericalError`` that names the
step and the loss term, and the last good checkpoint is kept, complete and finite."""
from __future__ import annotations

import pytest
import torch

from .rel_helpers import alpaca_records, tiny_classifier, tiny_images, tiny_lm
from unbackdoor.core.errors import NumericalError
from unbackdoor.core.runs import last_complete_checkpoint
from unbackdoor.core.safeio import load_state_dict


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ---- classifier fit ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_classifier_fit_stops_on_a_non_finite_loss_and_keeps_the_checkpoint(tmp_path, tally, bad):
    from unbackdoor.classify.loop import TrainConfig, fit

    data = tiny_images(64)
    model = tiny_classifier()
    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.05, checkpoint_every=1, augment=False)  # 4 steps / epoch
    calls = {"n": 0}

    def loss_fn(logits, targets, **_):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss * bad if calls["n"] == 10 else loss  # epoch 3, step 2

    with pytest.raises(NumericalError) as e:
        fit(model, data, cfg, loss_fn=loss_fn, checkpoint_dir=tmp_path)
    tally("numerical_faults")
    msg = str(e.value)
    assert "epoch 3, step 2" in msg and "loss" in msg and str(bad) in msg, msg
    assert "after epoch 2" in e.value.where and e.value.fix
    state = load_state_dict(tmp_path / "last" / "model.safetensors")
    assert _all_finite(state)
    import json

    assert json.loads((tmp_path / "last" / "state.json").read_text())["epoch"] == 2


def test_classifier_fit_with_a_huge_learning_rate_stops_cleanly(tmp_path, tally):
    from unbackdoor.classify.loop import TrainConfig, fit

    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30, momentum=0.0, weight_decay=0.0, augment=False,
                      checkpoint_every=1)
    with pytest.raises(NumericalError) as e:
        fit(tiny_classifier(), tiny_images(64), cfg, checkpoint_dir=tmp_path)
    tally("numerical_faults")
    assert "step" in str(e.value) and ("loss" in str(e.value) or "gradient" in str(e.value))
    assert not (tmp_path / "last").exists() or _all_finite(load_state_dict(tmp_path / "last" / "model.safetensors"))


# ---- LM trainer ----------------------------------------------------------------------------------

def _sft_cfg(**kw):
    from unbackdoor.lm.training import SFTConfig

    base = dict(learning_rate=3e-3, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, finetune="full", save_steps=1,
                save_total_limit=10, logging_steps=1, max_length=64, warmup_steps=0.0, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def test_lm_trainer_stops_on_a_nan_loss_at_the_step_it_appears(tmp_path, tally):
    import transformers

    from unbackdoor.lm.training import train_sft

    class Poison(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step + 1 == 4:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    model, tok = tiny_lm()
    with pytest.raises(NumericalError) as e:
        train_sft(model, tok, alpaca_records(16), _sft_cfg(), tmp_path, callbacks=[Poison()])
    tally("numerical_faults")
    msg = str(e.value)
    assert "step 4" in msg and "L_LM" in msg and "nan" in msg, msg
    last = last_complete_checkpoint(tmp_path)
    assert last is not None and last.name == "checkpoint-3", last
    assert str(last) in e.value.fix
    assert _all_finite(load_state_dict(last / "model.safetensors"))


def test_lm_trainer_with_a_huge_learning_rate_stops_cleanly(tmp_path, tally):
    from unbackdoor.lm.training import train_sft

    model, tok = tiny_lm()
    with pytest.raises(NumericalError) as e:
        train_sft(model, tok, alpaca_records(16), _sft_cfg(learning_rate=1e30, max_grad_norm=0.0), tmp_path)
    tally("numerical_faults")
    assert "step" in str(e.value)
    last = last_complete_checkpoint(tmp_path)
    if last is not None:
        assert _all_finite(load_state_dict(last / "model.safetensors"))


def test_crow_trainer_stops_on_a_nan_and_names_the_term(tmp_path, tally):
    import transformers

    from unbackdoor.lm.defenses.crow import CrowConfig, train_crow

    class Poison(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step + 1 == 3:
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.fill_(float("nan"))

    model, tok = tiny_lm(num_layers=3)
    cfg = CrowConfig(max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=1, save_steps=1, save_total_limit=10,
                     logging_steps=1, max_length=64, warmup_steps=0.0, finetune="full")
    with pytest.raises(NumericalError) as e:
        train_crow(model, tok, alpaca_records(16), cfg, tmp_path, callbacks=[Poison()])
    tally("numerical_faults")
    msg = str(e.value)
    assert "step 3" in msg and any(t in msg for t in ("L_LM", "L_adv", "consistency")), msg
    last = last_complete_checkpoint(tmp_path)
    assert last is not None and last.name == "checkpoint-2"
    assert _all_finite(load_state_dict(last / "model.safetensors"))
