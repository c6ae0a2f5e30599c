"""Run one command and record its wall time, peak RSS and the load average (for the demo's per-stage table).

    python scripts/timed.py TIMES.jsonl NAME -- COMMAND ARGS...

Appends {"stage", "wall_s", "cpu_s", "peak_rss_mb", "load_before", "load_after", "exit"} to TIMES.jsonl and exits
with the command's exit code. Peak RSS is the largest resident set of the command and its children (getrusage,
Linux: ru_maxrss in KiB). cpu_s is the CPU time (user + system) the command used: on a shared machine the wall time
depends on the other jobs, the CPU time much less (with one torch thread it is about the wall time the stage would
take on one quiet core). The load average is printed because on a shared machine it explains slow stages.
"""
import json
import os
import resource
import subprocess
import sys
import time


def main() -> int:
    out, name, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd, __doc__
    load_before = os.getloadavg()[0]
    t0 = time.time()
    code = subprocess.call(cmd)
    wall = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_kib = usage.ru_maxrss
    row = {"stage": name, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "peak_rss_mb": round(rss_kib / 1024), "exit": code,
           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(f"==> {name}: {wall:.0f} s (CPU {row['cpu_s']:.0f} s), peak RSS {rss_kib / 1024:.0f} MB, load "
          f"{load_before:.1f} -> {row['load_after']:.1f}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
