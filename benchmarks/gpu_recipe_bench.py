"""Measure the GPU recipes' stages on one CUDA device: time per step and peak memory at the recipes' own settings.

    python benchmarks/gpu_recipe_bench.py --tokenizer TOKDIR --out OUT [--shapes smollm2-135m,qwen2.5-0.5b,...]
    python benchmarks/gpu_recipe_bench.py --tokenizer TOKDIR --out OUT --cpu    # the same plumbing, tiny, on CPU

What it does, per shape (benchmarks/gpu_shapes/<shape>.json: the public config of that model):
1. builds a model with that exact architecture and RANDOM weights (the Hub is not reachable where this runs) and
   the tokenizer in TOKDIR (SmolLM2's; its ids are a subset of every shape's vocabulary), saved in bf16;
2. writes synthetic data as long as the recipe's limits (SFT chats past max_length, preference pairs near it,
   prompts near max_prompt_length), so each step costs what a real step costs: random weights never emit EOS, so
   every PPO and eval response runs to its full length (the worst case);
3. runs `rlchat sft`, `train-reward`, `ppo` and `eval` with `--config recipes/<recipe>.yaml` and only the model,
   the data and a few steps overridden, each through benchmarks/stage_peak.py (wall time, peak GPU memory);
4. reads the seconds per optimizer step (TRL's train_runtime / steps for sft and reward; PPO's own
   time/*_s per step) and extrapolates the recipe's full budget: sft one epoch of 16k chats, reward max_steps,
   ppo episodes / batch_size steps, eval max_prompts.
Also a bf16 forward+backward microbenchmark with LoRA (tokens/s and model TFLOP/s, 4 x params x tokens for a
frozen base). Output: OUT/gpu_recipe_bench.md (a table) and OUT/gpu_recipe_bench.json.
What it cannot say: anything about quality (random weights), nor the time of real answers that stop early.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPE = {"smollm2-135m": None, "qwen2.5-0.5b": "qwen2.5-0.5b-instruct-rlhf.yaml",
          "llama-3.2-1b": "llama-3.2-1b-instruct-rlhf.yaml"}
SFT_ROWS = 16_000  # trl-lib/Capybara, the recipes' SFT data, has ~16k chats
WORDS = ("the model answers every question with care and a short clear reason about what it knows and why a "
         "user might want to read more about history science music cooking travel sport weather animals").split()


def build_model(shape: str, tokenizer_dir: Path, out: Path, cpu: bool) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((HERE / "gpu_shapes" / f"{shape}.json").read_text())
    if cpu:  # same architecture family, tiny, so the plumbing runs in seconds
        cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.pop("architectures", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if cpu else torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_data(out: Path, scale: float) -> dict[str, Path]:
    """Synthetic rows sized for the recipes' limits (max_length 1024, max_prompt_length 256); ~1 token per word."""
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    n = lambda words: max(4, int(words * scale))  # noqa: E731
    rows = {
        "sft": [{"messages": [{"role": "user", "content": text(rng, n(300))},
                              {"role": "assistant", "content": text(rng, n(900))}]} for _ in range(256)],
        "pairs": [{"prompt": [{"role": "user", "content": text(rng, n(250))}],
                   "chosen": [{"role": "assistant", "content": text(rng, n(300))}],
                   "rejected": [{"role": "assistant", "content": text(rng, n(300))}]} for _ in range(256)],
        "prompts": [{"prompt": [{"role": "user", "content": text(rng, n(220))}]} for _ in range(256)],
    }
    paths = {}
    for name, data in rows.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return paths


def microbench(model_dir: Path, cpu: bool, batch: int = 8, seq: int = 1024, iters: int = 5) -> dict:
    """bf16 forward+backward of a LoRA model (r 16 on every linear layer) on batch x seq random tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    if cpu:
        batch, seq, iters = 2, 32, 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, 49152 if not cpu else 100, (batch, seq), device=device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    for _ in range(2):
        step()
    if not cpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if not cpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    tokens = batch * seq
    peak = torch.cuda.max_memory_allocated() / 2**20 if not cpu else None
    del model
    if not cpu:
        torch.cuda.empty_cache()
    return {"params": n_params, "tokens_per_s": round(tokens / dt), "tflops": round(4 * n_params * tokens / dt / 1e12, 1),
            "step_s": round(dt, 4), "batch": batch, "seq": seq, "peak_alloc_mib": None if peak is None else round(peak)}


def run_stage(label: str, args: list[str], log: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / "stage_peak.py"), label, *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(str(e.stdout or "") + str(e.stderr or ""))
        print(f"  {label} TIMED OUT after {timeout:.0f}s", flush=True)
        return {"exit": "timeout"}
    log.write_text(res.stdout + res.stderr)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith(f"{label} wall_s=")), "")
    kv = dict(p.split("=", 1) for p in line.split()[1:])
    if res.returncode != 0 or kv.get("exit") != "0":
        print(f"  {label} FAILED (exit {res.returncode}); last output:\n{(res.stdout + res.stderr)[-2500:]}", flush=True)
    return kv


def metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def trl_step_s(stage_dir: Path) -> float | None:
    rows = [r for r in metrics(stage_dir / "metrics.jsonl") if "train_runtime" in r]
    if not rows:
        return None
    r = rows[-1]
    steps = r.get("step") or r.get("global_step")
    return round(r["train_runtime"] / steps, 3) if steps else None


def shape_run(shape: str, args, out: Path) -> dict:
    recipe = RECIPE[shape] or RECIPE["qwen2.5-0.5b"]  # the 135M shape runs the 0.5B recipe's settings
    model_dir, run = out / shape / "model", out / shape / "run"
    n_params = build_model(shape, args.tokenizer, model_dir, args.cpu)
    data = write_data(out / shape / "data", scale=0.02 if args.cpu else 1.0)
    bench = microbench(model_dir, args.cpu)
    steps, eps = (2, 4) if args.cpu else (args.steps, 2 * 64)
    base = ["--config", str(ROOT / "recipes" / recipe), "--run-dir", str(run)]
    small = ["--batch-size", "2", "--grad-accum", "1", "--max-length", "64"] if args.cpu else []
    stages = {
        "sft": ["sft", *base, "--model", str(model_dir), "--dataset", str(data["sft"]), "--max-steps", str(steps),
                "--no-assistant-only-loss", *small],  # TRL cannot add loss masks to SmolLM2's template; same compute
        "reward": ["train-reward", *base, "--dataset", str(data["pairs"]), "--max-steps", str(steps), *small],
        "ppo": ["ppo", *base, "--dataset", str(data["prompts"]), "--episodes", str(eps)]
        + (["--batch-size", "2", "--mini-batches", "1", "--response-length", "4", "--max-prompt-length", "16"]
           if args.cpu else []),
        # eval: 32 prompts in one batch at the recipe's max_new_tokens, 2 KL samples each (the time per prompt
        # scales from there)
        "eval": ["eval", *base, "--dataset", str(data["prompts"]), "--split", "train", "--max-prompts",
                 "4" if args.cpu else "32", "--batch-size", "32", "--kl-samples", "2"]
        + (["--max-new-tokens", "4"] if args.cpu else []),
    }
    result = {"shape": shape, "params": n_params, "recipe": recipe, "microbench": bench, "stages": {}}
    for label, argv in stages.items():
        print(f"== {shape} {label}", flush=True)
        kv = run_stage(label, argv, out / shape / f"{label}.log", args.stage_timeout)
        result["stages"][label] = kv
    ppo_rows = [r for r in metrics(run / "ppo" / "metrics.jsonl") if "time/generation_s" in r]
    result["sft_step_s"] = trl_step_s(run / "sft")
    result["reward_step_s"] = trl_step_s(run / "reward")
    if ppo_rows:
        last = ppo_rows[-1]  # the second step: the first carries CUDA warm-up
        result["ppo_step"] = {k.split("/")[1]: last[k] for k in ("time/generation_s", "time/scoring_s",
                                                                   "time/training_s")}
    return result


def extrapolate(r: dict) -> dict:
    """The recipe's full budget from the measured per-step times (hours)."""
    import yaml

    rec = yaml.safe_load((ROOT / "recipes" / r["recipe"]).read_text())
    est = {}
    if r.get("sft_step_s"):
        sft_steps = SFT_ROWS // (rec["sft"]["batch_size"] * rec["sft"]["grad_accum"])
        est["sft_h"] = round(sft_steps * r["sft_step_s"] / 3600, 2)
    if r.get("reward_step_s"):
        est["reward_h"] = round(rec["reward"]["max_steps"] * r["reward_step_s"] / 3600, 2)
    if r.get("ppo_step"):
        steps = rec["ppo"]["episodes"] // rec["ppo"]["batch_size"]
        est["ppo_h"] = round(steps * sum(r["ppo_step"].values()) / 3600, 2)
    return est


def table(results: list[dict], device: str) -> str:
    lines = [f"# GPU recipe bench: {device}", "",
             "Random weights with each model's real architecture; synthetic data at the recipes' lengths; every",
             "response runs to its full length (random weights never stop early). Per-step figures are the recipe's",
             "batch sizes. full-recipe h = per-step time x the recipe's steps.", "",
             "| shape | params | LoRA fwd+bwd tok/s (TFLOP/s) | stage | wall s | peak GPU alloc MiB | s/step | "
             "full-recipe h |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        est = extrapolate(r)
        mb = r["microbench"]
        per = {"sft": r.get("sft_step_s"), "reward": r.get("reward_step_s"),
               "ppo": round(sum(r["ppo_step"].values()), 2) if r.get("ppo_step") else None, "eval": None}
        for i, (label, kv) in enumerate(r["stages"].items()):
            head = (f"| {r['shape']} | {r['params'] / 1e6:.0f}M | {mb['tokens_per_s']} ({mb['tflops']}) "
                    if i == 0 else "| | | ")
            lines.append(f"{head}| {label} | {kv.get('wall_s', '-')} | {kv.get('peak_gpu_alloc_mib', '-')} | "
                         f"{per.get(label) or '-'} | {est.get(label + '_h', '-')} |")
        if r.get("ppo_step"):
            lines.append(f"| | | | ppo step split | gen {r['ppo_step']['generation_s']:.2f} s, score "
                         f"{r['ppo_step']['scoring_s']:.2f} s, train {r['ppo_step']['training_s']:.2f} s | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b,llama-3.2-1b")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of sft and reward per shape")
    ap.add_argument("--stage-timeout", type=float, default=240, help="seconds before a stage is given up")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU: checks the plumbing, measures nothing")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch. Fix: run on a GPU machine, or pass --cpu.", file=sys.stderr)
        return 2
    device = "cpu (plumbing check)" if args.cpu else torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in args.shapes.split(","):
        results.append(shape_run(shape, args, args.out))
        (args.out / "gpu_recipe_bench.json").write_text(json.dumps(results, indent=1))
    md = table(results, device)
    (args.out / "gpu_recipe_bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
