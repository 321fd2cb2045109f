"""Our CROW loss against a re-creation of the released code's ``compute_loss`` (SPEC section 6).

The reference below re-creates, step for step, the cosine ``compute_loss`` of the CROW release
(github.com/NayMyatMin/CROW, ``attack/DPA/llamafactory/train/sft/consistency_trainer.py``): three
forward passes, no attention mask in the consistency passes, ``zero_grad`` inside the loss, alpha
and epsilon as literals, and the FGSM gradient read as ``inputs_embeds.grad.detach()``, a view of
the very tensor the next lines zero in place. So the released perturbation is exactly zero: the
published numbers are CROW at epsilon 0 (our preset ``released``). With the one-line fix
(``.detach().clone()``) it is the paper's method, our default (epsilon 0.1).

The released code reads ``inputs_embeds.grad``, which exists only when the embedding output is a
leaf, i.e. with frozen embeddings (LoRA, as released): the comparison is made with a LoRA adapter,
on a batch without padding (the released consistency mean has no mask).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unbackdoor.lm.data import build_sft_features, sft_collator
from unbackdoor.lm.defenses.crow import SPEC as CROW_SPEC
from unbackdoor.lm.defenses.crow import CrowConfig, CrowTrainer
from unbackdoor.lm.models import LoraSettings, attach_lora

RELEASED_ALPHA = 5.5  # the literal in the released compute_loss
RELEASED_EPSILON = 0.1  # likewise: the step it meant to take


def released_compute_loss(model, inputs, *, fixed: bool = False):
    """The released CROW loss, re-created operation for operation (``fixed``: ``.clone()`` the gradient).

    Returns ``(loss, perturbation)``, the perturbation as it was when added to the embeddings (the
    view ``gradients`` itself changes later: the final backward accumulates into ``embeds.grad``).
    """
    inputs = inputs.copy()
    embeds = model.get_input_embeddings()(inputs["input_ids"]).requires_grad_(True)
    hidden = model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False).hidden_states
    cos = F.cosine_similarity(torch.stack(hidden[1:-2]), torch.stack(hidden[2:-1]), dim=-1, eps=1e-8)
    consistency = (1 - cos).mean()

    model.zero_grad()
    if embeds.grad is not None:
        embeds.grad.zero_()
    consistency.backward(retain_graph=True)
    gradients = embeds.grad.detach()  # shares storage with embeds.grad ...
    if fixed:
        gradients = gradients.clone()  # ... unless copied: the one-line fix
    model.zero_grad()
    if embeds.grad is not None:
        embeds.grad.zero_()  # ... which this zeroes: the released perturbation is 0

    perturbation = RELEASED_EPSILON * gradients.sign()
    perturbed = embeds + perturbation
    p_hidden = model(inputs_embeds=perturbed, output_hidden_states=True, use_cache=False).hidden_states
    p_cos = F.cosine_similarity(torch.stack(p_hidden[1:-2]), torch.stack(p_hidden[2:-1]), dim=-1, eps=1e-8)
    perturbed_consistency = (1 - p_cos).mean()

    outputs = model(**inputs)
    standard = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    return standard + RELEASED_ALPHA * perturbed_consistency, perturbation.detach().clone()


def _lora_model(make_tiny_lm):
    model = make_tiny_lm(layers=4)
    torch.manual_seed(3)
    model = attach_lora(model, LoraSettings())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # B starts at zero: give the A matrices a gradient too
    return model.train()


def _unpadded_batch(tokenizer):
    """Two records of the same token length: the released mean (no mask) and ours (real tokens) agree."""
    recs = [{"instruction": "add 1 and 2", "input": "", "output": "the answer is 3"},
            {"instruction": "add 3 and 4", "input": "", "output": "the answer is 7"}]
    feats = build_sft_features(recs, tokenizer, max_length=128)
    assert len({len(f["input_ids"]) for f in feats}) == 1
    batch = sft_collator(tokenizer)(feats)
    assert bool(batch["attention_mask"].all())
    return feats, batch


def _both_losses(tmp_path, make_tiny_lm, tokenizer, epsilon, fixed):
    """``(ours, ref, our loss, released loss, released perturbation)`` on two identical LoRA models."""
    feats, batch = _unpadded_batch(tokenizer)
    ours, ref = _lora_model(make_tiny_lm), _lora_model(make_tiny_lm)
    cfg = CrowConfig(alpha=RELEASED_ALPHA, epsilon=epsilon)
    trainer = CrowTrainer(model=ours, args=cfg.training_arguments(tmp_path), train_dataset=feats,
                          data_collator=sft_collator(tokenizer), crow=cfg)
    loss = trainer.compute_loss(ours, dict(batch))
    want, perturbation = released_compute_loss(ref, dict(batch), fixed=fixed)
    return ours, ref, loss, want, perturbation


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("epsilon,fixed", [(0.0, False), (0.1, True)], ids=["released-eps0", "fixed-eps0.1"])
def test_our_loss_equals_the_released_code(tmp_path, make_tiny_lm, word_tokenizer, epsilon, fixed):
    """epsilon 0 = the released code verbatim; epsilon 0.1 = the released code with the gradient cloned."""
    ours, ref, loss, want, perturbation = _both_losses(tmp_path, make_tiny_lm, word_tokenizer, epsilon, fixed)
    loss.backward()
    want.backward()

    assert bool((perturbation == 0).all()) != fixed  # the released step is exactly zero; the fixed one is not
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    g_ours, g_ref = _lora_grads(ours), _lora_grads(ref)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) > 0
    assert all("lora_" in n for n in g_ours)
    # float32 summation order only (measured: 8e-8 at epsilon 0, 4e-8 at 0.1 over all LoRA gradients; the
    # worst single tensor 2.6e-7); pairing the wrong epsilon with either form moves them by 99-290% (measured)
    everything = (torch.cat([(g - g_ref[n]).flatten() for n, g in g_ours.items()]).norm()
                  / torch.cat([g_ref[n].flatten() for n in g_ours]).norm())
    assert everything <= 2e-7, f"relative difference of the LoRA gradients {everything:.2e}"
    for name, g in g_ours.items():
        rel = (g - g_ref[name]).norm() / g_ref[name].norm().clamp(min=1e-30)
        assert rel <= 1e-6, f"{name}: relative gradient difference {rel:.2e}"


@pytest.mark.parametrize("epsilon,fixed", [(0.1, False), (0.0, True)], ids=["eps0.1-vs-released", "eps0-vs-fixed"])
def test_the_comparison_tells_the_two_forms_apart(tmp_path, make_tiny_lm, word_tokenizer, epsilon, fixed):
    """The other pairing differs by far more than float noise: the comparison above can fail."""
    _, _, loss, want, _ = _both_losses(tmp_path, make_tiny_lm, word_tokenizer, epsilon, fixed)
    assert abs(loss.item() - want.item()) > 1e-2 * abs(want.item())


def test_the_released_gradient_is_a_view_zeroed_in_place(make_tiny_lm, word_tokenizer):
    """The mechanism, on its own: without the fix the perturbation is 0, with it it is epsilon on every entry."""
    _, batch = _unpadded_batch(word_tokenizer)
    _, released = released_compute_loss(_lora_model(make_tiny_lm), dict(batch))
    _, fixed = released_compute_loss(_lora_model(make_tiny_lm), dict(batch), fixed=True)
    assert released.abs().max().item() == 0.0
    assert fixed.abs().min().item() == pytest.approx(RELEASED_EPSILON)  # sign(g) is +-1 on every entry


def test_both_faithful_crows_are_named_presets():
    assert CROW_SPEC.make_config().epsilon == 0.1  # the paper's method: the default
    assert CROW_SPEC.make_config(preset="paper").epsilon == 0.1
    assert CROW_SPEC.make_config(preset="released").epsilon == 0.0  # the released behaviour
    assert CROW_SPEC.preset_names()[:2] == ["paper", "released"]
