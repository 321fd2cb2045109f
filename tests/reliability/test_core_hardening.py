"""The hardened core: atomic writers, temp-file hygiene, error objects and the config parser's
edge cases (each found by fuzzing or review, each a regression test)."""
from __future__ import annotations

import dataclasses
import os
import pickle
import stat

import pytest

from unbackdoor.core.config import (
    check_choice, check_fraction, check_positive, from_dict, load_config, option,
    parse_overrides, read_yaml,
)
from unbackdoor.core.errors import ConfigError, DataError, NumericalError, UnbackdoorError, location
from unbackdoor.core.runs import (
    _exchange, atomic_dir, atomic_write_bytes, atomic_write_json, clean_stale_temps, last_complete_checkpoint,
)


# ---- atomic writers -------------------------------------------------------------------------------

def test_atomic_files_get_normal_permissions_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "m.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_dir_swaps_in_one_step_and_leaves_no_siblings(tmp_path):
    out = tmp_path / "model"
    for gen in range(3):
        with atomic_dir(out) as d:
            (d / "w").write_text(str(gen))
            assert not out.exists() or (out / "w").read_text() == str(gen - 1)  # old output intact meanwhile
    assert (out / "w").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_renameat2_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not _exchange(a, b):
        pytest.skip("no RENAME_EXCHANGE on this platform/filesystem (atomic_dir falls back to two renames)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_failure_inside_atomic_dir_keeps_the_previous_output(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "w").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "w").write_text("half")
            raise RuntimeError("killed")
    assert (out / "w").read_text() == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temps_of_live_or_remote_writers_are_left_alone(tmp_path):
    from unbackdoor.core.runs import _host

    mine = tmp_path / f".model.tmp-pid{os.getpid()}-{_host()}.abcd1234"
    dead = tmp_path / f".model.tmp-pid999999999-{_host()}.abcd1234"
    dead_file = tmp_path / f".model.pid999999999-{_host()}.x1y2.tmp"
    remote = tmp_path / ".model.tmp-pid999999999-otherhost.abcd1234"  # a shared disk: not ours to judge
    unrelated = tmp_path / ".model.notes"
    for p in (mine, dead, remote, unrelated):
        p.mkdir()
    dead_file.write_text("x")
    assert sorted(clean_stale_temps(tmp_path / "model")) == sorted([dead, dead_file])
    assert mine.exists() and remote.exists() and unrelated.exists() and not dead.exists()


def test_writing_a_file_over_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UnbackdoorError, match="a folder of that name"):
        atomic_write_json(tmp_path / "x", {})


def test_last_complete_checkpoint_skips_half_written_ones(tmp_path):
    for n, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, None), (8, '{"trunc'),
                     (10, '{"global_step": 9}')):  # missing, truncated, or the state of another step
        c = tmp_path / f"checkpoint-{n}"
        c.mkdir()
        if state is not None:
            (c / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "none") is None


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [UnbackdoorError, DataError, ConfigError, NumericalError])
def test_errors_survive_pickling_with_where_and_fix(cls):
    e = cls("bad value", where=location("d.json", 3, "output"), fix="fix it")
    r = pickle.loads(pickle.dumps(e))
    assert type(r) is cls and r.problem == "bad value" and r.fix == "fix it"
    assert r.where == "d.json, record 3, field 'output'" and str(r) == str(e)


def test_location_names_what_is_known():
    assert location("a.json") == "a.json"
    assert location(index=2, field="x") == "record 2, field 'x'"
    assert location() == "input"


# ---- config parsing -------------------------------------------------------------------------------

@dataclasses.dataclass
class _Inner:
    r: int = option(8, "rank")


@dataclasses.dataclass
class _Cfg:
    lr: float = option(1e-3, "learning rate")
    steps: int = option(10, "steps")
    frac: float = option(0.5, "a fraction")
    mode: str = option("a", "mode")
    inner: _Inner = option(factory=_Inner, help="nested")

    def __post_init__(self):
        check_positive(self, "lr", "steps")
        check_fraction(self, "frac")
        check_choice(self, "mode", ("a", "b"))


@pytest.mark.parametrize("items,needle", [
    (["inner=3", "inner.r=4"], "conflicts"),
    (["inner.r=4", "inner=3"], "conflicts"),
    (["=3"], "invalid key"),
    (["a..b=3"], "invalid key"),
    (["lr"], "key=value"),
    ([3], "key=value"),
])
def test_malformed_overrides_are_config_errors(items, needle, tally):
    tally("bad_input_cases")
    with pytest.raises(ConfigError, match=needle):
        parse_overrides(items)


@pytest.mark.parametrize("data,needle", [
    ({"lr": float("nan")}, "lr"), ({"lr": float("inf")}, "lr"), ({"steps": 0}, "steps"),
    ({"frac": float("nan")}, "frac"), ({"frac": 1.5}, "frac"), ({"mode": "c"}, "mode"),
    ({1: 2}, "unknown config key '1'"), ({"inner": {2: 3}}, "unknown config key 'inner.2'"),
    ({"inner": [1]}, "inner"),
])
def test_bad_values_name_the_key_and_the_source(data, needle, tally):
    tally("bad_input_cases")
    with pytest.raises(ConfigError) as e:
        from_dict(_Cfg, data, source="run.yaml")
    assert needle in str(e.value) and "run.yaml" in e.value.where


def test_range_checks_refuse_wrong_types_built_in_python(tally):
    tally("bad_input_cases", 2)
    with pytest.raises(ConfigError, match="lr"):
        _Cfg(lr="0.1")
    with pytest.raises(ConfigError, match="steps"):
        _Cfg(steps=True)


def test_huge_integers_are_not_an_overflow(tally):
    tally("bad_input_cases")
    assert _Cfg(steps=10**400).steps == 10**400
    with pytest.raises(ConfigError):
        _Cfg(steps=-(10**400))


@pytest.mark.parametrize("content,needle", [
    (b"\xff\xfe\x00 lr: 1", "utf-8"), (b"lr: [1, 2", "yaml"), (b"- 1\n- 2\n", "mapping"),
    (b"lr: !!python/object:os.system {}", "yaml"), (b"[" * 5000, "yaml"),
])
def test_bad_yaml_files_are_config_errors(tmp_path, content, needle, tally):
    tally("bad_input_cases")
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        read_yaml(p)
    assert needle in str(e.value).lower() and str(p) in e.value.where


def test_config_path_that_is_a_folder_is_named(tmp_path, tally):
    tally("bad_input_cases")
    with pytest.raises(ConfigError, match="folder"):
        load_config(_Cfg, tmp_path)
