"""How many threads torch trains with on CPU (--threads), and a note when other jobs hold
the cores those threads need.

The default stays torch's own, one thread per core. On a machine whose cores other jobs
are using, each torch op splits its work across its threads and waits for the slowest, so
a thread that shares a core with another job holds every op back. Measured on a 2-core
AVX512-BF16 EPYC, SmolLM2 micro-steps (`bench/speed_variants.py --variants 9 --threads 1,2
--rounds 4 --steps 2`, 2026-12-06, BENCHMARKS.md), tokens/s with 2 threads vs 1: idle
785 vs 440; one other job spinning on a core 202 vs 468; two such jobs 111 vs 305.
Whether the cores are free is known only at start-up and may change within a run, and a
wrong guess costs 2x either way, so the setting is never changed behind the user's back:
a note names the flag instead.

Busy cores are read from /proc/stat (Linux) over a short sleep, with this process's own
CPU time taken out. The load average would be the easy signal, but it lags by a minute:
right after another run ends it still says the machine is busy.
"""

from __future__ import annotations

import os
import time

import torch

SAMPLE_S = 0.3  # one sleep at start-up, CPU runs only: noise against a run of minutes
# A thread may share its core with this much of another job before fewer threads win:
# measured (2 cores, one other job at a duty cycle): 0.5 of a core busy, 2 threads 467
# tokens/s vs 1 thread 411; 0.77 busy, 250 vs 399; a whole core, 202 vs 468.
SLACK = 0.4


def set_threads(requested: int, device: torch.device, processes: int, log) -> None:
    """Set torch's intra-op threads when --threads asks (0 = torch's default) and, where the
    user left it to torch on a one-process CPU run, log a note if other jobs hold the cores
    (a 0.3 s look at /proc/stat)."""
    if requested > 0:
        torch.set_num_threads(requested)
    threads = torch.get_num_threads()
    if device.type == "cpu" and not requested and processes == 1:
        note = busy_cores_note(threads, other_jobs_cores(), os.cpu_count() or threads)
        if note:
            log(note)


def _busy_jiffies() -> tuple[int, int] | None:
    """(all CPUs' busy jiffies, this process's) from /proc; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # guest time is already counted in user / nice
    return sum(fields) - guest - idle, int(own[11]) + int(own[12])  # utime + stime


def other_jobs_cores(sample_s: float = SAMPLE_S) -> float | None:
    """How many cores other processes kept busy during a short sleep (None: unknown)."""
    before = _busy_jiffies()
    time.sleep(sample_s)
    after = _busy_jiffies()
    if before is None or after is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK") * sample_s
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / ticks)


def busy_cores_note(threads: int, busy: float | None, cores: int) -> str | None:
    """A one-line note when other jobs use the cores `threads` threads need, else None."""
    if busy is None or threads <= 1:
        return None
    free = cores - busy
    if threads <= free + SLACK:
        return None
    suggest = max(1, int(free + SLACK))
    return (
        f"note: other jobs kept {busy:.1f} of the {cores} CPU cores busy just now; {threads} torch "
        f"threads competing with them train 2-3x slower than fewer (measured, BENCHMARKS.md); "
        f"if they keep running, try --threads {suggest}"
    )
