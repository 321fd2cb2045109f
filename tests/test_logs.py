"""Log lines and summaries once per job: other ranks are silent except for their errors."""
from __future__ import annotations

import logging
import sys

import pytest

from unbackdoor.core import logs


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("unbackdoor.x", level, __file__, 1, msg, None, None)


def test_rank_zero_logs_everything_other_ranks_only_errors_tagged(monkeypatch):
    f = logs.MainProcessFilter()
    monkeypatch.setenv("RANK", "0")
    assert f.filter(_record(logging.INFO, "hello"))
    monkeypatch.setenv("RANK", "1")
    assert not f.filter(_record(logging.INFO, "hello")) and not f.filter(_record(logging.WARNING, "careful"))
    err = _record(logging.ERROR, "boom")
    assert f.filter(err) and f.filter(err) and err.getMessage() == "[rank 1] boom"  # tagged once
    monkeypatch.setenv("RANK", "not-a-number")
    assert f.filter(_record(logging.INFO, "a lone process is never silenced"))


def test_only_the_main_process_prints(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with logs.main_process_stdout():
        print("summary")
    logs.echo("again")
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    with logs.main_process_stdout():
        print("summary")
    logs.echo("again")
    assert capsys.readouterr().out == "summary\nagain\n"


def test_the_cli_installs_the_filter_on_its_stderr_handler():
    from unbackdoor import cli

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        cli._log_to_stderr(logging.INFO)
        new = [h for h in root.handlers if h not in before]
        assert len(new) == 1 and any(isinstance(f, logs.MainProcessFilter) for f in new[0].filters)
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)


@pytest.mark.multiproc
def test_a_two_process_launch_prints_the_summary_and_the_warnings_once(synthetic_runs, tmp_path):
    import subprocess

    (next(synthetic_runs.glob("lm-badnet-crow-seed0")) / "layer_cosine.json").write_text("{broken")
    from distributed.conftest import free_port, job_env  # the launch environment of the multi-process tests

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "unbackdoor.cli", "report", str(synthetic_runs),
           "--out", str(tmp_path / "rep")]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1, proc.stdout
    assert proc.stderr.count("not valid JSON") == 1, proc.stderr[-3000:]
    assert (tmp_path / "rep" / "report.html").is_file()
