"""Nothing lost: a run killed with SIGKILL at a random moment of training, and again while it is
writing a checkpoint, leaves the previous complete output or none (never a half-written one that
passes for complete), and ``resume`` continues from the last checkpoint to the *same* final
weights and metrics as an uninterrupted run with the same seed.

Kill moments are drawn from a seeded RNG (seed 0 unless ``UNBACKDOOR_KILL_SEED`` names another, so the
test command is the same run on every machine; the seed is printed on failure). Where the test needs
the process to be at a given point when the kill lands (inside training, inside a checkpoint write),
the worker holds that point and announces it (``OUT/STEP``, ``OUT/SAVING``): no kill depends on how
fast the machine is.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unbackdoor.core.runs import clean_stale_temps, last_complete_checkpoint
from unbackdoor.core.safeio import load_state_dict

WORKER = Path(__file__).with_name("rel_worker.py")
KILL_SEED = int(os.environ.get("UNBACKDOOR_KILL_SEED", "0"))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", UNBACKDOOR_QUIET="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONWARNINGS="ignore")
    return env


def _start(kind: str, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), kind, str(out), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _wait_ready(p: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = p.stdout.readline()
        if line.strip() == "READY":
            return
        if not line and p.poll() is not None:
            raise AssertionError(f"worker died before training: {p.stderr.read()[-3000:]}")
    raise AssertionError("worker never became ready")


def _finish(p: subprocess.Popen, timeout: float = 300) -> None:
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{err[-4000:]}"


def _kill(p: subprocess.Popen) -> bool:
    """SIGKILL; True if the process was still running (a real kill, not a finished run)."""
    alive = p.poll() is None
    if alive:
        os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    return alive


def _wait_file(path_glob: tuple[Path, str], p: subprocess.Popen, timeout: float = 120) -> None:
    folder, pattern = path_glob
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(folder.glob(pattern)):
            return
        if p.poll() is not None:
            raise AssertionError(f"worker ended before {pattern} appeared: {p.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"{pattern} never appeared")


def _final(out: Path) -> dict:
    return json.loads((out / "final.json").read_text())


# ---- core atomic writers ------------------------------------------------------------------------

def _check_model_folder(model: Path) -> int | None:
    """The generation of a complete ``model`` folder, None if absent; fails if it is partial."""
    if not model.exists():
        return None
    manifest = json.loads((model / "manifest.json").read_text())
    import hashlib

    for name, digest in manifest["files"].items():
        assert hashlib.sha256((model / name).read_bytes()).hexdigest() == digest, f"{name} is not the complete file"
    assert sorted(p.name for p in model.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    return int(manifest["generation"])


def test_atomic_writers_survive_sigkill_at_random_moments(tmp_path, tally):
    rng = random.Random(KILL_SEED)
    out = tmp_path / "run"
    generations = []
    for round_ in range(5):
        p = _start("atomic", out)
        _wait_ready(p)
        if round_ == 0:  # at least one complete generation exists, however slow the machine
            _wait_file((out, "metrics.json"), p)
        time.sleep(rng.uniform(0.0, 0.6))
        assert _kill(p)
        tally("kill_points")
        gen = _check_model_folder(out / "model")
        if (out / "metrics.json").exists():
            json.loads((out / "metrics.json").read_text())  # whole, or the previous whole file
        generations.append(gen)
        # leftovers are hidden and named after their dead writer; the next writer removes them
        visible = sorted(x.name for x in out.iterdir() if not x.name.startswith("."))
        assert set(visible) <= {"model", "metrics.json"}, (visible, f"seed {KILL_SEED}")
    assert any(g is not None for g in generations), f"no run got to write anything (seed {KILL_SEED})"
    clean_stale_temps(out / "model")
    clean_stale_temps(out / "metrics.json")
    assert sorted(x.name for x in out.iterdir()) == ["metrics.json", "model"]


def test_atomic_dir_killed_between_its_two_renames_restores_the_previous_output(tmp_path, tally):
    """Where the OS cannot swap two folders atomically, the old output is moved aside first; a
    writer killed right then leaves no ``final``, and the next write puts the old one back."""
    script = f"""
import os, time, sys
sys.path.insert(0, {str(WORKER.parent)!r})
from unbackdoor.core import runs
runs._exchange = lambda a, b: False          # the non-Linux path
real = os.replace
def slow_replace(src, dst):
    real(src, dst)
    if ".old-" in str(dst):
        print("ASIDE", flush=True); time.sleep(30)
runs.os.replace = slow_replace
with runs.atomic_dir({str(tmp_path / 'model')!r}) as d:
    (d / "w").write_text("new")
"""
    model = tmp_path / "model"
    model.mkdir()
    (model / "w").write_text("old")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "ASIDE"
    assert _kill(p)
    tally("kill_points")
    assert not model.exists()  # killed mid-swap: no half output under the final name
    restored = clean_stale_temps(model)
    assert model in restored and (model / "w").read_text() == "old"


# ---- classifier fit ---------------------------------------------------------------------------

def _classify_checkpoint_epoch(ckpt: Path) -> int | None:
    last = ckpt / "last"
    if not last.exists():
        return None
    state = json.loads((last / "state.json").read_text())
    load_state_dict(last / "model.safetensors")
    load_state_dict(last / "optimizer.safetensors")
    assert len(state["history"]) == state["epoch"]
    return int(state["epoch"])


def test_classifier_fit_killed_anywhere_resumes_to_identical_weights(tmp_path, tally):
    rng = random.Random(KILL_SEED + 1)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = _start("classify", ref_out)  # the uninterrupted run, alongside
    # 1. killed inside a random optimizer step (12 epochs of 6 steps; checkpoints after each epoch)
    step = rng.randint(2, 12 * 6 - 8)
    p = _start("classify", out, "--pause-at", str(step))
    _wait_ready(p)
    _wait_file((out, "STEP"), p)
    time.sleep(rng.uniform(0.0, 0.2))
    assert _kill(p)
    tally("kill_points")
    epoch_before = _classify_checkpoint_epoch(out / "ckpt")
    assert (epoch_before or 0) == (step - 1) // 6, f"seed {KILL_SEED}: step {step}"
    # 2. resumed, then killed halfway through writing one of its next checkpoints
    save_at = rng.randint(1, 3)
    p = _start("classify", out, "--resume", "--slow-save", "60", "--save-at", str(save_at))
    _wait_ready(p)
    _wait_file((out, "SAVING"), p)
    assert _kill(p), "the slow save did not hold the worker"
    tally("kill_points")
    epoch_mid = _classify_checkpoint_epoch(out / "ckpt")
    assert epoch_mid == (epoch_before or 0) + save_at - 1 or (save_at == 1 and epoch_mid == epoch_before), \
        f"a checkpoint killed mid-write replaced the previous one (seed {KILL_SEED})"
    assert list((out / "ckpt").glob(".last.tmp-*")), "expected the killed writer's hidden temp folder"
    assert not (out / "final.json").exists()
    # 3. resumed to the end
    _finish(_start("classify", out, "--resume"))
    _finish(ref)
    got, want = _final(out), _final(ref_out)
    assert got["resumed_from"] == epoch_mid
    assert got["history"] == want["history"], f"seed {KILL_SEED}"
    assert got["digest"] == want["digest"] and got["acc"] == want["acc"], f"seed {KILL_SEED}"
    assert not list((out / "ckpt").glob(".last.tmp-*")), "the dead writer's temp folder was not cleaned up"
    tally("resumed_runs_identical")


# ---- LM trainer (Hugging Face Trainer checkpoints) -----------------------------------------------

LM_STEPS, LM_SAVE_EVERY = 12, 2


@pytest.fixture(scope="module")
def lm_reference(tmp_path_factory):
    """The uninterrupted LM run, started once in the background and shared by the LM tests."""
    out = tmp_path_factory.mktemp("lm-ref")
    p = _start("lm", out)

    def result() -> dict:
        if p.returncode is None:
            _finish(p)
        return _final(out)

    yield result
    if p.poll() is None:
        _kill(p)


def _complete_lm_checkpoints(ckpt: Path) -> list[Path]:
    """Every checkpoint a resume could pick must be complete: weights, optimizer, state."""
    out = []
    for c in sorted(ckpt.glob("checkpoint-*")):
        if (c / "trainer_state.json").is_file():
            load_state_dict(c / "model.safetensors")
            assert (c / "optimizer.pt").is_file() and (c / "scheduler.pt").is_file()
            out.append(c)
    return out


def test_lm_trainer_killed_mid_step_then_mid_save_resumes_to_identical_weights(tmp_path, tally, lm_reference):
    """Killed while computing a random optimizer step, resumed, killed again halfway through
    writing a random later checkpoint, resumed to the end: the weights equal the uninterrupted run's."""
    rng = random.Random(KILL_SEED + 2)
    out = tmp_path / "killed"
    # 1. killed in the middle of a random optimizer step
    step = rng.randint(2, LM_STEPS - 4)
    p = _start("lm", out, "--pause-at", str(step))
    _wait_ready(p)
    _wait_file((out, "STEP"), p)
    time.sleep(rng.uniform(0.0, 0.2))
    assert _kill(p)
    tally("kill_points")
    complete = _complete_lm_checkpoints(out / "ckpt")
    done = (step - 1) // LM_SAVE_EVERY * LM_SAVE_EVERY  # steps saved before the kill
    assert [c.name for c in complete] == [f"checkpoint-{s}" for s in range(LM_SAVE_EVERY, done + 1, LM_SAVE_EVERY)][-2:]
    # 2. resumed, then killed halfway through writing one of its next checkpoints
    save_at = rng.randint(1, (LM_STEPS - done) // LM_SAVE_EVERY - 1)
    p = _start("lm", out, "--resume", "--slow-save", "60", "--save-at", str(save_at))
    _wait_ready(p)
    _wait_file((out, "SAVING"), p)
    assert _kill(p)
    tally("kill_points")
    half = [c for c in (out / "ckpt").glob("checkpoint-*") if not (c / "trainer_state.json").exists()]
    assert [c.name for c in half] == [f"checkpoint-{done + save_at * LM_SAVE_EVERY}"], half
    before = last_complete_checkpoint(out / "ckpt")
    expected = done + (save_at - 1) * LM_SAVE_EVERY
    assert (before.name if before else None) == (f"checkpoint-{expected}" if expected else None)
    _complete_lm_checkpoints(out / "ckpt")
    # 3. resumed to the end, past the half-written folder
    _finish(_start("lm", out, "--resume"))
    got, want = _final(out), lm_reference()
    assert got["losses"][-3:] == want["losses"][-3:], f"seed {KILL_SEED}: step {step}, save {save_at}"
    assert got["digest"] == want["digest"], f"seed {KILL_SEED}: killed at step {step} and in save {save_at}"
    tally("resumed_runs_identical")
