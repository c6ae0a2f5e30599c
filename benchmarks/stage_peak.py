"""Run one `rlchat` command in this process and print its wall time and peak memory (used by gpu_smoke.sh).

    python benchmarks/stage_peak.py LABEL rlchat-arguments...

prints, after the command's own output, one line on stdout:

    LABEL wall_s=12.3 peak_gpu_alloc_mib=1234 peak_gpu_reserved_mib=1400 peak_rss_mib=2100 exit=0

peak_gpu_*: torch.cuda.max_memory_allocated / max_memory_reserved of this process (the CUDA context itself, a few
hundred MiB, is in neither; nvidia-smi shows it); "-" without a GPU. peak_rss_mib: ru_maxrss of this process.
"""
from __future__ import annotations

import resource
import sys
import time


def main() -> int:
    label, argv = sys.argv[1], sys.argv[2:]
    from rlchat.cli import main as rlchat_main

    sys.argv = ["rlchat"] + argv
    start = time.time()
    code = 0
    try:
        rlchat_main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    wall = time.time() - start
    gpu_alloc = gpu_reserved = "-"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu_alloc = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
        gpu_reserved = f"{torch.cuda.max_memory_reserved() / 2**20:.0f}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{label} wall_s={wall:.1f} peak_gpu_alloc_mib={gpu_alloc} peak_gpu_reserved_mib={gpu_reserved} "
          f"peak_rss_mib={rss:.0f} exit={code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
