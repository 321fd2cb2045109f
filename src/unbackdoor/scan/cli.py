"""``unbackdoor scan``: is this model backdoored, and what is its target? (parse, call the API, print)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_RAW = argparse.RawDescriptionHelpFormatter


def register(subparsers: Any) -> None:
    from . import SCANNERS

    listing = "\n".join(f"  {n:<12} ({s.kind}) {s.summary}" for n, s in SCANNERS.items())
    p = subparsers.add_parser(
        "scan", help="is a model backdoored? (verdict, suspected target, calibrated score, evidence, plots)",
        formatter_class=_RAW,
        description="Runs the scanners of the model's kind on a small clean set and writes a scan folder "
                    "(scan.json + one PNG per scanner). The scanners never see a trigger, a target or a triggered "
                    "input.\n\nScanners:\n" + listing,
        epilog="Examples:\n"
               "  unbackdoor scan --model models/suspect --clean tinyworld:1 --clean-count 500 --out scans/s1\n"
               "  unbackdoor scan --model runs/lm/model --clean clean.json --inputs traffic.json --out scans/lm\n"
               "  unbackdoor scan --model models/m --clean c.safetensors --scanners ulrl --set ulrl.z_threshold=5 "
               "--out scans/m")
    p.add_argument("--model", required=True, type=Path, help="model folder (classifier: model.json; LM: HF folder)")
    p.add_argument("--clean", required=True, help="clean data: a classifier data spec (tinyworld:SEED, .safetensors, "
                                                  "CIFAR or image folder) or an Alpaca JSON/JSONL file")
    p.add_argument("--out", required=True, type=Path, help="scan folder to write (never inside an input)")
    p.add_argument("--kind", choices=["auto", "classify", "lm"], default="auto", help="model kind (default: auto)")
    p.add_argument("--scanners", nargs="+", default=None, help=f"scanners (default: every one of the model's kind: "
                                                               f"{', '.join(SCANNERS.names())})")
    p.add_argument("--clean-count", type=int, default=None,
                   help="use a random (class-stratified) subset of this many clean samples (default: all)")
    p.add_argument("--inputs", type=Path, default=None,
                   help="LMs: Alpaca prompts to screen with the runtime filters (flagged or not, per prompt)")
    p.add_argument("--null", type=Path, default=None,
                   help="calibration JSON {scanner: {\"scores\": [model-level scores of clean models]}} "
                        "(default: the shipped tiny-world zoo's)")
    p.add_argument("--template", default="alpaca", help="LMs: the prompt template the model was trained with")
    p.add_argument("--seed", type=int, default=0, help="seed of the clean subset and of the scanners")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="SCANNER.KEY=VALUE",
                   help="a scanner setting, e.g. --set ulrl.z_threshold=5 (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true", help="LMs: allow the model folder's own code")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that this command did not write (never an input)")
    p.set_defaults(func=_cmd_scan)


def _cmd_scan(a: argparse.Namespace) -> int:
    from .. import api
    from ..core.config import parse_overrides
    from .flow import format_scan

    folder, record = api.scan(a.model, a.clean, a.out, kind=None if a.kind == "auto" else a.kind,
                              scanners=a.scanners, clean_count=a.clean_count, seed=a.seed, inputs=a.inputs,
                              settings=parse_overrides(a.settings), null=a.null, template=a.template,
                              trust_remote_code=a.trust_remote_code, overwrite=a.overwrite)
    print(format_scan(record))
    print(f"scan folder -> {folder}")
    return 0
