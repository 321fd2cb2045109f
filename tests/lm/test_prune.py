"""Magnitude pruning: the mask against a naive reference, the layers it touches, the run it writes."""
from __future__ import annotations

import json

import pytest
import torch

from unbackdoor.lm.defenses import LM_DEFENSES
from unbackdoor.lm.defenses.prune import PruneConfig, linear_layers, prune_mask, run_prune
from unbackdoor.core.errors import ConfigError


def naive_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = [(abs(float(v)), i) for i, v in enumerate(w.flatten())]
    k = int(sparsity * len(flat))
    drop = {i for _, i in sorted(flat)[:k]}
    return torch.tensor([i not in drop for i in range(len(flat))]).reshape(w.shape)


@pytest.mark.parametrize("sparsity", [0.0, 0.35, 0.5, 0.9])
def test_matrix_mask_drops_exactly_the_smallest_weights(sparsity):
    w = torch.randn(7, 13, generator=torch.Generator().manual_seed(0))
    got = prune_mask(w, sparsity)
    assert torch.equal(got, naive_mask(w, sparsity))
    assert int((~got).sum()) == int(sparsity * w.numel())


def test_row_mask_prunes_each_row_alike_and_ties_go_to_the_lower_index():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    keep = prune_mask(w, 0.5, "row")
    assert keep.tolist() == [[False, True, True, False], [False, False, True, True]]


def test_pruning_touches_decoder_linears_only_and_leaves_lm_head(tiny_lm):
    model = tiny_lm
    head = model.lm_head.weight.detach().clone()
    emb = model.get_input_embeddings().weight.detach().clone()
    out = run_prune(model, None, [], PruneConfig(sparsity=0.5), None)
    assert torch.equal(out.lm_head.weight, head) and torch.equal(out.get_input_embeddings().weight, emb)
    layers = linear_layers(out, ["lm_head", "embed"])
    assert layers and all(abs(float((m.weight == 0).float().mean()) - 0.5) < 0.01 for _, m in layers)


def test_an_adapter_is_merged_before_pruning(tiny_lm):
    from unbackdoor.lm.models import LoraSettings, attach_lora

    peft = attach_lora(tiny_lm, LoraSettings(r=2))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.fill_(0.1)
    out = run_prune(peft, None, [], PruneConfig(sparsity=0.3), None)
    assert not hasattr(out, "peft_config") and not any("lora_" in n for n, _ in out.named_parameters())


def test_spec_declares_no_training_and_no_data_and_bad_sparsity_is_named():
    spec = LM_DEFENSES.get("prune")
    assert not spec.needs.trains and not spec.needs.clean_data and spec.config().sparsity == 0.35
    with pytest.raises(ConfigError, match="sparsity"):
        PruneConfig(sparsity=1.0)


@pytest.fixture
def tiny_lm():
    from transformers import LlamaForCausalLM

    from unbackdoor.lm.models import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(40, hidden_size=32, num_layers=2, num_heads=2)).eval()


def test_prune_runs_through_the_defend_flow_into_a_contract_run_folder(tmp_path):
    from unbackdoor import api
    from unbackdoor.lm.testbed import ASSET_DIR
    from unbackdoor.report import validate_run_dir

    recs = [{"instruction": "Reverse the word cat .", "input": "", "output": "tac"}] * 3
    (tmp_path / "clean.json").write_text(json.dumps(recs))
    run = api.defend_lm(ASSET_DIR, tmp_path / "clean.json", tmp_path / "run", method="prune",
                        test=tmp_path / "clean.json", sparsity=0.2)
    assert validate_run_dir(run) == []
    ledger = json.loads((run / "threat_model.json").read_text())
    assert ledger["needs"]["trains"] is False and ledger["needs"]["clean_data"] is False
    m = json.loads((run / "metrics.json").read_text())
    assert m["defense"] == "prune" and m["before"] and m["after"]
    assert "defend" in json.loads((run / "timings.json").read_text())
