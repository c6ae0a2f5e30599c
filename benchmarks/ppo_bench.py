"""Benchmark `rlchat ppo` on CPU against the TRL 1.12 PPOTrainer peer (shared/peers/trl-ppo-1.12).

Same work as the peer's ppo_bench.py: a random-init 14.9M-parameter Llama ("small": hidden 512, 4 layers, vocab
2000 byte-level BPE), 64 prompts, batch 8, responses of up to 32 tokens, 4 PPO epochs, 1 minibatch, 128 episodes,
LoRA r=16 alpha=32 on all linear layers, torch threads = 2. When the peer's directory is there, its own
build_assets.py makes the tokenizer and the random-init policy weights and its common.prompts() the prompts, so
both sides do the very same work (else a synthetic look-alike is built). The reward model is a LoRA
sequence-classification adapter on the same base (random LoRA and score weights), registered in the run directory the way
`rlchat train-reward` records it, so the shared-base mode scores with it inside the one model.

    .venv/bin/python benchmarks/ppo_bench.py                 # build assets, run both modes, print the table
    .venv/bin/python benchmarks/ppo_bench.py --peer          # also run the peer, same session (needs its venv)
    .venv/bin/python benchmarks/ppo_bench.py --modes shared  # one mode only
    .venv/bin/python benchmarks/ppo_bench.py --repeats 3 --peer   # what benchmarks/README.md reports

Each mode runs in its own subprocess (`--child MODE`), so its peak RSS (ru_maxrss: imports, model loading and
training together, as /usr/bin/time -v reports for the peer) is its own. Results go to benchmarks/results/.

Measured per mode (from RUN/ppo/metrics.jsonl, which times every step):
    episodes/s         episodes / (sum of the per-step wall times of the PPO loop); setup and loading excluded,
                       as the peer's train_s excludes them
    generated tok/s    response tokens sampled / generation seconds
    s per phase        generation, scoring (the rollout forward pass + reward), training (the PPO epochs)
    peak RSS           ru_maxrss of the child process
    update GFLOP/s     analytic FLOPs of the PPO update / training seconds, with
                       forward FLOPs  = 2 * N_backbone * tokens + 2 * H * V * response_tokens (LM head, policy rows)
                                        + 4 * L * H * T^2 * rows (attention scores and values)
                       backward FLOPs = 1x forward for frozen weights (gradients w.r.t. activations only: the LoRA
                                        modes) and 2x forward for trained weights (--full); LoRA's own FLOPs
                                        (r = 16, under 3% here) are left out
                       per micro-batch: policy rows and value rows (the value rows skip the LM head); the critic
                       mode has no value pass (its value head reads the policy pass)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
ASSETS = RESULTS / "assets"
PEER_DIR = Path(os.environ.get("PEER_DIR", ROOT.parent / "shared" / "peers" / "trl-ppo-1.12"))
if not PEER_DIR.is_dir():
    PEER_DIR = Path("/work/shared/peers/trl-ppo-1.12")

WORK = dict(n_prompts=64, batch_size=8, response_length=32, ppo_epochs=4, mini_batches=1, episodes=128,
            lora_r=16, lora_alpha=32, threads=2, num_generations=4)
GROUP_MODES = ("grpo", "rloo")  # `rlchat grpo` / `rlchat rloo`: no value model, batch = 2 prompts x 4 generations
# The peer's recorded figures (summary-2026-11-29.md, median of 3 runs, same 2-vCPU VM class, threads = 2)
PEER_RECORDED = {"full": {"episodes_per_s": 2.58, "peak_rss_mib": 1230, "s_per_update": 3.082},
                 "lora": {"episodes_per_s": 2.76, "peak_rss_mib": 1102, "s_per_update": 2.871}}


# ------------------------------------------------------------------------------------------------------ assets


def synthetic_texts(n: int, seed: int) -> list[str]:
    """Sentences of common words and made-up syllable words (enough distinct text for a 2000-token BPE)."""
    rng = random.Random(seed)
    common = ("the a an one my your this that is was has had can will and or but so then because with from to of "
              "in on at by for about over under sun moon tree river stone light small big old new red blue green "
              "good bad happy slow fast warm cold day night road house book song game water fire cloud").split()
    onsets = ["", "b", "br", "ch", "d", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pl", "r", "s", "sh", "st",
              "t", "th", "tr", "v", "w", "z"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    made_up = ["".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(rng.randint(1, 3)))
               for _ in range(4000)]
    out = []
    for _ in range(n):
        words = [rng.choice(common) if rng.random() < 0.4 else rng.choice(made_up) for _ in range(rng.randint(4, 14))]
        out.append(" ".join(words).capitalize() + rng.choice(".?!"))
    return out


def build_assets(force: bool = False) -> dict:
    """The small model, the prompts and a run directory whose reward stage is a LoRA adapter on that model."""
    info_path = ASSETS / "assets.json"
    if info_path.is_file() and not force:
        return json.loads(info_path.read_text())
    import torch

    from rlchat import models
    from rlchat.rundir import RunDir
    from rlchat.fileio import atomic_write_json, content_hash
    from rlchat.tiny import build_tiny_model

    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    ASSETS.mkdir(parents=True)
    if (PEER_DIR / "build_assets.py").is_file():
        # the peer's own tokenizer, random-init policy weights and prompts: the very same work
        peer_assets = ASSETS / "peer-assets"
        env = dict(os.environ, PEER_ASSETS=str(peer_assets))
        subprocess.run([sys.executable, "build_assets.py"], cwd=PEER_DIR, env=env, check=True,
                       capture_output=True)
        model_dir = ASSETS / "small-llama"
        shutil.copytree(peer_assets / "small" / "policy", model_dir)
        for f in (peer_assets / "tokenizer").iterdir():
            shutil.copy(f, model_dir / f.name)
        sys.path.insert(0, str(PEER_DIR))
        from common import prompts as peer_prompts  # noqa: E402 - the peer's prompt generator

        prompts = peer_prompts(WORK["n_prompts"])
        source = f"peer assets ({PEER_DIR})"
    else:
        model_dir = build_tiny_model(ASSETS / "small-llama", arch="llama", size="small",
                                     corpus=synthetic_texts(20000, seed=1), seed=0, vocab_size=2000)
        prompts = synthetic_texts(WORK["n_prompts"], seed=7)
        source = "synthetic (peer directory not found)"
    with open(ASSETS / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n")

    # the reward model: a SEQ_CLS LoRA adapter on the same base, saved by peft as the reward stage saves it
    from peft import get_peft_model

    causal = models.load_causal_lm(str(model_dir))
    tok = models.load_tokenizer(str(model_dir))
    seq = models.seq_cls_from_causal(causal, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    peft_seq = get_peft_model(seq, models.lora_config(WORK["lora_r"], WORK["lora_alpha"], 0.0, "all-linear",
                                                      task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in peft_seq.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0.0, 0.02)
    template = ASSETS / "run-template"
    run = RunDir(template)
    run.begin_stage("reward", config={}, inputs={}, parent=None, overwrite=False)
    peft_seq.save_pretrained(str(template / "reward" / "adapter"))
    tok.save_pretrained(str(template / "reward" / "tokenizer"))
    atomic_write_json(template / "reward" / "reward_stats.json", {"mean": 0.0, "std": 1.0, "chosen_mean": 0.0,
                                                                   "chosen_std": 1.0, "rejected_mean": 0.0,
                                                                   "rejected_std": 1.0})
    run.finish_stage("reward", metrics={}, outputs={
        "kind": "lora", "adapter": "reward/adapter", "model": None, "tokenizer": "reward/tokenizer",
        "base": str(model_dir), "base_hash": content_hash(model_dir), "base_path": str(model_dir.resolve()),
        "reward_stats": "reward/reward_stats.json"})
    info = {"model": str(model_dir), "prompts": str(ASSETS / "prompts.jsonl"), "run_template": str(template),
            "source": source,
            "params": sum(p.numel() for p in causal.parameters()), "vocab": len(tok)}
    info_path.write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------------------------- child


def update_flops(metrics_rows: list[dict], model_cfg, trainable_full: bool, mode_rows: int,
                 value_pass: bool = True) -> float:
    """Analytic FLOPs of all PPO updates (see the module docstring)."""
    H, L, V = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.vocab_size
    inter = model_cfg.intermediate_size
    n_backbone = L * (4 * H * H + 3 * H * inter)  # attention projections + MLP (norms negligible)
    total = 0.0
    for row in metrics_rows:
        R, rows = row["shape/response_width"], mode_rows
        T = row["shape/prompt_width"] + R
        fwd_policy = 2 * n_backbone * rows * T + 2 * H * V * rows * R + 4 * L * H * T * T * rows
        fwd_value = 2 * n_backbone * rows * T + 4 * L * H * T * T * rows
        bwd = 2.0 if trainable_full else 1.0
        total += WORK["ppo_epochs"] * (fwd_policy + (fwd_value if value_pass else 0)) * (1 + bwd)
    return total


def child(mode: str, out_json: Path, info: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from rlchat.config import STAGE_CONFIGS, resolve
    from rlchat.stages import ppo

    run_dir = RESULTS / f"run-{mode}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(info["run_template"], run_dir)
    stage = mode.split("-")[0] if mode.startswith(GROUP_MODES) else "ppo"  # grpo / rloo: their own commands
    settings = dict(
        run_dir=str(run_dir), model=info["model"], dataset=info["prompts"], seed=0,
        batch_size=WORK["batch_size"], mini_batches=WORK["mini_batches"], ppo_epochs=WORK["ppo_epochs"],
        episodes=WORK["episodes"], response_length=WORK["response_length"], temperature=1.0,
        lora_r=WORK["lora_r"], lora_alpha=WORK["lora_alpha"], lora_dropout=0.0, save_every=10_000,
        sample_every=10_000)
    if stage == "ppo":
        settings.update(separate_models=mode.startswith("separate"), full=mode.startswith("full"))
    else:  # the same batch of 8 responses: 2 prompts x 4 generations
        settings.update(num_generations=WORK["num_generations"])
    cfg = resolve(STAGE_CONFIGS[stage], stage, None, settings)
    if mode.startswith("critic"):  # shared base + shared critic (the value head on the policy's hidden states)
        cfg.value_model = "policy"
    if mode.endswith("-gc"):  # e.g. critic-gc, shared-gc: with gradient checkpointing
        cfg.gradient_checkpointing = True
    load_start = os.getloadavg()[0]  # the machine is shared: the 1-minute load average, as `uptime` shows it
    t0 = time.perf_counter()
    final = ppo.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    step_s = [WORK["batch_size"] / r["episodes_per_s"] for r in rows]
    gen_s = sum(r["time/generation_s"] for r in rows)
    score_s = sum(r["time/scoring_s"] for r in rows)
    train_s = sum(r["time/training_s"] for r in rows)
    gen_tokens = sum(r["shape/response_width"] * WORK["batch_size"] for r in rows)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(info["model"])
    flops = update_flops(rows, mcfg, mode.startswith("full"), WORK["batch_size"],
                         value_pass=not mode.startswith(("critic",) + GROUP_MODES))
    res = {
        "mode": mode, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "episodes": final["episodes"], "steps": final["steps"],
        "loop_s": sum(step_s), "episodes_per_s": final["episodes"] / sum(step_s),
        # robust to a burst of load from other jobs on a shared machine: batch / median step time
        "episodes_per_s_median_step": WORK["batch_size"] / sorted(step_s)[len(step_s) // 2],
        "generation_s": gen_s, "scoring_s": score_s, "training_s": train_s,
        "other_s": sum(step_s) - gen_s - score_s - train_s,
        "generated_tokens_per_s": gen_tokens / gen_s if gen_tokens else None,
        "update_gflop": flops / 1e9 if flops else None,
        "update_gflop_per_s": flops / 1e9 / train_s if flops else None,
        "mean_response_length": sum(r["response/length"] for r in rows) / len(rows),
        "stage_wall_s": wall, "trainable_params": final["trainable_params"], "total_params": final["total_params"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    out_json.write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------------ parent


def peer_venv_python() -> Path | None:
    py = Path(os.environ.get("PEER_VENV", "/tmp/peer-venv")) / "bin" / "python"
    return py if py.is_file() else None


def run_peer(threads: int, repeats: int = 1) -> dict | None:
    """The peer's own ppo_bench.py (small model, full and LoRA) in its venv (TRL 1.12), under /usr/bin/time -v, on
    the same assets. The venv is what the peer's run.sh makes (`bash run.sh` once creates /tmp/peer-venv)."""
    import re

    py = peer_venv_python()
    if py is None:
        print("[peer] no venv at /tmp/peer-venv: run `bash shared/peers/trl-ppo-1.12/run.sh` once (RUNS=1) to make "
              "it, or set PEER_VENV", flush=True)
        return None
    results = RESULTS / "peer"
    (results / "time").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PEER_ASSETS=str(ASSETS / "peer-assets"), PEER_RESULTS=str(results),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    runs: dict[str, list[dict]] = {}
    for rep in range(1, repeats + 1):
        for mode in ("full", "lora"):
            time_file = results / "time" / f"ppo_small_{mode}_{rep}.txt"
            print(f"[peer {mode} #{rep}] {py} ppo_bench.py --size small --mode {mode} --run {rep}", flush=True)
            load_start = os.getloadavg()[0]
            proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_file), str(py), "ppo_bench.py", "--size",
                                   "small", "--mode", mode, "--run", str(rep)], cwd=PEER_DIR, env=env,
                                  capture_output=True, text=True)
            p = results / f"ppo_small_{mode}_{rep}.json"
            if proc.returncode != 0 or not p.is_file():
                print(proc.stdout[-1500:], proc.stderr[-3000:])
                continue
            r = json.loads(p.read_text())
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text())
            runs.setdefault(mode, []).append({
                "episodes_per_s": r["episodes_per_s"], "peak_rss_mib": int(m.group(1)) / 1024 if m else None,
                "s_per_update": r["s_per_update_median"], "gen_share": r["gen_share"], "threads": r["threads"],
                "episodes_per_s_median_step": r["batch_size"] / r["s_per_update_median"],
                "load": [round(load_start, 2), round(os.getloadavg()[0], 2)]})
            print(json.dumps(runs[mode][-1]), flush=True)
    return {mode: sorted(rs, key=lambda r: r["episodes_per_s"])[len(rs) // 2] for mode, rs in runs.items()} or None


def table(results: dict, peer: dict | None) -> str:
    """Markdown table of the rlchat modes and the peer, and the ratios against the peer's full-model run."""
    def eps_median(r):
        if r.get("episodes_per_s_median_step"):
            return r["episodes_per_s_median_step"]
        return WORK["batch_size"] / r["s_per_update"] if "s_per_update" in r else float("nan")

    def load(r):  # 1-minute load average at the start and end of the run (the machine is shared)
        return "/".join(f"{x:.1f}" for x in r["load"]) if r.get("load") else ""

    lines = ["| run | episodes/s | episodes/s (median step) | peak RSS MiB | gen s | scoring s | training s | "
             "gen tok/s | update GFLOP/s | trainable params | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| rlchat {mode} | {r['episodes_per_s']:.2f} | {eps_median(r):.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['generation_s']:.1f} | {r['scoring_s']:.1f} | {r['training_s']:.1f} | "
                     f"{r['generated_tokens_per_s'] or 0:.0f} | {r['update_gflop_per_s'] or 0:.1f} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {load(r)} |")
    for name, src in (("peer, this session", peer), ("peer, recorded", PEER_RECORDED)):
        for mode, r in (src or {}).items():
            lines.append(f"| {name}: TRL {mode} | {r['episodes_per_s']:.2f} | {eps_median(r):.2f} | "
                         f"{r['peak_rss_mib'] or 0:.0f} | | | | | | | {load(r)} |")
    ref = (peer or PEER_RECORDED)["full"]
    which = "this session" if peer else "recorded"
    lines.append("")
    for mode, r in results.items():
        lines.append(f"- rlchat {mode} vs the peer's full-model run ({which}): "
                     f"{r['episodes_per_s'] / ref['episodes_per_s']:.2f}x episodes/s "
                     f"({eps_median(r) / eps_median(ref):.2f}x by median step), "
                     f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x peak RSS")
    return "\n".join(lines)


def load_saved(modes: list[str]) -> tuple[dict, dict | None, dict]:
    """Results already in benchmarks/results (for --table-only): median run per mode, and the peer's."""
    import re

    runs = {}
    for mode in modes:
        rs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"rlchat_{mode}_*.json"))]
        if rs:
            runs[mode] = rs
    peer_runs: dict[str, list[dict]] = {}
    for p in sorted((RESULTS / "peer").glob("ppo_small_*_*.json")):
        r = json.loads(p.read_text())
        t = RESULTS / "peer" / "time" / (p.stem + ".txt")
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t.read_text()) if t.is_file() else None
        peer_runs.setdefault(r["mode"], []).append({
            "episodes_per_s": r["episodes_per_s"], "peak_rss_mib": int(m.group(1)) / 1024 if m else None,
            "s_per_update": r["s_per_update_median"], "gen_share": r["gen_share"], "threads": r["threads"],
            "episodes_per_s_median_step": r["batch_size"] / r["s_per_update_median"]})
    median = lambda rs: sorted(rs, key=lambda r: r["episodes_per_s"])[len(rs) // 2]  # noqa: E731
    results = {mode: median(rs) for mode, rs in runs.items()}
    peer = {mode: median(rs) for mode, rs in peer_runs.items()} or None
    return results, peer, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="shared,separate,critic",
                    help="comma-separated: shared (one base, value adapter), separate (four models), critic (one "
                         "base, value head on the policy), full (four models, all weights trained), grpo and rloo "
                         "(rlchat grpo / rloo: no value model, 2 prompts x 4 generations per batch); a -gc suffix "
                         "adds gradient checkpointing (shared-gc, critic-gc, grpo-gc)")
    ap.add_argument("--threads", type=int, default=WORK["threads"])
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode (interleaved); the median is reported")
    ap.add_argument("--peer", action="store_true", help="also run the peer's ppo_bench.py (small, full and LoRA) in "
                                                         "its venv on the same assets, in this session")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the model and run-directory assets")
    ap.add_argument("--table-only", action="store_true", help="rebuild summary.md from the saved results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    if a.child:
        child(a.child, Path(a.out), json.loads((ASSETS / "assets.json").read_text()), a.threads)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.table_only:
        results, peer, runs = load_saved(a.modes.split(","))
        text = table(results, peer)
        (RESULTS / "summary.md").write_text(text + "\n")
        (RESULTS / "summary.json").write_text(json.dumps({"rlchat": results, "rlchat_all_runs": runs,
                                                          "peer_session": peer, "peer_recorded": PEER_RECORDED,
                                                          "work": WORK}, indent=1))
        print(text)
        return
    info = build_assets(force=a.rebuild)
    print(f"assets: {info['params'] / 1e6:.2f}M-parameter Llama, vocab {info['vocab']}, {info['source']}",
          flush=True)
    runs: dict[str, list[dict]] = {}
    for rep in range(a.repeats):  # modes interleaved, so a noisy minute hits one run, not one mode
        for mode in a.modes.split(","):
            out = RESULTS / f"rlchat_{mode}_{rep + 1}.json"
            print(f"[rlchat {mode} #{rep + 1}] running", flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--out", str(out), "--threads",
                                   str(a.threads)], env=env, cwd=str(ROOT), capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:])
                raise SystemExit(f"mode {mode} failed")
            runs.setdefault(mode, []).append(json.loads(out.read_text()))
            print(json.dumps(runs[mode][-1]), flush=True)
    # the median run by episodes/s (the peer's summary reports medians too); all runs are kept in summary.json
    results = {mode: sorted(rs, key=lambda r: r["episodes_per_s"])[len(rs) // 2] for mode, rs in runs.items()}
    peer = run_peer(a.threads, a.repeats) if a.peer else None
    text = table(results, peer)
    (RESULTS / "summary.md").write_text(text + "\n")
    (RESULTS / "summary.json").write_text(json.dumps({"rlchat": results, "rlchat_all_runs": runs,
                                                      "peer_session": peer,
                                                      "peer_recorded": PEER_RECORDED, "work": WORK}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
