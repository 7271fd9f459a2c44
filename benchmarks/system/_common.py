"""Helpers shared by the system benchmarks: machine description, timing, results.md sections."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.md"
HEADER = """# System benchmarks

Written by the scripts in `benchmarks/system/` (each replaces its own section below; run from the
repository root with the project's virtual environment active). Every ratio is measured within one
run of one script, so the machine's speed cancels out of it; absolute numbers depend on the machine
and on its load, which each section records (1-minute load average before → after).
"""


def load_avg() -> float:
    """The 1-minute load average (0.0 where unavailable)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def machine() -> str:
    """CPU model, core count, Python, and torch version / threads when torch is already imported."""
    import sys

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    tinfo = f"; torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch is not None else ""
    return f"{os.cpu_count()} × {cpu}{tinfo}; Python {platform.python_version()}"


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall time (s) of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_section(name: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of results.md with ``body``."""
    text = RESULTS.read_text() if RESULTS.is_file() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")
    return RESULTS


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
