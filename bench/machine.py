"""One line describing where a benchmark ran, printed at the top of every benchmark's output."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version


def describe() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        one, five, fifteen = os.getloadavg()
        load = f"load {one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:
        load = "load ?"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"# machine: {platform.machine()} {cpu}, {os.cpu_count()} cpus, {mem_gib:.0f} GiB, {load}; "
        f"python {platform.python_version()}, litellm {version('litellm')}, aio-pika {version('aio-pika')}, "
        f"redis-py {version('redis')}"
    )
