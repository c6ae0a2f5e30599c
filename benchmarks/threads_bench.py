"""CPU threads vs a busy machine: wall time of a short SFT stage with 1 thread and with torch's default, with and
without another process holding a core.

torch's default is one thread per physical core (2 here: `--threads 2`). This runs `rlchat sft --full` on the demo
model (4 layers, hidden 128) for --steps optimizer steps, alternating the settings so that drifting background load
hits each one alike:

    quiet   nothing added (whatever else runs on the machine still runs: the load average is printed per run)
    loaded  plus `python -c 'while 1: pass'` (one busy process, as another user's job would be)

    python benchmarks/threads_bench.py [--steps 30] [--repeats 2] [--out benchmarks/results/threads.json]

Each run's time is the stage's own wall time from run.json (model loading and training; the CLI start-up is
excluded). Results: a table on stdout and JSON with every run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stage_seconds(run_dir: Path) -> float:
    rec = json.loads((run_dir / "run.json").read_text())["stages"]["sft"]
    from datetime import datetime

    start, end = (datetime.fromisoformat(rec[k]) for k in ("started", "ended"))
    return (end - start).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="1,2", help="comma-separated: thread counts and/or 'auto' (no flag: "
                    "rlchat's own choice)")
    ap.add_argument("--out", default="benchmarks/results/threads.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rlchat-threads-"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    rl = [sys.executable, "-m", "rlchat"]
    subprocess.run(rl + ["new-model", str(work / "model"), "--size", "demo"], check=True, env=env,
                   capture_output=True)
    subprocess.run(rl + ["demo-data", str(work / "data")], check=True, env=env, capture_output=True)

    settings = [t.strip() for t in args.threads.split(",")]
    rows = []
    for rep in range(args.repeats):
        for condition in ("quiet", "loaded"):
            for setting in settings:
                busy = None
                if condition == "loaded":
                    busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
                    time.sleep(1.0)
                run = work / f"run-{rep}-{condition}-{setting}"
                cmd = rl + ["sft", "--run-dir", str(run), "--model", str(work / "model"), "--dataset",
                            str(work / "data" / "sft.jsonl"), "--full", "--max-steps", str(args.steps),
                            "--batch-size", "8", "--max-length", "128", "--eval-fraction", "0", "--save-steps",
                            "100000"]
                run_env = dict(env)
                if setting != "auto":
                    cmd += ["--threads", setting]
                load_before = os.getloadavg()[0]
                try:
                    res = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                if res.returncode != 0:
                    sys.exit(f"run failed:\n{res.stderr[-2000:]}")
                note = next((line for line in res.stderr.splitlines() if line.startswith("note:")), None)
                row = {"repeat": rep, "condition": condition, "threads": setting,
                       "seconds": round(stage_seconds(run), 1), "load_before": round(load_before, 2),
                       "load_after": round(os.getloadavg()[0], 2), "note": note}
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{'condition':<8} {'threads':<8} {'seconds (each run)':<28} median")
    for condition in ("quiet", "loaded"):
        for setting in settings:
            secs = sorted(r["seconds"] for r in rows if r["condition"] == condition and r["threads"] == setting)
            print(f"{condition:<8} {setting:<8} {', '.join(map(str, secs)):<28} {secs[len(secs) // 2]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "cpus": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
