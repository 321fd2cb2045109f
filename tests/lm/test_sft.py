"""SFT engine: it learns, it resumes to the same weights, and it stops cleanly on NaN."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from unbackdoor.core.errors import ConfigError, NumericalError
from unbackdoor.core.safeio import load_state_dict
from unbackdoor.lm.defenses.crow import CrowConfig, train_crow
from unbackdoor.lm.data import build_sft_features, sft_collator
from unbackdoor.lm.training import FinetuneConfig, SFTConfig, steps_per_epoch, train_sft


def _mean_loss(model, tokenizer, records):
    batch = sft_collator(tokenizer)(build_sft_features(records, tokenizer))
    with torch.no_grad():
        return model(**batch).loss.item()


def test_full_sft_learns_the_responses(tmp_path, make_tiny_lm, word_tokenizer, records):
    model = make_tiny_lm(layers=2)
    before = _mean_loss(model, word_tokenizer, records)
    cfg = SFTConfig(finetune="full", learning_rate=1e-2, max_steps=40, per_device_train_batch_size=4, gradient_accumulation_steps=1, save_steps=0,
                    warmup_steps=0.0, lr_scheduler_type="constant")
    trained = train_sft(model, word_tokenizer, records, cfg, tmp_path / "sft")
    after = _mean_loss(trained, word_tokenizer, records)
    assert after < 0.5 * before, (before, after)
    assert not trained.training


class Interrupt(Exception):
    pass


class KillAt(TrainerCallback):
    """Simulates a killed run: raises at the end of step ``step`` (after earlier checkpoints were written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"killed at step {self.step}")


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.parametrize("method", ["sft", "crow"])
def test_resume_after_interruption_reaches_the_same_weights(tmp_path, make_tiny_lm, word_tokenizer, records, method):
    def run(out, resume=False, callbacks=()):
        if method == "sft":
            cfg = SFTConfig(learning_rate=1e-2, max_steps=6, save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1)
            return train_sft(make_tiny_lm(layers=2), word_tokenizer, records, cfg, out, resume=resume,
                             callbacks=callbacks)
        cfg = CrowConfig(max_steps=6, save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1)
        return train_crow(make_tiny_lm(layers=3), word_tokenizer, records, cfg, out, resume=resume,
                          callbacks=callbacks)

    straight = {n: p.detach().clone() for n, p in run(tmp_path / "a").named_parameters()}
    with pytest.raises(Interrupt):
        run(tmp_path / "b", callbacks=[KillAt(5)])
    assert (tmp_path / "b" / "checkpoint-4").is_dir() and not (tmp_path / "b" / "checkpoint-6").exists()
    # a checkpoint half-written when the process died must be skipped, not loaded
    partial = tmp_path / "b" / "checkpoint-5"
    partial.mkdir()
    (partial / "trainer_state.json").write_text('{"global_step": 5, "log_hi')
    counter = CountSteps()
    resumed = dict(run(tmp_path / "b", resume=True, callbacks=[counter]).named_parameters())
    assert counter.steps == [5, 6], "the resumed run must continue from checkpoint-4, not start over"
    moved = 0
    for name, p in straight.items():
        assert torch.allclose(p, resumed[name], atol=1e-6), name
        moved += int("lora_B" in name and p.abs().sum() > 0)
    assert moved > 0, "the adapter must have trained for the comparison to mean anything"
    history = json.loads((tmp_path / "b" / "log_history.json").read_text())
    assert history[-1]["step"] == 6


class NanAt(TrainerCallback):
    """Makes the forward pass produce NaN from optimizer step ``step`` on (a forward hook on the embeddings)."""

    def __init__(self, model, step):
        self.step, self.armed = step, False
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan") if self.armed else None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 >= self.step


@pytest.mark.parametrize("method", ["sft", "crow"])
def test_nan_loss_stops_the_run_naming_step_and_term_and_keeps_the_last_good_checkpoint(
        tmp_path, make_tiny_lm, word_tokenizer, records, method):
    model = make_tiny_lm(layers=3)
    guard = NanAt(model, step=3)
    out = tmp_path / method
    with pytest.raises(NumericalError) as e:
        if method == "sft":
            train_sft(model, word_tokenizer, records, SFTConfig(max_steps=5, save_steps=1, gradient_accumulation_steps=1), out,
                      callbacks=[guard])
        else:
            train_crow(model, word_tokenizer, records, CrowConfig(max_steps=5, save_steps=1, gradient_accumulation_steps=1), out,
                       callbacks=[guard])
    msg = str(e.value)
    assert "step 3" in msg and "L_LM" in msg and "checkpoint-2" in msg
    assert not (out / "checkpoint-3").exists()
    state = load_state_dict(out / "checkpoint-2" / "adapter_model.safetensors")
    assert state and all(bool(torch.isfinite(t).all()) for t in state.values())


class InfGradAt(TrainerCallback):
    def __init__(self, model, step):
        self.step, self.armed = step, False
        target = next(p for n, p in model.named_parameters() if "lora_A" in n or n.endswith("q_proj.weight"))
        target.register_hook(lambda g: g * float("inf") if self.armed else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 >= self.step


def test_non_finite_gradient_stops_before_the_weights_change(tmp_path, make_tiny_lm, word_tokenizer, records):
    model = make_tiny_lm(layers=2)
    cfg = SFTConfig(finetune="full", max_steps=4, save_steps=1, gradient_accumulation_steps=1, max_grad_norm=0.0)

    class Arm(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.guard = InfGradAt(model, step=2)

        def on_step_begin(self, args, state, control, **kwargs):
            self.guard.on_step_begin(args, state, control)

    with pytest.raises(NumericalError, match="non-finite gradient .* step 2"):
        train_sft(model, word_tokenizer, records, cfg, tmp_path / "g", callbacks=[Arm()])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("field,value", [("learning_rate", 0.0), ("num_train_epochs", 0.0), ("max_steps", 0),
                                         ("gradient_accumulation_steps", 0), ("warmup_steps", -0.5),
                                         ("per_device_train_batch_size", -1), ("max_length", 1)])
def test_sft_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ConfigError, match=f"'SFTConfig.{field}'"):
        SFTConfig(**{field: value})


def test_continue_adapter_needs_lora_and_half_precision_needs_a_gpu():
    with pytest.raises(ConfigError, match="continue_adapter"):
        SFTConfig(finetune="full", continue_adapter=True)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a GPU"):
            SFTConfig(precision="bf16").training_arguments("unused")
        assert SFTConfig().precision_flags() == (False, False)


def test_training_arguments_carry_the_config():
    cfg = FinetuneConfig(learning_rate=3e-4, per_device_train_batch_size=3, gradient_accumulation_steps=5, warmup_steps=0.2, seed=7)
    args = cfg.training_arguments("out")
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed) == \
        (3e-4, 3, 5, 7)
    assert args.lr_scheduler_type == "cosine" and args.get_warmup_steps(100) == 20
    assert FinetuneConfig().learning_rate == 2e-4
    assert steps_per_epoch(100, CrowConfig()) == 13  # 50 micro-batches of 2, accumulated by 4
