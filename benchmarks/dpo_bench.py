"""Benchmark `rlchat dpo` on CPU on the PPO benchmark's 14.9M-parameter model, against plain TRL DPOTrainer.

The model and prompts are ppo_bench.py's (the peer's random-init small Llama, hidden 512, 4 layers, vocab 2000;
built into benchmarks/results/assets/ on first use). Each pair is one of its 64 prompts with two synthetic
responses of ~32 tokens (the PPO benchmark's response length), batch 8, 24 optimizer steps (192 pairs; the first
4 are warm-up and left out of the rate), LoRA r=16 alpha=32 on all linear layers, beta 0.1, torch threads 2.

Modes, each in its own subprocess (its peak RSS, ru_maxrss, covers imports, loading and training):
    rlchat   `rlchat.stages.dpo.run`: TRL's DPOTrainer with rlchat's checks, run directory, metrics and checkpoints
    trl      TRL 1.16's DPOTrainer called directly on the same model, tokenizer, pairs and settings

Measured: pairs/s = pairs of the timed steps / their wall time (from the per-step rows: rlchat's metrics.jsonl,
a step callback for trl); pairs/s (median step) = batch / median step time (robust to a burst of load from other
jobs); peak RSS. Per pair, DPO runs the policy forward + backward on chosen and rejected and the reference forward
(adapter off) on both: 2 sequences of ~P+32 tokens, no generation.

    .venv/bin/python benchmarks/dpo_bench.py --repeats 2        # both modes, interleaved; table on stdout
    .venv/bin/python benchmarks/dpo_bench.py --threads 1        # on a machine other jobs keep busy
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppo_bench import RESULTS, build_assets, synthetic_texts  # noqa: E402 - the PPO benchmark's model and prompts

WORK = dict(batch_size=8, steps=24, warmup_steps=4, response_tokens=32, lora_r=16, lora_alpha=32, beta=0.1,
            threads=2, max_length=128)


def write_pairs(info: dict) -> Path:
    """prompt (the benchmark's chat prompts) + chosen + rejected (synthetic text cut to ~response_tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info["model"])
    prompts = [json.loads(line)["prompt"] for line in Path(info["prompts"]).read_text().splitlines()]
    texts = iter(synthetic_texts(20 * len(prompts), seed=11))
    rng = random.Random(0)

    def response() -> str:
        text = ""
        while len(tok(text)["input_ids"]) < WORK["response_tokens"]:
            text = (text + " " + next(texts)).strip()
        return tok.decode(tok(text)["input_ids"][:WORK["response_tokens"]])

    rows = [{"prompt": rng.choice(prompts), "chosen": [{"role": "assistant", "content": response()}],
             "rejected": [{"role": "assistant", "content": response()}]}
            for _ in range(WORK["batch_size"] * WORK["steps"])]
    path = RESULTS / "dpo-pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def child_rlchat(info: dict, pairs: Path) -> list[float]:
    """Per-step wall times of `rlchat dpo` (from its metrics.jsonl rows, one per step)."""
    from rlchat.config import DPOConfig, resolve
    from rlchat.stages import dpo

    run_dir = RESULTS / "run-dpo"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = resolve(DPOConfig, "dpo", None, dict(
        run_dir=str(run_dir), model=info["model"], dataset=str(pairs), batch_size=WORK["batch_size"],
        max_steps=WORK["steps"], eval_fraction=0, lora_r=WORK["lora_r"], lora_alpha=WORK["lora_alpha"],
        lora_dropout=0.0, beta=WORK["beta"], max_length=WORK["max_length"], logging_steps=1, save_steps=10_000,
        seed=0))
    dpo.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time_s"] for r in rows if "loss" in r}  # the training row of each step
    return [times[s] - times[s - 1] for s in range(2, WORK["steps"] + 1)]


def child_trl(info: dict, pairs: Path) -> list[float]:
    """Per-step wall times of TRL's DPOTrainer called directly (same settings as rlchat passes it)."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    out = RESULTS / "run-trl-dpo"
    shutil.rmtree(out, ignore_errors=True)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=WORK["batch_size"], max_steps=WORK["steps"],
                     learning_rate=5e-5, beta=WORK["beta"], max_length=WORK["max_length"], logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, seed=0,
                     dataloader_num_workers=0, gradient_checkpointing=False)  # TRL defaults it on; rlchat off
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(info["model"]), args=args,
                         train_dataset=load_dataset("json", data_files=str(pairs), split="train"),
                         processing_class=AutoTokenizer.from_pretrained(info["model"]), callbacks=[Steps()],
                         peft_config=LoraConfig(r=WORK["lora_r"], lora_alpha=WORK["lora_alpha"], lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def child(mode: str, out_json: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    info = build_assets()
    pairs = RESULTS / "dpo-pairs.jsonl"
    step_s = (child_rlchat if mode == "rlchat" else child_trl)(info, pairs)
    timed = step_s[WORK["warmup_steps"] - 1:]  # step_s[0] is step 2's time
    res = {"mode": mode, "threads": torch.get_num_threads(), "timed_steps": len(timed),
           "pairs_per_s": WORK["batch_size"] * len(timed) / sum(timed),
           "pairs_per_s_median_step": WORK["batch_size"] / sorted(timed)[len(timed) // 2],
           "s_per_step_median": sorted(timed)[len(timed) // 2],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out_json.write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="rlchat,trl")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=WORK["threads"],
                    help="torch threads per run (1 on a machine other jobs keep busy: 2 threads then stall)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, Path(a.out), a.threads)
        return
    info = build_assets()
    write_pairs(info)
    results = []
    for rep in range(1, a.repeats + 1):
        for mode in a.modes.split(","):
            out = RESULTS / f"dpo_{mode}_{rep}.json"
            load = Path("/proc/loadavg").read_text().split()[:3]
            subprocess.run([sys.executable, __file__, "--child", mode, "--out", str(out), "--threads",
                            str(a.threads)], check=True, capture_output=True)
            res = json.loads(out.read_text())
            res.update(repeat=rep, load_before=" ".join(load), load_after=" ".join(
                Path("/proc/loadavg").read_text().split()[:3]))
            out.write_text(json.dumps(res, indent=1))
            results.append(res)
            print(json.dumps(res), flush=True)
    print("\n| run | pairs/s | pairs/s (median step) | s/step (median) | peak RSS MiB | load avg before / after |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} #{r['repeat']} | {r['pairs_per_s']:.2f} | {r['pairs_per_s_median_step']:.2f} | "
              f"{r['s_per_step_median']:.3f} | {r['peak_rss_mib']:.0f} | {r['load_before']} / {r['load_after']} |")


if __name__ == "__main__":
    main()
