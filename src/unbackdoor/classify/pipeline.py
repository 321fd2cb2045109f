"""The classifier pipeline: poison -> train -> defend with a clean subset -> evaluate -> run folders.

Everything the ``unbackdoor classify`` commands and the demo do lives here as plain functions;
the CLI only parses. One run folder per (attack, defense, seed), exactly as docs/ARCHITECTURE.md
describes, so sweeps and the report read every defense the same way.

The tiny world (SPEC section 4) is the built-in testbed: 32x32 shapes in 10 classes, a narrow
PreActResNet, BadNets / Blended backdoors. Training a backdoored model takes minutes on a CPU,
so small fixed-seed checkpoints ship in ``unbackdoor/assets/classify/`` (regenerate them with
``python scripts/efficacy_classify.py --make-assets``); any other seed is trained on demand and
cached.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core import safeio
from ..core.config import option
from ..core.errors import ConfigError, DataError, ModelError
from ..core.runs import RunDir, atomic_dir, read_json
from ..core.seeds import set_seed
from .attacks import AttackConfig, build_attack
from .baselines import FPConfig, FTConfig, NADConfig, run_fp, run_ft, run_nad
from .data import ImageData, stratified_subset
from .evaluate import evaluate_classifier, with_der
from .models import forward_logits
from .ulrl import ULRLConfig, run_ulrl

log = logging.getLogger("unbackdoor")

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "classify"

# name -> (config class, function(model, clean, cfg, run_dir, *, num_classes, seed) -> (model, report))
DEFENSES: dict[str, tuple[type, Callable[..., tuple[nn.Module, Any]]]] = {
    "ulrl": (ULRLConfig, run_ulrl),
    "ft": (FTConfig, run_ft),
    "fp": (FPConfig, run_fp),
    "nad": (NADConfig, run_nad),
}


# ---- the tiny world's settings --------------------------------------------------------------------

@dataclass
class TinySettings:
    """How the tiny-world classifiers are built (fixed, so shipped checkpoints stay valid)."""

    n_train: int = option(5000, "training images")
    n_test: int = option(2000, "test images")
    model: str = option("preact_resnet_tiny", "architecture (models.MODELS)")
    width: int = option(8, "network width (8: 78k parameters; a 2-core CPU trains it in minutes)")
    epochs: int = option(25, "backdoor training epochs (15 left the Blended backdoor under ASR 0.9 on 2 of 5 seeds)")
    lr: float = option(0.05, "backdoor training learning rate (cosine schedule)")
    flip: bool = option(False, "horizontal flips while training (off: a flip moves the BadNets patch to the other "
                               "corner and halves the trigger's consistency in a short budget)")
    clean_count: int = option(500, "clean samples the defender gets (10% of the training set: the tiny world's "
                                    "counterpart of CIFAR-10's 500 images)")


TINY = TinySettings()


def tiny_world(seed: int, settings: TinySettings = TINY) -> tuple[ImageData, ImageData]:
    from .tinyworld import make_tiny_world

    return make_tiny_world(seed, settings.n_train, settings.n_test)


def tiny_asset_dir(attack: str, seed: int) -> Path:
    return ASSETS / f"tinyworld-{attack}-seed{seed}"


def train_tiny_backdoored(attack: str, seed: int, out_dir: str | Path | None, *, settings: TinySettings = TINY,
                          data: tuple[ImageData, ImageData] | None = None) -> nn.Module:
    """Train the tiny world's backdoored model for ``attack`` and ``seed`` (BackdoorBench defaults:
    all-to-one, target 0, 10% poisoned) and save it to ``out_dir`` (``model.json`` + safetensors)."""
    from .train import TrainConfig, train_backdoored
    from .transforms import TINY_WORLD_MEAN, TINY_WORLD_STD

    train, _ = data or tiny_world(seed, settings)
    set_seed(seed)
    cfg = TrainConfig(epochs=settings.epochs, lr=settings.lr, flip=settings.flip, seed=seed)
    return train_backdoored(train, AttackConfig(name=attack, seed=seed), settings.model, cfg, out_dir,
                            model_kwargs={"width": settings.width},
                            normalization=(TINY_WORLD_MEAN, TINY_WORLD_STD), init_seed=seed)


def tiny_backdoored(attack: str, seed: int, cache_dir: str | Path | None = None, *,
                    settings: TinySettings = TINY, data: tuple[ImageData, ImageData] | None = None
                    ) -> tuple[nn.Module, Path]:
    """The backdoored tiny-world model: the shipped checkpoint, else a cached one, else trained now."""
    from .train import load_classifier

    for folder in [tiny_asset_dir(attack, seed)] + ([Path(cache_dir) / f"tinyworld-{attack}-seed{seed}"] if cache_dir else []):
        if (folder / "model.json").is_file():
            return load_classifier(folder), folder
    if cache_dir is None:
        raise ModelError(f"no shipped tiny-world checkpoint for attack '{attack}', seed {seed}",
                         where=str(tiny_asset_dir(attack, seed)), fix="pass cache_dir= to train one (a few CPU minutes)")
    folder = Path(cache_dir) / f"tinyworld-{attack}-seed{seed}"
    log.info("training the backdoored tiny-world model %s (a few CPU minutes; cached in %s)", folder.name, folder)
    with atomic_dir(folder) as tmp:  # a killed run leaves no half-written cache entry
        train_tiny_backdoored(attack, seed, tmp, settings=settings, data=data)
    return load_classifier(folder), folder


# ---- data on disk -------------------------------------------------------------------------------

def load_data(spec: str | Path, *, train: bool = True, size: int | None = None) -> ImageData:
    """An image set from ``spec``: ``tinyworld:SEED``, a ``.safetensors`` file written by :func:`save_data`,
    a CIFAR-10 / CIFAR-100 python folder, or a class-per-folder image tree (``size`` resizes)."""
    from . import data as D

    text = str(spec)
    if text.startswith("tinyworld:"):
        try:
            seed = int(text.split(":", 1)[1])
        except ValueError:
            raise DataError(f"bad tiny-world spec '{text}'", where="data argument", fix="write tinyworld:SEED, e.g. tinyworld:0") from None
        tr, te = tiny_world(seed)
        return tr if train else te
    path = Path(text)
    if path.suffix == ".safetensors":
        state = safeio.load_state_dict(path)
        missing = [k for k in ("images", "labels", "num_classes") if k not in state]
        if missing:
            raise DataError(f"{path.name} lacks {missing}", where=str(path),
                            fix="write image sets with save_data / 'unbackdoor classify poison'")
        return ImageData(state["images"], state["labels"], int(state["num_classes"]), name=path.stem)
    if not path.exists():
        raise DataError(f"data not found: {path}", where=str(path),
                        fix="pass tinyworld:SEED, a .safetensors image set, a CIFAR folder or a class-per-folder tree")
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if "cifar-10-batches-py" in names or "data_batch_1" in names:
        return D.load_cifar10(path, train=train)
    if "cifar-100-python" in names or ("meta" in names and "train" in names and (path / "train").is_file()):
        return D.load_cifar100(path, train=train)
    sub = path / ("train" if train else "test")
    return D.load_image_folder(sub if sub.is_dir() else path, size=size)


def save_data(data: ImageData, path: str | Path) -> Path:
    """Write an image set as one safetensors file (uint8 images, labels, class count), atomically."""
    return safeio.save_state_dict({"images": data.images, "labels": data.labels,
                                   "num_classes": torch.tensor(data.num_classes)}, path)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A classifier folder written by this package (``model.json`` + ``model.safetensors``), and its metadata."""
    from .train import load_classifier

    path = Path(path)
    folder = path.parent if path.is_file() else path
    return load_classifier(folder), read_json(folder / "model.json")


def save_model(model: nn.Module, out_dir: str | Path, meta: dict[str, Any] | None) -> Path:
    """``out_dir/model.safetensors`` (+ ``model.json`` when the architecture is known), replaced atomically."""
    from .train import save_classifier

    with atomic_dir(out_dir) as tmp:
        if meta and "architecture" in meta:
            kwargs = dict(meta.get("kwargs") or {})
            norm = meta.get("normalization")
            extra = {k: v for k, v in meta.items() if k in ("attack", "dataset")}
            if norm:
                kwargs.update(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
            save_classifier(model, tmp, architecture=meta["architecture"], num_classes=int(meta["num_classes"]),
                            kwargs=kwargs, extra=extra)
        else:
            safeio.save_state_dict(model.state_dict(), tmp / "model.safetensors")
    return Path(out_dir)


# ---- defend and evaluate --------------------------------------------------------------------------

def make_config(method: str, cfg: Any = None, *, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """The config object of a defense: given, a ULRL preset, or defaults, with ``overrides`` applied."""
    if method not in DEFENSES:
        raise ConfigError(f"unknown defense '{method}'", where="defense method", fix=f"use one of: {', '.join(DEFENSES)}")
    cls = DEFENSES[method][0]
    if cfg is None:
        if preset is not None:
            if method != "ulrl":
                raise ConfigError(f"presets exist only for ULRL, not '{method}'", where="--preset", fix="drop --preset")
            cfg = ULRLConfig.preset(preset)
        else:
            cfg = cls()
    if not isinstance(cfg, cls):
        raise ConfigError(f"defense '{method}' needs a {cls.__name__}, got {type(cfg).__name__}", where="defense config",
                          fix=f"pass a {cls.__name__}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def defend(model: nn.Module, clean: Any, method: str, cfg: Any = None, run_dir: RunDir | None = None, *,
           seed: int = 0, num_classes: int | None = None) -> tuple[nn.Module, Any]:
    """Run one defense (``ulrl``, ``ft``, ``fp``, ``nad``) on a copy of ``model`` with the clean data only."""
    cfg = make_config(method, cfg)
    check_images_fit(model, clean)
    set_seed(seed)
    return DEFENSES[method][1](model, clean, cfg, run_dir, num_classes=num_classes, seed=seed)


def check_images_fit(model: nn.Module, clean: Any) -> None:
    """Refuse clean images the model cannot take (channels, size) before any training starts."""
    images = getattr(clean, "images", None)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        return  # dict inputs (text models) are checked by the model itself
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != images.shape[1]:
        raise DataError(f"clean images have {images.shape[1]} channel(s), the model's first convolution expects "
                        f"{conv.in_channels}", where="clean data, field 'images'",
                        fix="convert the images to the model's mode (e.g. RGB for 3 channels) when loading them")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward_logits(model, images[:2].float() / 255)
    except RuntimeError as e:
        raise DataError(f"clean images of {images.shape[1]} channel(s) and size {tuple(images.shape[2:])} do not fit "
                        f"the model ({str(e).splitlines()[0]})", where="clean data, field 'images'",
                        fix="give images with the channels and size the model was trained on "
                            "(e.g. RGB, --size 32)") from None
    finally:
        model.train(was_training)


def evaluate_attack(model: nn.Module, test: ImageData, attack: AttackConfig,
                    triggered: ImageData | None = None) -> dict[str, Any]:
    """ACC, ASR, RA, target recall, per-class accuracy of ``model`` against ``attack`` on ``test``."""
    from .attacks import attack_targets

    trig = triggered if triggered is not None else build_attack(attack).triggered_test_set(test)
    target: int | torch.Tensor = attack.target if attack.mode == "all2one" else attack_targets(trig.labels, attack, test.num_classes)
    return evaluate_classifier(model, test.images, test.labels, trig.images, trig.labels, target=target,
                               num_classes=test.num_classes)


def report_json(report: Any) -> Any:
    return report.to_json() if hasattr(report, "to_json") else report


def run_defense(out: str | Path, model: nn.Module, clean: ImageData, clean_indices: Sequence[int], method: str,
                cfg: Any, *, test: ImageData, attack: AttackConfig, seed: int, defense_name: str | None = None,
                before: dict[str, Any] | None = None, triggered: ImageData | None = None,
                model_meta: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """One complete run folder (docs/ARCHITECTURE.md): config, env, clean indices, timings, metrics, model."""
    cfg = make_config(method, cfg)
    run = RunDir(out)
    run.start(cfg, seed, "classify-defense")
    run.write_indices(clean_indices)
    run.write_json("data.json", {"clean": {"name": clean.name, "samples": len(clean),
                                           "class_counts": clean.class_counts().tolist()},
                                 "test": {"name": test.name, "samples": len(test)},
                                 "note": "the defense saw only the clean samples listed in clean_indices.json"})
    t0 = time.perf_counter()
    try:
        if before is None:
            with run.phase("evaluate_before"):
                before = evaluate_attack(model, test, attack, triggered)
        defended, report = defend(model, clean, method, cfg, run, seed=seed, num_classes=test.num_classes)
        seconds = sum(v for k, v in run.timings.items() if not k.startswith("evaluate"))
        with run.phase("evaluate"):
            after = with_der(before, evaluate_attack(defended, test, attack, triggered))
        run.write_json("defense_report.json", report_json(report))
        save_model(defended, run / "model", model_meta)
        metrics = {"kind": "classify", "defense": defense_name or method, "attack": attack.name, "seed": seed,
                   "variant": getattr(cfg, "variant", None), "clean_samples": len(clean_indices),
                   "before": before, "after": after, "seconds": round(seconds, 3),
                   "wall_seconds": round(time.perf_counter() - t0, 3)}
        run.write_metrics(metrics)
    finally:
        run.close()
    return run.path, metrics


# ---- the tiny world, end to end ------------------------------------------------------------------

# Epoch budgets of run_tiny_world (same recipes, fewer epochs). "paper" is the configs' defaults,
# what scripts/efficacy_classify.py measures; "demo" fits the classifier half of the demo in about
# 150 s on 2 CPU cores; "smoke" (quick=True) is for tests.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"ulrl": {}, "ft": {}, "fp": {}, "nad": {}},
    "demo": {"ulrl": {"unlearn_max_epochs": 5, "relearn_epochs": 10}, "ft": {"epochs": 10}, "fp": {"epochs": 10},
             "nad": {"teacher_epochs": 5, "epochs": 5}},
    "smoke": {"ulrl": {"unlearn_max_epochs": 3, "relearn_epochs": 2}, "ft": {"epochs": 2}, "fp": {"epochs": 2},
              "nad": {"teacher_epochs": 1, "epochs": 2}},
}


def _defense_spec(name: str, ulrl: ULRLConfig | str | None) -> tuple[str, Any]:
    """``ulrl`` / ``ulrl-<preset>`` / ``ft`` / ``fp`` / ``nad`` -> (method, config or None)."""
    if name == "ulrl":
        if isinstance(ulrl, str):
            return "ulrl", ULRLConfig.preset(ulrl)
        return "ulrl", ulrl
    if name.startswith("ulrl-"):
        return "ulrl", ULRLConfig.preset(name[len("ulrl-"):])
    if name not in DEFENSES:
        raise ConfigError(f"unknown defense '{name}'", where="defenses",
                          fix=f"use {', '.join(DEFENSES)} or ulrl-<preset> (e.g. ulrl-kept)")
    return name, None


def format_table(rows: list[dict[str, Any]]) -> str:
    """The before/after table: one line per (attack, defense)."""
    head = f"{'attack':<9} {'defense':<10} {'ACC':>13} {'ASR':>13} {'RA':>13} {'recall[t]':>13} {'DER':>6} {'sec':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        b, a = r["before"], r["after"]
        pair = lambda k: f"{b[k]:.3f}->{a[k]:.3f}"  # noqa: E731
        lines.append(f"{r['attack']:<9} {r['defense']:<10} {pair('acc'):>13} {pair('asr'):>13} {pair('ra'):>13} "
                     f"{pair('target_recall'):>13} {a['der']:>6.3f} {r['seconds']:>6.1f}")
    return "\n".join(lines)


def run_tiny_world(out_dir: str | Path, *, seed: int = 0, attacks: Sequence[str] = ("badnets", "blended"),
                   defenses: Sequence[str] = ("ft", "fp", "nad", "ulrl"), ulrl: ULRLConfig | str | None = None,
                   quick: bool = False, cache_dir: str | Path | None = None, clean_count: int | None = None,
                   budget: str | None = None, printer: Callable[[str], None] | None = print) -> dict[str, Path]:
    """The classifier demo: backdoored tiny-world models, every defense on ONE clean subset, run folders.

    Writes ``out_dir/<attack>/<defense>/seed<seed>/`` per pair and returns ``{"<attack>/<defense>": path}``.
    Backdoored models come from the shipped checkpoints (seed 0) or are trained and cached in
    ``cache_dir`` (default ``out_dir/models``). Epoch budgets (:data:`BUDGETS`): ``demo`` by default
    (about 150 s for two attacks and four defenses on 2 CPU cores), ``smoke`` with ``quick=True``
    (also 200 clean images and 500 test images), or ``budget="paper"`` for the configs' own (paper) epochs.
    ``ulrl`` is the config (or preset name) for the ``ulrl`` entry; ``ulrl-<preset>`` entries
    run a named preset (e.g. ``ulrl-kept``).
    """
    out_dir = Path(out_dir)
    specs = [(name, *_defense_spec(name, ulrl)) for name in defenses]
    budget = budget or ("smoke" if quick else "demo")
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'", where="run_tiny_world", fix=f"use one of: {', '.join(BUDGETS)}")
    train, test = tiny_world(seed)
    if quick:  # smoke runs judge on 500 test images, not 2000
        test = test.subset(stratified_subset(test, min(500, len(test)), seed), name=test.name)
    n_clean = clean_count or (200 if quick else TINY.clean_count)
    clean_idx = stratified_subset(train, int(n_clean), seed)
    clean = train.subset(clean_idx, name=f"{train.name}-clean")
    paths: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for attack_name in attacks:
        model, folder = tiny_backdoored(attack_name, seed, cache_dir or out_dir / "models", data=(train, test))
        meta = read_json(folder / "model.json")
        attack = AttackConfig(**{k: v for k, v in (meta.get("attack") or {"name": attack_name, "seed": seed}).items()
                                 if k in {f.name for f in dataclasses.fields(AttackConfig)}})
        triggered = build_attack(attack).triggered_test_set(test)
        before = evaluate_attack(model, test, attack, triggered)
        for name, method, cfg in specs:
            cfg = make_config(method, cfg, overrides=BUDGETS[budget][method])
            path, metrics = run_defense(out_dir / attack_name / name / f"seed{seed}", model, clean, clean_idx.tolist(),
                                        method, cfg, test=test, attack=attack, seed=seed, defense_name=name,
                                        before=before, triggered=triggered, model_meta=meta)
            paths[f"{attack_name}/{name}"] = path
            rows.append(metrics)
            if printer is not None:
                printer(format_table([metrics]).splitlines()[-1])
    if printer is not None and rows:
        printer("\n" + format_table(rows))
    return paths
