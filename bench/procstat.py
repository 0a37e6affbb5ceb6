"""CPU time and resident memory of a process tree, read from /proc (psutil is not a
dependency): `partnerbus run --workers N` is a supervisor and its worker processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and resident bytes summed over a tree, and its size."""

    cpu_s: float
    rss_bytes: int
    processes: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process ended between listing and reading
        return None
    # The command name is in parentheses and may hold spaces: split after the last one.
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def usage(root: int) -> Usage:
    """What the tree under `root` has used so far (CPU) and holds now (RSS). Fields after
    the command name: state is [0], utime [11], stime [12], rss (pages) [21]."""
    cpu_ticks = 0
    rss_pages = 0
    count = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        cpu_ticks += int(fields[11]) + int(fields[12])
        rss_pages += int(fields[21])
        count += 1
    return Usage(cpu_ticks / CLOCK_TICKS, rss_pages * PAGE_BYTES, count)


def machine() -> dict[str, object]:
    """The facts that make two runs comparable (or not)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
