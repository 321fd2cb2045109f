"""Classifier architectures, a name registry, the generic head finder and one forward helper.

Conventions
-----------
* Our image models take float images in ``[0, 1]``, shape ``[N, C, H, W]``; the input
  normalisation (mean/std) is a non-persistent buffer inside the model (``model.normalize``),
  so a loaded model cannot be fed the wrong statistics.
* State-dict layouts: ``VGG16BN`` has torchvision's ``vgg16_bn`` keys (``features.N``,
  ``classifier.0/3/6``), so BackdoorBench's torchvision-built VGG checkpoints load unchanged.
  Our default ``PreActResNet`` adds a final BN-ReLU before pooling (keys ``bn.*``) that
  BackdoorBench's ``models/preact_resnet.py`` does not have; ``final_bn=False`` is that network
  exactly (pool the last block's output, no BN, no ReLU), and its checkpoints load unchanged
  (``model_formats`` detects the layout from the keys).
* Any user ``nn.Module`` works with the defenses: the head is found generically by
  :func:`find_head` (the last ``nn.Linear`` whose ``out_features`` equals the number of classes,
  or a dotted path the user names), and :func:`forward_logits` accepts a tensor or a dict of
  tensors (Hugging Face sequence classifiers, whose output carries ``.logits``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, DataError, ModelError

__all__ = [
    "InputNormalize", "PreActBlock", "PreActResNet", "PreActResNet18", "preact_resnet_tiny", "VGG16BN",
    "MODELS", "build_model", "check_images_fit", "feed_forward_linears", "find_head", "forward_logits", "linear_layers",
    "num_parameters", "transformer_blocks",
]


class InputNormalize(nn.Module):
    """``(x - mean) / std`` per channel; identity when no statistics are given.

    The statistics are non-persistent buffers: they travel with the model object (and with
    ``model.json``), not in the state dict, so BackdoorBench-style checkpoints load unchanged.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ConfigError("normalisation needs both mean and std (or neither)", where="model normalisation",
                              fix="pass both mean=(...) and std=(...), one value per channel")
        if std is not None and any(float(s) <= 0 for s in std):
            raise ConfigError(f"normalisation std {tuple(std)} has a value <= 0", where="model normalisation",
                              fix="use positive standard deviations, one per channel")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    @property
    def stats(self) -> dict[str, list[float]] | None:
        if self.mean is None:
            return None
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        if x.dim() == 4 and x.shape[1] != self.mean.shape[1]:  # broadcasting would silently copy one channel
            raise DataError(f"images have {x.shape[1]} channel(s), the model normalises {self.mean.shape[1]}",
                            where="model input (InputNormalize)",
                            fix="load the images in the model's mode (e.g. RGB for 3 channels; --mode RGB)")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# ---- PreActResNet (He et al. 2016, the BackdoorBench CIFAR variant) -------------------------

class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv, BN-ReLU-conv, plus the (projected) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet for 32x32-ish inputs; ``blocks=(2,2,2,2), width=64`` is PreActResNet18.

    The head is ``linear`` (as in BackdoorBench), fed by global average pooling, so any input
    size >= 8 pixels works. ``final_bn=False`` drops the final BN-ReLU: BackdoorBench's layout.
    """

    def __init__(self, num_classes: int = 10, *, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64,
                 in_channels: int = 3, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 final_bn: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes = {num_classes}: a classifier needs at least 2 classes",
                              where="PreActResNet", fix="pass the number of classes of your dataset")
        if width < 1 or len(blocks) != 4 or any(b < 1 for b in blocks):
            raise ConfigError(f"PreActResNet needs width >= 1 and 4 stages of >= 1 block, got width={width}, "
                              f"blocks={tuple(blocks)}", where="PreActResNet", fix="e.g. width=64, blocks=(2,2,2,2)")
        self.normalize = InputNormalize(mean, std)
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(width, blocks[0], 1)
        self.layer2 = self._make_layer(width * 2, blocks[1], 2)
        self.layer3 = self._make_layer(width * 4, blocks[2], 2)
        self.layer4 = self._make_layer(width * 8, blocks[3], 2)
        if final_bn:
            self.bn = nn.BatchNorm2d(width * 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width * 8, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation (input of ``linear``)."""
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if hasattr(self, "bn"):
            out = F.relu(self.bn(out))
        return torch.flatten(self.avgpool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def PreActResNet18(num_classes: int = 10, width: int = 64, **kw: Any) -> PreActResNet:
    """PreActResNet18 as used by BackdoorBench (11.2 M parameters at width 64)."""
    return PreActResNet(num_classes, blocks=(2, 2, 2, 2), width=width, **kw)


def preact_resnet_tiny(num_classes: int = 10, width: int = 8, **kw: Any) -> PreActResNet:
    """A narrow, shallow PreActResNet (one block per stage, width 8: 78 k parameters).

    The same architecture family as PreActResNet18 (same head name ``linear``), small enough
    to train a backdoored tiny-world model in about a minute on 2 CPU cores.
    """
    kw.setdefault("blocks", (1, 1, 1, 1))
    return PreActResNet(num_classes, width=width, **kw)


# ---- VGG16-BN (torchvision layout, so the head is ``classifier.6``) --------------------------

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG16 with batch norm, module names as in torchvision (``features``, ``avgpool``, ``classifier.0..6``).

    ``hidden=4096, pool_size=7`` is torchvision's (and BackdoorBench's) model; smaller values give
    a cheaper model with the same layout.
    """

    def __init__(self, num_classes: int = 10, *, hidden: int = 4096, pool_size: int = 7, width_div: int = 1,
                 dropout: float = 0.5, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes = {num_classes}: a classifier needs at least 2 classes",
                              where="VGG16BN", fix="pass the number of classes of your dataset")
        self.normalize = InputNormalize(mean, std)
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = max(1, int(v) // width_div)
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(c * pool_size * pool_size, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(x, 1))


# ---- registry --------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "preactresnet": PreActResNet,  # any depth: blocks=(...), e.g. a BackdoorBench checkpoint's
    "preactresnet18": PreActResNet18,
    "preact_resnet_tiny": preact_resnet_tiny,
    "vgg16_bn": VGG16BN,
}


def build_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
    """Build a registered architecture by name (``preactresnet18``, ``preact_resnet_tiny``, ``vgg16_bn``).

    Extra keywords go to the constructor (``width``, ``mean``/``std``, ...).
    """
    key = name.lower().replace("-", "_")
    if key not in MODELS:
        raise ConfigError(f"unknown model '{name}'", where="model name",
                          fix=f"use one of: {', '.join(MODELS)}, or pass your own nn.Module")
    try:
        return MODELS[key](num_classes, **kw)
    except TypeError as e:
        raise ConfigError(f"bad arguments for model '{name}': {e}", where="model arguments",
                          fix="check the keyword arguments against the constructor's signature") from None


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the head ------------------------------------------------------------------------------

def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` of ``model`` in registration order, with its dotted name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of a transformer encoder/decoder (``bert.encoder.layer.0`` ...), in order; [] for other models.

    Found generically: the longest ``nn.ModuleList`` of at least two modules of one type that each hold
    an ``nn.Linear`` (Hugging Face BERT/RoBERTa ``encoder.layer``, ViT ``encoder.layer``, GPT ``h``, ...).
    """
    best: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len(mod) > len(best):
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and any(isinstance(x, nn.Linear) for x in mod[0].modules()):
                best = [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(mod)]
    return best


def feed_forward_linears(block: nn.Module) -> tuple[str, nn.Linear] | None:
    """The second (output) projection of a transformer block's feed-forward network: the ``nn.Linear``
    whose input is the block's widest hidden layer (BERT ``output.dense``, 1536 -> 384 in MiniLM).

    Pruning its input columns prunes the FFN's intermediate neurons exactly. None when the block has
    no Linear wider inside than at its output.
    """
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, lin = max(linears, key=lambda nm: (nm[1].in_features, -linears.index(nm)))
    return (name, lin) if lin.in_features > lin.out_features else None


def find_head(model: nn.Module, num_classes: int | None = None, path: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier head: the module at ``path``, else the last ``nn.Linear`` with ``out_features == num_classes``.

    ULRL inspects the rows of this layer (one per class). Registration order is used, which for
    every common architecture (ResNet ``fc``/``linear``, VGG ``classifier.6``, ViT ``head``, HF
    ``classifier`` / ``score``) puts the head last.
    """
    found = linear_layers(model)
    listing = ", ".join(f"{n} ({m.in_features}->{m.out_features})" for n, m in found) or "none"
    if path is not None:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ModelError(f"the model has no module '{path}'", where="head path",
                             fix=f"name one of the model's Linear layers: {listing}") from None
        if not isinstance(mod, nn.Linear):
            raise ModelError(f"module '{path}' is a {type(mod).__name__}, not nn.Linear", where="head path",
                             fix=f"name one of the model's Linear layers: {listing}")
        if num_classes is not None and mod.out_features != num_classes:
            raise ModelError(f"head '{path}' has {mod.out_features} outputs but the data has {num_classes} classes",
                             where="head path", fix="check num_classes, or name the layer that outputs one logit per class")
        return path, mod
    if num_classes is None:
        raise ModelError("cannot find the head without the number of classes", where="find_head",
                         fix="pass num_classes, or the head's dotted path")
    matches = [(n, m) for n, m in found if m.out_features == num_classes]
    if not matches:
        raise ModelError(f"no nn.Linear layer with out_features == {num_classes} (the number of classes)",
                         where=f"model {type(model).__name__}; Linear layers found: {listing}",
                         fix="name the head with its dotted path (e.g. --head classifier.6), or check num_classes")
    return matches[-1]


def forward_logits(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[N, num_classes]`` from a tensor or a dict of tensors (HF models return ``.logits``)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise ModelError(f"the model returned {type(out).__name__}, not logits", where=type(model).__name__,
                         fix="wrap the model so that it returns a [batch, num_classes] tensor (or an object with .logits)")
    return logits


def check_images_fit(model: nn.Module, images: torch.Tensor, where: str = "images") -> None:
    """Refuse images the model cannot take (channels, size), naming both, before any work is done.

    A 1-channel set given to a 3-channel model would otherwise be broadcast by the input
    normalisation and scored as if it were colour; other misfits die deep in a convolution.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        return  # dict inputs (text models) are checked by the model itself
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != images.shape[1]:
        raise DataError(f"the images have {images.shape[1]} channel(s), the model's first convolution expects "
                        f"{conv.in_channels}", where=f"{where}, field 'images'",
                        fix="convert the images to the model's mode (e.g. RGB for 3 channels) when loading them")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward_logits(model, images[:2].float() / 255)
    except (RuntimeError, DataError) as e:
        raise DataError(f"images of {images.shape[1]} channel(s) and size {tuple(images.shape[2:])} do not fit "
                        f"the model ({str(e).splitlines()[0]})", where=f"{where}, field 'images'",
                        fix="give images with the channels and size the model was trained on (e.g. RGB, --size 32)"
                        ) from None
    finally:
        model.train(was_training)
