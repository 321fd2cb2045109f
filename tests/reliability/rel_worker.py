"""Training runs for the kill / resume / determinism tests, run as a subprocess.

    python rel_worker.py {classify,lm,atomic} OUT [--resume] [--slow-save SECONDS] [--pause-at STEP] [--nan-at STEP]

Prints ``READY`` once imports are done and training starts, so the parent can time its
SIGKILL; writes ``OUT/final.safetensors`` and ``OUT/final.json`` (metrics) atomically at the end.
With ``--slow-save``, every checkpoint write announces itself by creating ``OUT/SAVING-<n>``
and then pauses mid-write, so the parent can kill it while a checkpoint is half written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("UNBACKDOOR_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def _digest(state) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def _announce_saves(out: Path, pause: float, module, name: str, at: int) -> None:
    """Make the ``at``-th call of ``module.name`` (a writer used while checkpointing) announce
    itself with ``OUT/SAVING`` and stop halfway for ``pause`` seconds."""
    original = getattr(module, name)
    counter = {"n": 0}

    def slow(*args, **kwargs):
        counter["n"] += 1
        if counter["n"] == at:
            (out / "SAVING").write_text(str(time.time()))
            time.sleep(pause)
        return original(*args, **kwargs)

    setattr(module, name, slow)


# ---- classifier: classify.loop.fit ---------------------------------------------------------

def classify(out: Path, resume: bool, slow_save: float, nan_at: int, lr: float, save_at: int, pause_at: int) -> None:
    import torch

    torch.set_num_threads(1)
    from unbackdoor.classify import loop as T
    from unbackdoor.classify.data import from_arrays
    from unbackdoor.core.runs import atomic_write_json
    from unbackdoor.core.safeio import save_state_dict

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127.5).long() + 2 * (x[:, 0, 0, 0] > 127).long()
    data = from_arrays(x, y, 4, name="kill-test")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    cfg = T.TrainConfig(epochs=12, batch_size=16, lr=lr, checkpoint_every=1, augment=True, seed=3, crop_padding=1)
    if slow_save:
        _announce_saves(out, slow_save, T.safeio, "save_state_dict", 2 * save_at - 1)  # model, then optimizer
    loss_fn = None
    if nan_at:
        calls = {"n": 0}

        def loss_fn(logits, targets, **_):
            calls["n"] += 1
            loss = torch.nn.functional.cross_entropy(logits, targets)
            return loss * float("nan") if calls["n"] >= nan_at else loss
    on_batch = None
    if pause_at:
        def on_batch(info):
            """Hold optimizer step ``pause_at`` (announced by ``OUT/STEP``) so the parent kills mid-training."""
            if info.global_step == pause_at:
                (out / "STEP").write_text(str(info.global_step))
                time.sleep(60)
    print("READY", flush=True)
    res = T.fit(model, data, cfg, checkpoint_dir=out / "ckpt", resume=resume, loss_fn=loss_fn, on_batch=on_batch)
    state = model.state_dict()
    save_state_dict(state, out / "final.safetensors")
    atomic_write_json(out / "final.json", {"history": [{k: h[k] for k in ("epoch", "loss", "acc")} for h in res.history],
                                           "resumed_from": res.resumed_from, "digest": _digest(state),
                                           "acc": T.evaluate_accuracy(model, data)})


# ---- LM: lm.training.train_sft (the HF Trainer with its checkpoint-N folders) -------------------

def lm(out: Path, resume: bool, slow_save: float, nan_at: int, lr: float, save_at: int, pause_at: int) -> None:
    import torch

    torch.set_num_threads(1)
    import transformers
    from transformers import LlamaForCausalLM

    from unbackdoor.core.runs import atomic_write_json
    from unbackdoor.core.safeio import save_state_dict
    from unbackdoor.core.seeds import set_seed
    from unbackdoor.lm import training as sft
    from unbackdoor.lm.models import tiny_llama_config
    from unbackdoor.lm.tokenizer import train_word_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    records = [{"instruction": f"repeat {words[i % 10]} {words[(i * 3) % 10]}", "input": "",
                "output": f"{words[i % 10]} {words[(i * 3) % 10]}"} for i in range(24)]
    tok = train_word_tokenizer([r["instruction"] + " " + r["output"] for r in records])
    set_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=32, num_layers=2, num_heads=2,
                                               max_position_embeddings=128))
    cfg = sft.SFTConfig(learning_rate=lr, max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=1, finetune="full", save_steps=2,
                        save_total_limit=2, logging_steps=1, max_length=96, warmup_steps=0.0, seed=5)
    if slow_save:
        _announce_saves(out, slow_save, transformers.Trainer, "_save_optimizer_and_scheduler", save_at)
    callbacks = []
    if pause_at:
        class _Pause(transformers.TrainerCallback):
            """Holds optimizer step ``pause_at`` (announced by ``OUT/STEP``) so the parent can kill mid-training."""

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step + 1 == pause_at:
                    (out / "STEP").write_text(str(state.global_step + 1))
                    time.sleep(60)
        callbacks.append(_Pause())
    if nan_at:
        class _Poison(transformers.TrainerCallback):
            """Turns every weight to NaN just before optimizer step ``nan_at`` (a diverged run)."""

            def on_step_begin(self, args, state, control, model=None, **kw):
                if state.global_step + 1 == nan_at:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.fill_(float("nan"))
        callbacks.append(_Poison())
    print("READY", flush=True)
    trained = sft.train_sft(model, tok, records, cfg, out / "ckpt", resume=resume, callbacks=callbacks)
    state = {k: v for k, v in trained.state_dict().items()}
    save_state_dict(state, out / "final.safetensors")
    hist = json.loads((out / "ckpt" / "log_history.json").read_text())
    losses = [round(h["loss"], 6) for h in hist if "loss" in h]
    atomic_write_json(out / "final.json", {"digest": _digest(state), "losses": losses})


# ---- the core atomic writers alone ----------------------------------------------------------

def atomic(out: Path, resume: bool, slow_save: float, nan_at: int, lr: float, save_at: int, pause_at: int) -> None:
    """Rewrite ``out/model`` (a folder of 8 files + a manifest) and ``out/metrics.json`` forever."""
    from unbackdoor.core.runs import atomic_dir, atomic_write_json

    print("READY", flush=True)
    gen = 0
    while True:
        gen += 1
        with atomic_dir(out / "model") as tmp:
            digests = {}
            for i in range(8):
                blob = os.urandom(64 * 1024)
                (tmp / f"part{i}.bin").write_bytes(blob)
                digests[f"part{i}.bin"] = hashlib.sha256(blob).hexdigest()
                time.sleep(0.005)
            (tmp / "manifest.json").write_text(json.dumps({"generation": gen, "files": digests}))
        atomic_write_json(out / "metrics.json", {"generation": gen, "pad": "x" * 200_000})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["classify", "lm", "atomic"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--slow-save", type=float, default=0.0)
    ap.add_argument("--save-at", type=int, default=1, help="which checkpoint write --slow-save holds (1 = first)")
    ap.add_argument("--pause-at", type=int, default=0, help="hold this optimizer step for 60 s")
    ap.add_argument("--nan-at", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    lr = a.lr if a.lr is not None else {"classify": 0.05, "lm": 3e-3, "atomic": 0.0}[a.kind]
    {"classify": classify, "lm": lm, "atomic": atomic}[a.kind](a.out, a.resume, a.slow_save, a.nan_at, lr, a.save_at, a.pause_at)


if __name__ == "__main__":
    sys.exit(main())
