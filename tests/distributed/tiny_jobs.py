"""Tiny CROW and ULRL jobs, run once in one process and once under ``accelerate launch`` (2 processes).

Not a test module (no ``test_`` prefix): ``test_launch.py`` starts it with
``python tiny_jobs.py`` (the single-process reference) and with
``accelerate launch --config_file configs/accelerate/cpu-2proc.yaml tiny_jobs.py`` and
compares the JSON each writes. Both runs use the same GLOBAL batch:

- CROW: one process with micro-batch 2 x accumulation 2 against two processes with
  micro-batch 2 x accumulation 1 (accelerate deals the micro-batches of the same seeded
  order to the ranks, so each optimizer step sees the same 4 records);
- ULRL: batch 16 in both; under two processes each rank computes 8 of the same 16 images
  (``core.distributed.DataParallel``), with BatchNorm synchronised. The model is backdoored
  first (a patch trigger), so ULRL has a clear outlier to find.

Only rank 0 writes ``<out>/<job>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("UNBACKDOOR_QUIET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from unbackdoor.core import distributed as D  # noqa: E402


def _records(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 7
        extra = " please" * (i % 3)
        recs.append({"instruction": f"add {a} and {b}{extra}", "input": "",
                     "output": f"the answer is {a + b}" if i % 2 else str(a + b)})
    return recs


def crow_job(out: Path) -> dict:
    """LoRA CROW on a random 3-layer Llama for 4 optimizer steps of 4 records; then a distributed evaluation."""
    from transformers import LlamaForCausalLM

    from unbackdoor.lm.defenses.crow import CrowConfig, train_crow
    from unbackdoor.lm.evaluate import EvalConfig, evaluate_model, layer_cosine_profile
    from unbackdoor.lm.models import LoraSettings, tiny_llama_config
    from unbackdoor.lm.poison import PoisonConfig, make_triggered_test
    from unbackdoor.lm.tokenizer import train_word_tokenizer

    recs = _records(16)
    tok = train_word_tokenizer([r["instruction"] + " " + r["output"] for r in _records(40)] + ["BadMagic sorry"],
                               extra_tokens=["BadMagic"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=32, num_layers=3, num_heads=2,
                                               max_position_embeddings=128))
    world = D.world_size()
    cfg = CrowConfig(learning_rate=5e-3, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2 // world, warmup_steps=0.0,
                     lr_scheduler_type="constant", logging_steps=1, save_steps=0, max_length=64,
                     lora=LoraSettings(r=4, lora_alpha=8.0), alpha=11.0, epsilon=0.1, seed=0, precision="fp32")
    t0 = time.perf_counter()
    model = train_crow(model, tok, recs, cfg, out / f"crow-trainer-w{world}")
    seconds = time.perf_counter() - t0
    history = json.loads((out / f"crow-trainer-w{world}" / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    poison = PoisonConfig(attack="badnet", task="refusal", seed=0)
    test = _records(12)
    ecfg = EvalConfig(batch_size=4, max_new_tokens=4)
    metrics, gens = evaluate_model(model, tok, test, make_triggered_test(test, poison), poison, ecfg, desc="crow")
    profile = layer_cosine_profile(model, tok, test, batch_size=4)
    return {"world": world, "seconds": seconds,
            "loss": [h["loss"] for h in steps], "loss_lm": [h.get("loss_lm") for h in steps],
            "loss_adv": [h.get("loss_adv") for h in steps], "metrics": metrics, "generations": gens,
            "layer_cosine": profile}


def _blobs(n: int, seed: int):
    """An easy 10-class image set (class colour + noise, 16 x 16): a tiny CNN learns it in a few epochs."""
    from unbackdoor.classify.data import ImageData

    g = torch.Generator().manual_seed(seed)
    palette = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(n) % 10
    x = palette[labels] + 0.25 * torch.randn(n, 3, 16, 16, generator=g)
    return ImageData((x.clamp(0, 1) * 255).round().to(torch.uint8), labels, 10, name=f"blobs-{seed}")


def _with_patch(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    out[:, :, -4:, -4:] = 255  # a white 4 x 4 corner: the BadNets-style trigger
    return out


def _backdoored(data, fraction: float = 0.2, seed: int = 5):
    """``data`` with ``fraction`` of its images patched and relabelled to class 0 (the backdoor target)."""
    from unbackdoor.classify.data import ImageData

    x, y = data.images.clone(), data.labels.clone()
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[: int(fraction * len(y))]
    x[idx], y[idx] = _with_patch(x[idx]), 0
    return ImageData(x, y, data.num_classes, name=f"{data.name}-backdoored")


def _digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ulrl_job(out: Path) -> dict:
    """Backdoor a tiny BatchNorm CNN (fit on a poisoned set), purify it with ULRL on clean data, evaluate it.

    The backdoor makes the target row a clear outlier of the neuron scores (z about 10 against
    < 2 for the others on three CPU instruction sets), and the unlearning accuracies stay well
    away from the stop threshold, so the selection and the stop epoch are outcomes that float
    rounding cannot flip; the trajectories themselves are compared only where the arithmetic is
    the same (step 1, every rank against the others, the evaluation of one fixed model).
    """
    from unbackdoor.classify.evaluate import evaluate_classifier
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.defenses.ulrl import ULRLConfig, run_ulrl
    from unbackdoor.classify.loop import TrainConfig, evaluate_accuracy, fit

    clean, test = _blobs(160, 0), _blobs(60, 1)
    trig = _with_patch(test.images)
    torch.manual_seed(0)
    model = build_model("preact_resnet_tiny", 10, width=8)

    def metrics(m: torch.nn.Module) -> dict:
        return evaluate_classifier(m, test.images, test.labels, trig, test.labels, target=0, num_classes=10,
                                   batch_size=16)

    untrained = {"acc": evaluate_accuracy(model, test, batch_size=16), "metrics": metrics(model)}
    steps: list[list[float]] = []
    t0 = time.perf_counter()
    pre = fit(model, _backdoored(clean), TrainConfig(epochs=5, batch_size=16, lr=0.02, augment=False, seed=0),
              desc="pretrain", on_batch=lambda i: steps.append([i.loss, i.running_acc, i.seen]))
    backdoored = {"digest": _digest(model), "metrics": metrics(model)}
    cfg = ULRLConfig(batch_size=16, unlearn_max_epochs=3, relearn_epochs=2, unlearn_lr=0.01, relearn_lr=0.005,
                     min_clean_per_class=1, augment=True)
    purified, report = run_ulrl(model, clean, cfg, num_classes=10, seed=0)
    seconds = time.perf_counter() - t0
    sel = report.selection
    relearn = [[r["loss"], r["acc"]] for r in report.relearn_log]
    return {"world": D.world_size(), "seconds": seconds,
            "pretrain_steps": steps, "pretrain_loss": [h["loss"] for h in pre.history],
            "untrained": untrained, "backdoored": backdoored["metrics"],
            "unlearn_acc": report.trace["acc"], "unlearn_loss": report.trace["loss"],
            "unlearn_epoch_acc": report.trace["epoch_acc"], "unlearn_epochs": report.trace["epochs"],
            "scores": sel.scores, "z": sel.z, "threshold": sel.threshold, "selected": sel.selected,
            "relearn": relearn, "metrics": metrics(purified),
            "every_rank": D.gather_objects({
                "backdoored_digest": backdoored["digest"], "purified_digest": _digest(purified),
                "pretrain_steps": steps, "unlearn_acc": report.trace["acc"], "unlearn_loss": report.trace["loss"],
                "unlearn_epochs": report.trace["epochs"], "selected": sel.selected, "relearn": relearn}),
            "batchnorm_classes": sorted(
                {type(m).__name__ for m in purified.modules() if "BatchNorm" in type(m).__name__})}


JOBS = {"crow": crow_job, "ulrl": ulrl_job}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="crow,ulrl", help="comma-separated: crow, ulrl")
    p.add_argument("--out", required=True, type=Path, help="folder for <job>.json (rank 0 writes)")
    args = p.parse_args(argv)
    D.init()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in args.jobs.split(","):
        result = JOBS[name](out)
        if D.is_main_process():
            (out / f"{name}-w{result['world']}.json").write_text(json.dumps(result, indent=1))
        D.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
