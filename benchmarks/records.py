"""What the resumable benchmarks share: a measurement kept in a JSON file, peak memory and
the CPU's name."""

from __future__ import annotations

import json
import platform
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iadkit.nn.precision import cpuinfo


def cpu_model() -> str:
    """The CPU's model name (Linux), else what Python knows of the machine."""
    for row in (cpuinfo() or "").splitlines():
        if row.startswith("model name"):
            return row.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def kept_record(result_file: Path, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record saved in ``result_file`` by an earlier run, or ``measure()``, saved there:
    an interrupted benchmark then resumes where it stopped."""
    if result_file.is_file():
        return json.loads(result_file.read_text())
    record = measure()
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(record))
    return record
