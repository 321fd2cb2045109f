"""CROW: the loss against a longhand reference, gradient accumulation, padding, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, TrainerCallback

from unbackdoor.core.errors import ConfigError, DataError, ModelError
from unbackdoor.lm.consistency import consistency_loss, layer_cosines, resolve_layer_range
from unbackdoor.lm.data import IGNORE_INDEX, build_sft_features, sft_collator
from unbackdoor.lm.defenses.crow import CrowConfig, CrowTrainer, train_crow
from unbackdoor.lm.models import LoraSettings, attach_lora
from unbackdoor.lm.training import SFTConfig, train_sft


# ---- the pure consistency loss ------------------------------------------------------------------------------


def naive_consistency(hs, mask, start, end):
    """Mean over samples of the mean over (pair, real token) of 1 - cos, written out with loops in float64."""
    per_sample = []
    for b in range(mask.shape[0]):
        tokens = [t for t in range(mask.shape[1]) if mask[b, t] == 1]
        if not tokens:
            continue
        total, count = 0.0, 0
        for lo in range(start, end - 1):
            for t in tokens:
                x, y = hs[lo][b, t].double(), hs[lo + 1][b, t].double()
                total = total + (1 - torch.dot(x, y) / (x.norm() * y.norm()))
                count += 1
        per_sample.append(total / count)
    return sum(per_sample) / len(per_sample)


def test_consistency_loss_matches_the_longhand_definition():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(3, 5, 8, generator=g) for _ in range(6)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    for start, end in [(1, -1), (0, 6), (2, 4)]:
        got = consistency_loss(hs, mask, start, end)
        want = naive_consistency(hs, mask, *resolve_layer_range(6, start, end))
        assert got.dtype == torch.float32 and abs(got.item() - float(want)) < 1e-6


def test_default_layer_range_is_the_official_hs1_to_minus2_pairs():
    assert resolve_layer_range(7, 1, -1) == (1, 6)  # 6 layers: pairs (1,2)..(4,5) = hs[1:-2] vs hs[2:-1]
    hs = [torch.randn(1, 3, 4) for _ in range(7)]
    hs[0] = hs[0] * 0 + 1  # the embedding pair must not count
    hs[6] = -hs[5]  # nor the final-norm pair
    ones = torch.ones(1, 3)
    manual = sum(1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean() for i in range(1, 5)) / 4
    assert torch.allclose(consistency_loss(hs, ones), manual, atol=1e-6)
    with pytest.raises(ConfigError, match="layer range"):
        resolve_layer_range(3, 2, -1)


def test_padding_values_do_not_enter_the_consistency_mean():
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(2, 4, 8, generator=g) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    padded = [torch.cat([h, 100 * torch.randn(2, 3, 8, generator=g)], dim=1) for h in hs]
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    garbage = [h.clone() for h in hs]
    for h in garbage:
        h[1, 2:] = torch.randn(2, 8, generator=g) * 50
    base = consistency_loss(hs, mask)
    assert torch.allclose(base, consistency_loss(padded, padded_mask), atol=1e-7)
    assert torch.allclose(base, consistency_loss(garbage, mask), atol=1e-7)


def test_padding_a_batch_does_not_change_the_models_consistency(make_tiny_lm):
    model = make_tiny_lm(layers=4).eval()
    ids = torch.tensor([[2, 9, 10, 11, 12]])
    padded = torch.tensor([[2, 9, 10, 11, 12, 0, 0, 0], [2, 13, 14, 15, 16, 17, 18, 19]])
    pmask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])
    with torch.no_grad():
        alone = consistency_loss(model(input_ids=ids, output_hidden_states=True).hidden_states, torch.ones_like(ids))
        batch_hs = model(input_ids=padded, attention_mask=pmask, output_hidden_states=True).hidden_states
    first = consistency_loss([h[:1] for h in batch_hs], pmask[:1])
    assert torch.allclose(alone, first, atol=1e-6)


def test_layer_cosines_have_one_value_per_sample_and_pair():
    hs = [torch.randn(2, 3, 4) for _ in range(5)]
    cos = layer_cosines(hs, torch.ones(2, 3))
    assert cos.shape == (2, 4) and bool(((cos >= -1) & (cos <= 1)).all())


# ---- the trainer's loss against a longhand reference --------------------------------------------------------


def naive_crow_loss(model, batch, alpha, epsilon):
    """CROW written out: embed by indexing, LM loss by hand, loops for the cosines, FGSM, second pass."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    E = model.get_input_embeddings().weight[ids]
    if not E.requires_grad:
        E = E.detach().requires_grad_(True)
    out = model(inputs_embeds=E, attention_mask=mask, output_hidden_states=True)
    logits, targets = out.logits[:, :-1].double(), labels[:, 1:]
    keep = targets != IGNORE_INDEX
    lm = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum") / keep.sum()
    n_states = len(out.hidden_states)
    clean = naive_consistency(out.hidden_states, mask, 1, n_states - 1)
    (g,) = torch.autograd.grad(clean, E, retain_graph=True)
    E_adv = E + epsilon * torch.sign(g) * mask[..., None]
    adv_hs = model(inputs_embeds=E_adv, attention_mask=mask, output_hidden_states=True).hidden_states
    adv = naive_consistency(adv_hs, mask, 1, n_states - 1)
    return lm + alpha * adv, lm, adv


def _batch(tokenizer, records, n=3):
    feats = build_sft_features(records[:n], tokenizer, max_length=128)
    batch = sft_collator(tokenizer)(feats)
    assert (batch["attention_mask"] == 0).any(), "the test needs a padded batch"
    return feats, batch


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_crow_loss_and_gradients_match_the_longhand_reference(tmp_path, make_tiny_lm, word_tokenizer, records,
                                                              finetune):
    feats, batch = _batch(word_tokenizer, records)
    models = []
    for _ in range(2):
        m = make_tiny_lm(layers=4)
        if finetune == "lora":
            torch.manual_seed(3)
            m = attach_lora(m, LoraSettings())
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.05)
        models.append(m.train())
    ours, ref = models
    cfg = CrowConfig(finetune=finetune, alpha=5.5, epsilon=0.01)
    trainer = CrowTrainer(model=ours, args=cfg.training_arguments(tmp_path), train_dataset=feats,
                          data_collator=sft_collator(word_tokenizer), crow=cfg)
    loss = trainer.compute_loss(ours, dict(batch))
    loss.backward()
    want, lm, adv = naive_crow_loss(ref, batch, cfg.alpha, cfg.epsilon)
    want.backward()
    assert adv.item() > 0 and lm.item() > 0
    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, want.item())
    compared = 0
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None and q.grad is not None, name
            assert torch.allclose(p.grad, q.grad.to(p.grad.dtype), rtol=1e-4, atol=1e-6), name
            compared += 1
    assert compared > 0


def test_fgsm_step_increases_the_clean_inconsistency(make_tiny_lm):
    """The perturbation goes up the consistency loss (for a small step, where the linearisation holds)."""
    model = make_tiny_lm(layers=4).eval()
    ids, mask = torch.tensor([[2, 9, 10, 11, 12, 13]]), torch.ones(1, 6)
    E = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    clean = consistency_loss(model(inputs_embeds=E, attention_mask=mask, output_hidden_states=True).hidden_states, mask)
    (g,) = torch.autograd.grad(clean, E)
    with torch.no_grad():
        adv = consistency_loss(model(inputs_embeds=E + 1e-3 * g.sign(), attention_mask=mask,
                                     output_hidden_states=True).hidden_states, mask)
    assert adv > clean


# ---- training behaviour ---------------------------------------------------------------------------------------


class GradCapture(TrainerCallback):
    """Copies the accumulated gradients just before the optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class NoLossKwargsLlama(LlamaForCausalLM):
    """A causal LM whose forward takes no ``**kwargs`` (like many custom models): the Trainer cannot hand it
    ``num_items_in_batch``, so CROW's own gradient-accumulation scaling must not be applied twice
    (``Trainer.loss_is_scaled_for_ga``, transformers >= 5.19: the floor this case protects)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                output_hidden_states=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, output_hidden_states=output_hidden_states, use_cache=use_cache)


def _lengths(recs, tok):
    return [len(f["input_ids"]) for f in build_sft_features(recs, tok)]


@pytest.mark.parametrize("method,finetune", [("crow", "lora"), ("crow", "full"), ("sft", "lora"),
                                             ("crow", "full-no-loss-kwargs")])
def test_grad_accumulation_matches_large_batch(tmp_path, make_tiny_lm, word_tokenizer, records, method, finetune):
    """accum 2 x batch 1 gives the gradient and update of batch 2 (two records of different lengths; of
    equal lengths for a model without loss kwargs, whose loss is a per-micro-batch token mean).

    Tolerance: gradients rtol 1e-4 / atol 1e-6, weights after the step atol 1e-6 (float32 sums in another order).
    """
    cls = NoLossKwargsLlama if finetune.endswith("no-loss-kwargs") else LlamaForCausalLM
    finetune = finetune.split("-")[0]
    if cls is LlamaForCausalLM:
        two = [records[0], records[4]]
        assert len(set(_lengths(two, word_tokenizer))) == 2
    else:
        lengths = _lengths(records, word_tokenizer)
        i, j = next((i, j) for i in range(len(records)) for j in range(i + 1, len(records)) if lengths[i] == lengths[j])
        two = [records[i], records[j]]
    results = []
    for batch, accum in [(2, 1), (1, 2)]:
        common = dict(finetune=finetune, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1,
                      max_grad_norm=0.0, save_steps=0, warmup_steps=0.0)
        capture = GradCapture()
        train = train_crow if method == "crow" else train_sft
        cfg = CrowConfig(epsilon=0.01, **common) if method == "crow" else SFTConfig(**common)
        model = train(make_tiny_lm(layers=3, cls=cls), word_tokenizer, two, cfg, tmp_path / f"b{batch}",
                      callbacks=[capture])
        assert len(capture.grads) == 1
        results.append((capture.grads[0], {n: p.detach().clone() for n, p in model.named_parameters()}))
    (g_big, w_big), (g_acc, w_acc) = results
    assert g_big.keys() == g_acc.keys() and len(g_big) > 0
    for name in g_big:
        assert torch.allclose(g_big[name], g_acc[name], rtol=1e-4, atol=1e-6), name
    for name in w_big:
        assert torch.allclose(w_big[name], w_acc[name], atol=1e-6), name


def test_crow_run_logs_both_loss_terms_and_changes_only_the_adapter(tmp_path, make_tiny_lm, word_tokenizer, records):
    import json

    base = make_tiny_lm(layers=3)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    cfg = CrowConfig(max_steps=2, logging_steps=1, save_steps=0, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    model = train_crow(base, word_tokenizer, records, cfg, tmp_path / "crow")
    history = json.loads((tmp_path / "crow" / "log_history.json").read_text())
    logged = [h for h in history if "loss_adv" in h]
    assert len(logged) == 2 and all(h["loss_lm"] > 0 and h["loss_adv"] > 0 for h in logged)
    for h in logged:  # the logged total is L_LM + alpha * L_adv
        assert abs(h["loss"] - (h["loss_lm"] + cfg.alpha * h["loss_adv"])) < 1e-3 * h["loss"]
    for n, p in model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace("base_layer.", "")]), n


# ---- errors ---------------------------------------------------------------------------------------------------


class NoHiddenStates(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.hidden_states = None
        return out


class NoEmbeddings(LlamaForCausalLM):
    def get_input_embeddings(self):
        return None


def test_model_without_hidden_states_is_a_model_error(tmp_path, make_tiny_lm, word_tokenizer, records):
    cfg = CrowConfig(finetune="full", max_steps=1, save_steps=0)
    with pytest.raises(ModelError, match="no hidden states"):
        train_crow(make_tiny_lm(cls=NoHiddenStates), word_tokenizer, records, cfg, tmp_path / "x")


def test_model_without_input_embeddings_is_a_model_error(tmp_path, make_tiny_lm, word_tokenizer, records):
    cfg = CrowConfig(finetune="full", max_steps=1, save_steps=0)
    with pytest.raises(ModelError, match="no input embeddings"):
        train_crow(make_tiny_lm(cls=NoEmbeddings), word_tokenizer, records, cfg, tmp_path / "x")


def test_empty_clean_set_is_a_data_error(tmp_path, make_tiny_lm, word_tokenizer):
    with pytest.raises(DataError, match="clean set is empty"):
        train_crow(make_tiny_lm(), word_tokenizer, [], CrowConfig(), tmp_path / "x")


def test_layer_range_outside_the_model_is_a_config_error(tmp_path, make_tiny_lm, word_tokenizer, records):
    with pytest.raises(ConfigError, match="layer range"):
        train_crow(make_tiny_lm(layers=3), word_tokenizer, records, CrowConfig(layer_start=1, layer_end=9),
                   tmp_path / "x")


@pytest.mark.parametrize("field,value", [("alpha", -1.0), ("epsilon", -0.1), ("learning_rate", 0.0),
                                         ("learning_rate", -1e-3), ("num_train_epochs", 0.0), ("layer_start", -1),
                                         ("layer_end", 2)])
def test_out_of_range_hyperparameters_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"'CrowConfig.{field}'"):
        CrowConfig(**{field: value})


@pytest.mark.parametrize("alias,field", [("lr", "learning_rate"), ("epochs", "num_train_epochs"),
                                         ("grad_accum", "gradient_accumulation_steps"), ("lora_rank", "lora.r")])
def test_old_and_llama_factory_names_are_aliases_in_config_files(alias, field):
    from unbackdoor.core.config import from_dict

    cfg = from_dict(CrowConfig, {alias: 3})
    value = cfg.lora.r if field == "lora.r" else getattr(cfg, field)
    assert value == 3
    with pytest.raises(ConfigError, match="name the same setting"):
        from_dict(CrowConfig, {alias: 3, field.split(".")[0]: 3 if "." not in field else {"r": 3}})


def test_crow_defaults_are_the_papers():
    cfg = CrowConfig()
    assert (cfg.alpha, cfg.epsilon, cfg.learning_rate, cfg.num_train_epochs, cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps) == (5.5, 0.1, 1e-3, 5.0, 2, 4)
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16.0, 0.0, "all-linear")
    assert (cfg.lr_scheduler_type, cfg.warmup_steps, cfg.layer_start, cfg.layer_end) == ("cosine", 0.1, 1, -1)
