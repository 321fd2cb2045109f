"""Reports: run folders -> a self-contained HTML page, Markdown, PNG plots and a JSON summary.

    unbackdoor report runs/ --out runs/report

Python: ``build_report(paths, out_dir, ReportConfig(...))``; ``validate_run_dir(path)`` lists
how a run folder breaks the contract in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from .build import ReportConfig, ReportResult, build_report, kind_tables, load_runs, scenario_table, text_table
from .collect import (GroupSummary, RunRecord, check_run_dir, find_run_dirs, load_run, summarise,
                      validate_run_dir)
from .command import register

__all__ = ["GroupSummary", "ReportConfig", "ReportResult", "RunRecord", "build_report", "check_run_dir",
           "find_run_dirs", "kind_tables", "load_run", "load_runs", "register", "scenario_table", "summarise",
           "text_table", "validate_run_dir"]
