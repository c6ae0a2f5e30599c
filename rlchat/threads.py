"""How many CPU threads a stage's torch ops use (`--threads`), and the one-line note when the machine is busy.

torch starts one intra-op thread per physical core. Its OpenMP threads spin and wait for each other at the end of
every op, so when another process holds one of the cores, every op waits for the thread that is not running:
a 2-thread stage can run several times slower than a 1-thread one (benchmarks/threads_bench.py; figures in the
README, "CPU threads"). Rules, in order:

1. `--threads N` -> N.
2. OMP_NUM_THREADS set in the environment -> left to torch (the user, or a launcher, chose).
3. auto: the CPUs this process may use (affinity, then torch's physical-core count), divided among the processes
   of a multi-process run; and 1 thread when the machine is already busy, i.e. the 1-minute load average is at
   least the number of CPUs AND other processes keep at least one CPU busy right now (/proc/stat over half a
   second, while this process waits), with one line saying so (pass --threads to override). The second test is
   there because the load average trails by a minute: the stage that just finished in the same pipeline (2
   threads: load 2.0) made the next one choose 1 thread on an idle machine (demo-real's PPO took 1.6x as long).

Only CPU work is affected; on a GPU the threads matter little (data preparation, the optimizer on CPU tensors).
"""
from __future__ import annotations

import os
import time


def available_cpus() -> int:
    """CPUs this process may run on, capped by torch's default (physical cores, not hyper-threads)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        cpus = os.cpu_count() or 1
    try:
        import torch

        cpus = min(cpus, max(1, torch.get_num_threads()))
    except ImportError:  # pragma: no cover
        pass
    return max(1, cpus)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def busy_cpus(interval: float = 0.5) -> float | None:
    """CPUs kept busy by all processes over the next `interval` seconds (this one sleeps meanwhile), from the
    aggregate line of /proc/stat; None where there is none (macOS, Windows) or it cannot be read."""
    def sample() -> tuple[float, float, int]:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
        fields = [float(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
        n = sum(1 for line in lines[1:] if line.startswith("cpu"))
        return sum(fields), fields[3] + fields[4], n

    try:
        total0, idle0, n = sample()
        time.sleep(interval)
        total1, idle1, _ = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0 or n < 1:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * n


def choose(requested: int | None, world_size: int = 1, cpus: int | None = None,
           load: float | None = None, env: dict | None = None,
           busy: float | None = None) -> tuple[int | None, str | None]:
    """(threads to set, or None to leave torch's default; a one-line note for the user, or None).

    `cpus`, `load`, `env` and `busy` (CPUs busy now) default to this machine's; tests pass their own (a test that
    passes `load` but no `busy` gets the load-average rule alone).
    """
    env = os.environ if env is None else env
    if requested is not None:
        return max(1, int(requested)), None
    if env.get("OMP_NUM_THREADS"):
        return None, None
    cpus = available_cpus() if cpus is None else cpus
    share = max(1, cpus // max(1, world_size))
    measured = load is None
    load = load_average() if load is None else load
    if share > 1 and load is not None and load >= cpus:
        if busy is None and measured:
            busy = busy_cpus()
        if busy is not None and busy < 1.0:  # the load average still counts a process that has ended
            return share, None
        return 1, (f"the machine is busy (load average {load:.1f} on {cpus} CPUs): using 1 CPU thread, which is "
                   f"faster than {share} when other processes hold the cores; pass --threads {share} to override")
    return share, None


def apply(threads: int | None) -> None:
    """Set torch's intra-op thread count (no-op for None)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
