"""`bench/thread_stats.py`: per-thread CPU and sleeps of a process tree, as `aptserve bench` records per probe."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.thread_stats import ThreadStats, describe, usage

CHILD = """
import threading, time
def sleeper():
    while True:
        time.sleep(0.001)
threading.Thread(target=sleeper, daemon=True).start()
end = time.monotonic() + 30
while time.monotonic() < end:
    pass
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_a_busy_thread_and_a_sleeping_thread_are_told_apart() -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               f"{CHILD!r}])"])
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
    busy, *rest = rows  # the spinning main thread of the grandchild, found through the process tree
    assert busy["cores"] > 0.3 and busy["pid"] != parent.pid
    sleeper = max(rest, key=lambda row: row["sleeps_per_s"])  # it sleeps 1 ms at a time
    assert sleeper["sleeps_per_s"] > 100 and sleeper["sleeps_per_s"] > 3 * busy["sleeps_per_s"]
    assert "cores" in describe(rows)
    assert ThreadStats.of(2**22 + 7) == {}  # no such process
