"""Where a server's threads spent a probe: CPU, waiting for a core, and sleeping (Linux /proc).

`ThreadStats.of(pid)` snapshots every thread of a process and its descendants (vLLM's API server,
engine core and worker processes; our front end and engine process). The difference of two snapshots,
`usage(before, after)`, gives per thread the cores it used, the cores' worth of time it sat runnable
without a core (run-queue wait), and how often per second it went to sleep (voluntary context switches:
a lock, a futex, I/O) or was preempted. A thread that runs the model and sleeps thousands of times a
second is waiting on something: that is how the OpenMP hand-over in docs/ARCHITECTURE.md was found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

PROC = Path("/proc")


@dataclass(frozen=True)
class ThreadStats:
    pid: int
    tid: int
    process: str  # the process's command line, shortened
    cpu_s: float  # on a core (user + system)
    wait_s: float  # runnable, waiting for a core
    voluntary: int  # context switches: went to sleep
    involuntary: int  # context switches: preempted

    @staticmethod
    def of(pid: int) -> dict[tuple[int, int], ThreadStats]:
        """Every thread of `pid` and its descendants now; empty where /proc has no schedstat (not Linux)."""
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        stats = {}
        for process in processes:
            try:
                command = " ".join(process.cmdline())[-60:]
                tids = [int(t) for t in os.listdir(PROC / str(process.pid) / "task")]
            except (psutil.Error, OSError):
                continue
            for tid in tids:
                sample = _thread(process.pid, tid, command)
                if sample is not None:
                    stats[(process.pid, tid)] = sample
        return stats


def _thread(pid: int, tid: int, command: str) -> ThreadStats | None:
    task = PROC / str(pid) / "task" / str(tid)
    try:
        run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
    except (OSError, ValueError):
        return None  # the thread ended, or no schedstat
    return ThreadStats(pid, tid, command, int(run_ns) / 1e9, int(wait_ns) / 1e9,
                       int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"]))


def usage(before: dict[tuple[int, int], ThreadStats], after: dict[tuple[int, int], ThreadStats],
          seconds: float, min_cores: float = 0.001) -> list[dict[str, float | int | str]]:
    """Per thread alive in both snapshots and using at least `min_cores`, busiest first: `cores`,
    `wait_cores` (run-queue wait), `sleeps_per_s` and `preemptions_per_s` over `seconds`."""
    rows = []
    for key, end in after.items():
        start = before.get(key)
        if start is None or seconds <= 0:
            continue
        cores = (end.cpu_s - start.cpu_s) / seconds
        if cores < min_cores:
            continue
        rows.append({"pid": end.pid, "tid": end.tid, "process": end.process, "cores": round(cores, 3),
                     "wait_cores": round((end.wait_s - start.wait_s) / seconds, 3),
                     "sleeps_per_s": round((end.voluntary - start.voluntary) / seconds),
                     "preemptions_per_s": round((end.involuntary - start.involuntary) / seconds)})
    return sorted(rows, key=lambda row: -row["cores"])


def describe(rows: list[dict]) -> str:
    """One line per thread, for the console."""
    return "\n".join(f"  {r['cores']:5.2f} cores (waiting {r['wait_cores']:.2f}), {r['sleeps_per_s']:5d} sleeps/s, "
                     f"{r['preemptions_per_s']:4d} preemptions/s  pid {r['pid']} tid {r['tid']}  {r['process']}"
                     for r in rows)

