"""How many CPU threads a stage's torch ops use (`--threads`), and the one-line note when the machine is busy.

torch starts one intra-op thread per physical core. Its OpenMP threads spin and wait for each other at the end of
every op, so when another process holds one of the cores, every op waits for the thread that is not running:
a 2-thread stage can run several times slower than a 1-thread one (benchmarks/threads_bench.py; figures in the
README, "CPU threads"). Rules, in order:

1. `--threads N` -> N.
2. OMP_NUM_THREADS set in the environment -> left to torch (the user, or a launcher, chose).
3. auto: the CPUs this process may use (affinity, then torch's physical-core count), divided among the processes
   of a multi-process run; and 1 thread when the machine is already busy, i.e. the 1-minute load average is at
   least the number of CPUs, with one line saying so (pass --threads to override).

Only CPU work is affected; on a GPU the threads matter little (data preparation, the optimizer on CPU tensors).
"""
from __future__ import annotations

import os


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


def choose(requested: int | None, world_size: int = 1, cpus: int | None = None,
           load: float | None = None, env: dict | None = None) -> tuple[int | None, str | None]:
    """(threads to set, or None to leave torch's default; a one-line note for the user, or None).

    `cpus`, `load` and `env` default to this machine's; tests pass their own.
    """
    env = os.environ if env is None else env
    if requested is not None:
        return max(1, int(requested)), None
    if env.get("OMP_NUM_THREADS"):
        return None, None
    cpus = available_cpus() if cpus is None else cpus
    share = max(1, cpus // max(1, world_size))
    load = load_average() if load is None else load
    if share > 1 and load is not None and load >= cpus:
        return 1, (f"the machine is busy (load average {load:.1f} on {cpus} CPUs): using 1 CPU thread, which is "
                   f"faster than {share} when other processes hold the cores; pass --threads {share} to override")
    return share, None


def apply(threads: int | None) -> None:
    """Set torch's intra-op thread count (no-op for None)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
