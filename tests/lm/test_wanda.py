"""Wanda and N:M pruning: scores and masks against naive references, the calibration pass, the run's ledger."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.lm.defenses import LM_DEFENSES, LMDefenseContext
from unbackdoor.lm.defenses.common import clean_batches, linear_layers
from unbackdoor.lm.defenses.prune import PruneConfig, WandaConfig, keep_mask, run_prune, run_wanda, wanda_scores
from unbackdoor.lm.defenses.prune.activations import input_norms_one_pass


def naive_wanda(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Score of every weight from its definition: |W_ij| * sqrt(sum over tokens of x_tj^2)."""
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = abs(float(w[i, j])) * float(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) ** 0.5
    return out


def naive_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        k = int(sparsity * len(row))
        for j in sorted(range(len(row)), key=lambda c: (row[c], c))[:k]:
            keep[i, j] = False
    return keep


def naive_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        for g in range(0, len(row), m):
            for j in sorted(range(g, g + m), key=lambda c: (row[c], c))[:n]:
                keep[i, j] = False
    return keep


def test_wanda_scores_are_weight_magnitude_times_input_feature_norm():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 7, generator=g), torch.randn(11, 7, generator=g)
    got = wanda_scores(w, (x * x).sum(0))
    assert torch.allclose(got, naive_wanda(w, x), atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.0, 0.35, 0.5, 0.8])
def test_wanda_mask_drops_the_lowest_scores_of_each_output_row(sparsity):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(6, 16, generator=g), torch.randn(9, 16, generator=g)
    scores = wanda_scores(w, (x * x).sum(0))
    keep = keep_mask(scores, sparsity, "row")
    assert torch.equal(keep, naive_row_mask(scores, sparsity))
    assert (~keep).sum(1).tolist() == [int(sparsity * 16)] * 6


def test_wanda_differs_from_magnitude_when_an_input_feature_is_never_active():
    w = torch.tensor([[0.1, 5.0, 0.2, 0.3]])
    dead_feature = torch.tensor([1.0, 0.0, 1.0, 1.0])  # feature 1 never fires on the clean data
    wanda = keep_mask(wanda_scores(w, dead_feature), 0.25, "row")
    magnitude = keep_mask(w.abs(), 0.25, "row")
    assert wanda.tolist() == [[True, False, True, True]] and magnitude.tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_mask_drops_exactly_n_of_every_m_consecutive_weights(n, m):
    scores = torch.rand(5, 16, generator=torch.Generator().manual_seed(2))
    keep = keep_mask(scores, 0.9, "row", f"{n}:{m}")  # sparsity does not apply to N:M
    assert torch.equal(keep, naive_nm_mask(scores, n, m))
    assert (~keep).reshape(5, 16 // m, m).sum(-1).eq(n).all()


def test_n_of_m_structure_is_checked_where_it_enters():
    with pytest.raises(ConfigError, match="structure"):
        PruneConfig(structure="4:2")
    with pytest.raises(ConfigError, match="structure"):
        WandaConfig(structure="half")


def test_magnitude_2_of_4_runs_on_the_model_and_zeroes_half(make_tiny_lm):
    model = make_tiny_lm(hidden=32)
    out = run_prune(model, None, [], PruneConfig(structure="2:4"), None)
    for _, layer in linear_layers(out, ["lm_head", "embed"]):
        assert (layer.weight == 0).reshape(layer.out_features, -1, 4).sum(-1).eq(2).all()


def test_input_norms_count_real_tokens_only(make_tiny_lm, word_tokenizer, records):
    model = make_tiny_lm().eval()
    layer_name, layer = next((n, m) for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    batches = clean_batches(model, word_tokenizer, records, "alpaca", 128, 3)
    got = input_norms_one_pass(model, [(layer_name, layer)], batches)[layer_name]
    seen: list[torch.Tensor] = []
    h = layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    want = sum(((x[b["attention_mask"].bool()]) ** 2).sum(0) for x, b in zip(seen, batches))
    assert torch.allclose(got, want, rtol=1e-5)
    assert sum(int(b["attention_mask"].sum()) for b in batches) < sum(b["input_ids"].numel() for b in batches)


def _wanda(model, tok, recs, **kw):
    ctx = LMDefenseContext(work_dir=None, template="alpaca")
    return run_wanda(model, tok, recs, WandaConfig(**kw), ctx), ctx


def test_sequential_wanda_matches_one_pass_on_the_first_block_and_measures_later_blocks_after_pruning(
        make_tiny_lm, word_tokenizer, records):
    seq, ctx = _wanda(make_tiny_lm(seed=3), word_tokenizer, records, sparsity=0.5, sequential=True)
    one, _ = _wanda(make_tiny_lm(seed=3), word_tokenizer, records, sparsity=0.5, sequential=False)
    first = [n for n, _ in linear_layers(seq, ["lm_head"]) if ".layers.0." in n]
    later = [n for n, _ in linear_layers(seq, ["lm_head"]) if ".layers.2." in n]
    w_seq, w_one = dict(seq.named_parameters()), dict(one.named_parameters())
    assert all(torch.equal(w_seq[n + ".weight"] == 0, w_one[n + ".weight"] == 0) for n in first)
    assert any(not torch.equal(w_seq[n + ".weight"] == 0, w_one[n + ".weight"] == 0) for n in later)
    assert ctx.record["method"] == "wanda" and ctx.record["calibration_records"] == len(records)
    assert abs(ctx.record["achieved_sparsity"] - 0.5) < 1e-9


def test_wanda_declares_and_needs_clean_data(make_tiny_lm, word_tokenizer):
    spec = LM_DEFENSES.get("wanda")
    assert spec.needs.clean_data and not spec.needs.trains and spec.config().scope == "row"
    with pytest.raises(DataError, match="clean"):
        _wanda(make_tiny_lm(), word_tokenizer, [])


def test_wanda_leaves_embeddings_and_lm_head(make_tiny_lm, word_tokenizer, records):
    model = make_tiny_lm()
    head, emb = model.lm_head.weight.detach().clone(), model.get_input_embeddings().weight.detach().clone()
    out, _ = _wanda(model, word_tokenizer, records)
    assert torch.equal(out.lm_head.weight, head) and torch.equal(out.get_input_embeddings().weight, emb)
    assert isinstance(out.lm_head, nn.Linear)
