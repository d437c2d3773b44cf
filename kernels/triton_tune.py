"""Device-specific tile overrides for the Triton kernels.

``LORASERVE_KERNEL_TUNE=/path/tune.json`` (written by ``benchmarks/bench_kernels.py --sweep``)
holds ``{"lora": {family: {...}}, "attention": {family: {...}}}``; each family's keys update the
module's TUNE defaults at import.
"""
from __future__ import annotations

import json
import os


def apply_overrides(section: str, tune: dict) -> None:
    path = os.environ.get("LORASERVE_KERNEL_TUNE")
    if not path:
        return
    try:
        with open(path) as f:
            data = json.load(f).get(section, {})
    except (OSError, ValueError):
        return
    for family, cfg in data.items():
        if family in tune and isinstance(cfg, dict):
            tune[family].update(cfg)
