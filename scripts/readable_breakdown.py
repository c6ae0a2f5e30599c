"""What the readable-answers judge saw in an eval: its factors per policy, and answers before and after PPO.

    python scripts/readable_breakdown.py RUN [--examples 3]

Reads RUN/eval/responses.jsonl (written by `rlchat eval --judge rlchat.tasks.readable:judge`) and prints, per
policy, the mean of each factor of the judge (rlchat/tasks/readable.py: Flesch reading ease, words, the length,
repetition and topic gates), the share of answers under MIN_WORDS words or over MAX_WORDS, and the EOS rate; then
the prompts where PPO's greedy answer gained and lost the most by the judge. This is how a reader checks that a
gain is readability, not length or degenerate text (scripts/demo_real.sh prints it at the end).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def factors(rows: list[dict], name: str) -> dict:
    from rlchat.tasks import readable

    parts = [readable.judge_components(r["prompt"], r["policies"][name]["response"]) for r in rows]
    n = len(parts)
    return {"n": n, **{k: statistics.fmean(p[k] for p in parts)
                       for k in ("score", "flesch", "words", "length", "variety", "topic")},
            "short": sum(p["words"] < readable.MIN_WORDS for p in parts) / n,
            "long": sum(p["words"] > readable.MAX_WORDS for p in parts) / n,
            "eos": statistics.fmean(bool(r["policies"][name]["eos"]) for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--examples", type=int, default=3)
    a = ap.parse_args()
    path = Path(a.run) / "eval" / "responses.jsonl"
    if not path.is_file():
        print(f"error: {path} not found. Fix: run `rlchat eval --run-dir {a.run} ...` first.", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = list(rows[0]["policies"])
    print("policy   judge   Flesch  words  length  variety  topic  <20 words  >80 words  EOS")
    for name in names:
        f = factors(rows, name)
        print(f"{name:<8} {f['score']:.3f}  {f['flesch']:6.1f}  {f['words']:5.1f}  {f['length']:.3f}   "
              f"{f['variety']:.3f}    {f['topic']:.3f}  {f['short']:9.0%}  {f['long']:9.0%}  {f['eos']:.0%}")
    if "ppo" in names and "base" in names:
        gain = sorted(rows, key=lambda r: r["policies"]["ppo"]["judge"] - r["policies"]["base"]["judge"])
        for title, picked in (("largest gains", gain[::-1][:a.examples]), ("largest losses", gain[:a.examples])):
            print(f"\n{title} (greedy answers, judge score in brackets):")
            for r in picked:
                print(f"\n> {r['prompt']}")
                for name in ("base", "ppo"):
                    p = r["policies"][name]
                    print(f"  {name} ({p['judge']:.2f}): {p['response'][:300]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
