"""Shared bits of the benchmarks: machine description and appending results to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import resource
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def resident_gib() -> float:
    """This process's resident memory now, GiB (Linux: /proc)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def peak_resident_gib() -> float:
    """This process's peak resident memory so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def append_results(title: str, table: str, notes: str = "", path: str | Path | None = None) -> None:
    """Append one dated section to bench/RESULTS.md (or `path`, e.g. a file a device run brings back) and
    echo it."""
    stamp = datetime.date.today().isoformat()
    section = f"\n## {title} — {stamp}\n\nMachine: {machine()}\n\n{table.rstrip()}\n"
    if notes:
        section += f"\n{notes.rstrip()}\n"
    print(section)
    with Path(path or RESULTS).open("a", encoding="utf-8") as f:
        f.write(section)
