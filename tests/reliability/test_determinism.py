"""Determinism: the same config and seed on CPU give identical metrics and weights, for the
classifier defense pipeline (ULRL) and the LM defense pipeline (CROW), at quick settings.
(Resumed runs equal uninterrupted ones: see test_kill_resume.py.)"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path


from .rel_helpers import alpaca_records, save_tiny_lm, tiny_classifier, tiny_images
from unbackdoor.core.safeio import load_state_dict

VOLATILE = {"seconds", "wall_seconds", "peak_memory_mib"}  # wall-clock times and sampled peak RSS: the only values allowed to differ


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        state = load_state_dict(f)
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()


def test_classifier_ulrl_pipeline_is_deterministic(tmp_path, tally):
    from unbackdoor.classify.attacks import attack_config
    from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
    from unbackdoor.classify.flow import defend_loaded

    clean, test = tiny_images(64, seed=1), tiny_images(64, seed=2)
    model = tiny_classifier(seed=0)
    cfg = CLASSIFY_DEFENSES.get("ulrl").make_config(overrides={"batch_size": 16, "unlearn_max_epochs": 2, "relearn_epochs": 2,
                                         "min_clean_per_class": 2})
    attack = attack_config("badnets", patch_size=2)
    runs = []
    for i in range(2):
        out, metrics = defend_loaded(tmp_path / f"run{i}", copy.deepcopy(model), clean, list(range(64)), "ulrl", cfg,
                                   test=test, attack=attack, seed=7)
        runs.append((out, metrics))
        tally("determinism_runs")
    (a, ma), (b, mb) = runs
    assert _strip(ma) == _strip(mb)
    for name in ("ulrl_selection.json", "unlearn_trace.json", "clean_indices.json"):
        if (a / name).exists():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    assert _digest(a / "model") == _digest(b / "model")


def test_lm_crow_pipeline_is_deterministic(tmp_path, tally):
    from unbackdoor.lm.defenses.crow import CrowConfig
    from unbackdoor.lm.evaluate import EvalConfig
    from unbackdoor.lm.flow import defend as defend_model
    from unbackdoor.lm.poison import PoisonConfig

    model_dir = save_tiny_lm(tmp_path / "lm", num_layers=4)
    (tmp_path / "clean.json").write_text(json.dumps(alpaca_records(12)))
    (tmp_path / "test.json").write_text(json.dumps(alpaca_records(20)[12:]))
    cfg = CrowConfig(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1, save_steps=0, logging_steps=1,
                     max_length=64, seed=3)
    outs = []
    for i in range(2):
        out = defend_model(model_dir, tmp_path / "clean.json", tmp_path / f"run{i}", "crow", cfg,
                           test=tmp_path / "test.json", poison=PoisonConfig(), eval_cfg=EvalConfig(max_new_tokens=4))
        outs.append(out)
        tally("determinism_runs")
    a, b = outs
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in outs)
    assert ma["before"] and ma["after"], "the quick run evaluated nothing"
    assert _strip(ma) == _strip(mb)
    assert json.loads((a / "layer_cosine.json").read_text()) == json.loads((b / "layer_cosine.json").read_text())
    assert _digest(a / "model") == _digest(b / "model")
    assert json.loads((a / "env.json").read_text())["seed"] == 3  # the config's seed
