"""`bench/thread_stats.py`: per-thread CPU and sleeps of a process tree, as `aptserve bench` records per probe."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.thread_stats import ThreadStats, describe, usage

SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"
SLEEP = "import time\nfor _ in range(30_000): time.sleep(0.001)"
# Two grandchildren, each single-threaded so that no interpreter lock couples them.
PARENT = f"""import subprocess, sys
children = [subprocess.Popen([sys.executable, '-c', code]) for code in ({SPIN!r}, {SLEEP!r})]
for child in children:
    child.wait()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_a_busy_thread_and_a_sleeping_thread_are_told_apart() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        time.sleep(1.0)  # both processes started
        before, start = ThreadStats.of(parent.pid), time.monotonic()
        time.sleep(1.0)
        rows = usage(before, ThreadStats.of(parent.pid), time.monotonic() - start)
    finally:
        for process in [*psutil.Process(parent.pid).children(recursive=True), psutil.Process(parent.pid)]:
            process.kill()
        parent.wait()
    assert rows, "the grandchild's threads were not found"
    busy, *rest = rows  # the spinning grandchild, found through the process tree
    assert busy["cores"] > 0.3 and busy["pid"] != parent.pid
    sleeper = max(rest, key=lambda row: row["sleeps_per_s"])  # it sleeps 1 ms at a time
    assert sleeper["pid"] not in (parent.pid, busy["pid"])
    assert sleeper["sleeps_per_s"] > 100 and sleeper["sleeps_per_s"] > 10 * busy["sleeps_per_s"]
    assert "cores" in describe(rows)
    assert ThreadStats.of(2**22 + 7) == {}  # no such process
