"""Benchmark `rlchat ppo` on a real pretrained model (SmolLM2-135M-Instruct, `make real-model`) on CPU.

The 15M-parameter benchmark (ppo_bench.py) is a different workload: here the model has 30 layers, hidden 576, a
49,152-token vocabulary (the LM head is 28% of a token's forward FLOPs) and a real chat template, and responses
stop at EOS. What this measures, per mode, on the readable-answers task's prompts (rlchat/tasks/readable.py):

    episodes/s, s per phase     generation, scoring (the rollout forward pass of every role), training (PPO epochs),
                                from RUN/ppo/metrics.jsonl (every step is timed there)
    generated tok/s             sampled response tokens / generation seconds
    update GFLOP/s              analytic FLOPs of the PPO update / training seconds (formula below)
    scoring GFLOP/s             analytic FLOPs of the rollout forward pass / scoring seconds
    peak RSS                    ru_maxrss of the child process (imports, loading, training)
    matmul peak                 a 2048 x 2048 fp32 matmul at the same thread count: the machine's practical limit
    generation alone            tokens/s of model.generate at batch 8, 16, 32 (64 new tokens, no EOS), to see how
                                much of the per-token cost is matmul and how much is per-step overhead

FLOPs (forward): 2 * N_backbone * tokens + 2 * H * V * response tokens for rows that go through the LM head
(policy, reference) + 4 * L * H * T^2 per row (attention scores and values); N_backbone counts the q/k/v/o
projections with grouped-query k/v and the MLP. Backward: gradients w.r.t. activations only (the base is frozen;
LoRA's own FLOPs, under 3% at r = 16, are left out), and only down to the lowest layer LoRA adapts: the LM head
plus (adapted layers / L) of the backbone and attention. The recipe adapts the top 8 of 30 layers. The shared base
runs a policy pass and a value pass per micro-batch; the shared critic (`value_model: policy`) only the policy
pass.

    .venv/bin/python benchmarks/ppo_real_bench.py                         # both modes, 2 threads, 3 PPO steps
    .venv/bin/python benchmarks/ppo_real_bench.py --modes critic --steps 2 --threads 1
    .venv/bin/python benchmarks/ppo_real_bench.py --gen-only              # matmul peak + generation alone

Writes benchmarks/results/real/{summary.md, summary.json, <mode>.json}. On a shared machine the load average is
recorded with every number: other jobs on the same cores make every figure smaller.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "real"
DEFAULT_MODEL = ROOT / ".models" / "smollm2-135m-instruct"
# one PPO step of recipes/smollm2-135m-cpu.yaml
WORK = dict(batch_size=16, response_length=64, ppo_epochs=2, mini_batches=1, temperature=0.7, lora_r=16,
            lora_alpha=32, n_prompts=64, lora_target_modules=r"re:.*layers\.(2[2-9])\..*_proj")


def matmul_peak(threads: int, n: int = 2048, reps: int = 10, dtype: str = "float32") -> float:
    """GFLOP/s of an n x n matmul in `dtype` (best of `reps`) at `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def n_backbone(cfg) -> int:
    H, L, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head_dim
    return L * (2 * H * H + 2 * H * kv + 3 * H * inter)


def forward_flops(cfg, rows: int, P: int, R: int, lm_head: bool, layer_share: float = 1.0) -> float:
    """Forward FLOPs of `rows` sequences of P + R tokens; `layer_share` of the layers (the LM head in full)."""
    T = P + R
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    return layer_share * (2 * n_backbone(cfg) * rows * T + 4 * L * H * T * T * rows) + \
        (2 * H * V * rows * R if lm_head else 0)


def adapted_layer_share(cfg, targets: str) -> float:
    """(L - lowest adapted layer) / L: how deep the backward pass goes."""
    import re

    if not targets.startswith("re:"):
        return 1.0
    L = cfg.num_hidden_layers
    hit = [i for i in range(L) if re.fullmatch(targets[3:], f"model.layers.{i}.mlp.down_proj")]
    return (L - min(hit)) / L if hit else 1.0


def step_flops(cfg, row: dict, critic: bool, has_reward: bool) -> tuple[float, float]:
    """(scoring FLOPs, update FLOPs) of one logged PPO step."""
    B, P, R = WORK["batch_size"], row["shape/prompt_width"], row["shape/response_width"]
    # rollout pass: policy + reference rows through the LM head; value (unless critic) and reward rows without
    scoring = 2 * forward_flops(cfg, B, P, R, True) + (0 if critic else forward_flops(cfg, B, P, R, False)) + \
        (forward_flops(cfg, B, P, R, False) if has_reward else 0)
    share = adapted_layer_share(cfg, WORK["lora_target_modules"])
    forward = forward_flops(cfg, B, P, R, True) + (0 if critic else forward_flops(cfg, B, P, R, False))
    backward = forward_flops(cfg, B, P, R, True, share) + (0 if critic else forward_flops(cfg, B, P, R, False, share))
    return scoring, WORK["ppo_epochs"] * (forward + backward)


def build_assets(model_dir: Path, force: bool = False) -> dict:
    """Prompts of the readable task and a run directory whose reward stage is a random SEQ_CLS LoRA adapter on the
    model (recorded as `rlchat train-reward --model` records it), so PPO scores inside its one shared model."""
    info_path = RESULTS / "assets" / "assets.json"
    if info_path.is_file() and not force:
        info = json.loads(info_path.read_text())
        if info.get("model") == str(model_dir):
            return info
    import torch
    from peft import get_peft_model

    from rlchat import models
    from rlchat.fileio import atomic_write_json, content_hash
    from rlchat.rundir import RunDir
    from rlchat.tasks.readable import write_data

    assets = RESULTS / "assets"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    paths = write_data(assets / "data", seed=0, n_prompts=WORK["n_prompts"], n_eval=8)
    causal = models.load_causal_lm(str(model_dir))
    tok = models.load_tokenizer(str(model_dir))
    seq = models.seq_cls_from_causal(causal, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    peft_seq = get_peft_model(seq, models.lora_config(WORK["lora_r"], WORK["lora_alpha"], 0.0,
                                                      WORK["lora_target_modules"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in peft_seq.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0.0, 0.02)
    template = assets / "run-template"
    run = RunDir(template)
    run.begin_stage("reward", config={}, inputs={}, parent=None, overwrite=False)
    peft_seq.save_pretrained(str(template / "reward" / "adapter"))
    tok.save_pretrained(str(template / "reward" / "tokenizer"))
    atomic_write_json(template / "reward" / "reward_stats.json", {"mean": 0.0, "std": 1.0})
    run.finish_stage("reward", metrics={}, outputs={
        "kind": "lora", "adapter": "reward/adapter", "model": None, "tokenizer": "reward/tokenizer",
        "base": str(model_dir), "base_hash": content_hash(model_dir), "base_path": str(model_dir.resolve()),
        "reward_stats": "reward/reward_stats.json"})
    info = {"model": str(model_dir), "prompts": paths["prompts"], "run_template": str(template),
            "params": sum(p.numel() for p in causal.parameters())}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def child(mode: str, out_json: Path, info: dict, threads: int, steps: int, dtype: str = "float32") -> None:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoConfig

    from rlchat.config import PPOConfig, resolve
    from rlchat.stages import ppo

    run_dir = RESULTS / f"run-{mode}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(info["run_template"], run_dir)
    cfg = resolve(PPOConfig, "ppo", None, dict(
        run_dir=str(run_dir), model=info["model"], dataset=info["prompts"], seed=0,
        batch_size=WORK["batch_size"], mini_batches=WORK["mini_batches"], ppo_epochs=WORK["ppo_epochs"],
        episodes=WORK["batch_size"] * steps, response_length=WORK["response_length"],
        temperature=WORK["temperature"], lora_r=WORK["lora_r"], lora_alpha=WORK["lora_alpha"], lora_dropout=0.0,
        lora_target_modules=WORK["lora_target_modules"],
        save_every=10_000, sample_every=10_000, value_model="policy" if mode == "critic" else "adapter",
        dtype=dtype))
    load = os.getloadavg()[0]
    final = ppo.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    mcfg = AutoConfig.from_pretrained(info["model"])
    flops = [step_flops(mcfg, r, mode == "critic", True) for r in rows]
    gen_s = sum(r["time/generation_s"] for r in rows)
    score_s = sum(r["time/scoring_s"] for r in rows)
    train_s = sum(r["time/training_s"] for r in rows)
    step_s = [WORK["batch_size"] / r["episodes_per_s"] for r in rows]
    gen_tokens = sum(r["response/length"] * WORK["batch_size"] for r in rows)
    res = {
        "mode": mode, "dtype": dtype, "threads": torch.get_num_threads(), "steps": len(rows), "episodes": final["episodes"],
        "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
        "episodes_per_s": final["episodes"] / sum(step_s), "s_per_step": sum(step_s) / len(rows),
        "generation_s_per_step": gen_s / len(rows), "scoring_s_per_step": score_s / len(rows),
        "training_s_per_step": train_s / len(rows),
        "generated_tokens_per_s": gen_tokens / gen_s,
        "mean_response_length": gen_tokens / WORK["batch_size"] / len(rows),
        "mean_prompt_width": sum(r["shape/prompt_width"] for r in rows) / len(rows),
        "scoring_gflop_per_s": sum(f[0] for f in flops) / 1e9 / score_s,
        "update_gflop_per_s": sum(f[1] for f in flops) / 1e9 / train_s,
        "update_gflop_per_step": sum(f[1] for f in flops) / 1e9 / len(rows),
        "trainable_params": final["trainable_params"], "total_params": final["total_params"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out_json.write_text(json.dumps(res, indent=1))


def generation_alone(model_dir: Path, threads: int, batches=(8, 16, 32), new_tokens: int = 64,
                     dtype: str = "float32") -> list[dict]:
    """tokens/s of plain model.generate (sampling, no EOS stop) at several batch sizes."""
    import torch
    from transformers import GenerationConfig

    from rlchat import models
    from rlchat.tasks.readable import TOPICS

    torch.set_num_threads(threads)
    tok = models.load_tokenizer(str(model_dir))
    lm = models.load_causal_lm(str(model_dir), dtype=dtype).eval()
    out = []
    for B in batches:
        msgs = [[{"role": "user", "content": f"Tell me about {TOPICS[i]}."}] for i in range(B)]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", padding=True,
                                      return_dict=True)
        gen = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        with torch.no_grad():
            lm.generate(**enc, generation_config=gen)
        dt = time.perf_counter() - t
        out.append({"batch": B, "tokens_per_s": B * new_tokens / dt, "ms_per_step": 1000 * dt / new_tokens,
                    "load": round(load, 2)})
        print(json.dumps(out[-1]), flush=True)
    return out


def table(results: dict, peak: float, gen: list[dict] | None, threads: int) -> str:
    lines = [f"matmul peak (2048^2, the run's dtype, {threads} threads): {peak:.0f} GFLOP/s", ""]
    if results:
        lines += ["| mode | episodes/s | s/step | gen s | scoring s | training s | gen tok/s | scoring GFLOP/s | "
                  "update GFLOP/s | update % of matmul peak | peak RSS MiB | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode, r in results.items():
            lines.append(f"| {mode} | {r['episodes_per_s']:.3f} | {r['s_per_step']:.1f} | "
                         f"{r['generation_s_per_step']:.1f} | {r['scoring_s_per_step']:.1f} | "
                         f"{r['training_s_per_step']:.1f} | {r['generated_tokens_per_s']:.0f} | "
                         f"{r['scoring_gflop_per_s']:.0f} | {r['update_gflop_per_s']:.0f} | "
                         f"{100 * r['update_gflop_per_s'] / peak:.0f}% | {r['peak_rss_mib']:.0f} | "
                         f"{r['load_before']:.1f} |")
    if gen:
        lines += ["", "generation alone (model.generate, 64 new tokens, sampling):", "",
                  "| batch | tokens/s | ms per decoding step | load |", "|---|---|---|---|"]
        lines += [f"| {g['batch']} | {g['tokens_per_s']:.0f} | {g['ms_per_step']:.0f} | {g['load']:.1f} |"
                  for g in gen]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory (default: make real-model's)")
    ap.add_argument("--modes", default="shared,critic", help="comma-separated: shared, critic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="PPO steps per mode")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights' dtype (rlchat --dtype); bfloat16 uses the CPU's bf16 matmuls where it has them")
    ap.add_argument("--gen-only", action="store_true", help="only the matmul peak and generation alone")
    ap.add_argument("--no-gen", action="store_true", help="skip the generation-alone measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    model_dir = Path(a.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"no model at {model_dir}: run `make real-model` first (or pass --model DIR)")
    if a.child:
        child(a.child, Path(a.out), json.loads((RESULTS / "assets" / "assets.json").read_text()), a.threads,
              a.steps, a.dtype)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(a.threads, dtype=a.dtype)
    print(f"matmul peak: {peak:.0f} GFLOP/s ({a.dtype}) at {a.threads} threads (load {os.getloadavg()[0]:.1f})", flush=True)
    gen = None if a.no_gen else generation_alone(model_dir, a.threads, dtype=a.dtype)
    results = {}
    if not a.gen_only:
        build_assets(model_dir)  # the child processes read its assets.json
        for mode in a.modes.split(","):
            out = RESULTS / f"{mode}.json"
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--out", str(out), "--threads",
                                   str(a.threads), "--steps", str(a.steps), "--model", str(model_dir), "--dtype", a.dtype],
                                  env=env,
                                  cwd=str(ROOT), capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:])
                raise SystemExit(f"mode {mode} failed")
            results[mode] = json.loads(out.read_text())
            print(json.dumps(results[mode]), flush=True)
    text = table(results, peak, gen, a.threads)
    (RESULTS / "summary.md").write_text(text + "\n")
    (RESULTS / "summary.json").write_text(json.dumps({"matmul_peak_gflop_per_s": peak, "threads": a.threads,
                                                      "ppo": results, "generation": gen, "work": WORK}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
