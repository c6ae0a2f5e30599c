"""`rlchat sample-pairs`: preference pairs sampled from a model and labelled by a judge (RLAIF-style pairs).

For each prompt the model answers --samples times (k, default 2; sampling at --temperature with the model's own
chat template, stopping at its EOS). The judge (`module:function` or `path/file.py:function`, called as
f(prompts, completions) -> list[float], higher is better) scores every answer; the best one becomes `chosen` and
the worst `rejected`. Then, with probability --label-noise, the two are swapped, as human labels disagree with any
gold judge some of the time. Pairs whose scores differ by --min-margin or less carry no (or only noise) signal and
are left out.

--pairs all keeps every two answers of a prompt instead (k(k-1)/2 pairs, 6 at k = 4; the higher-scored one
chosen), for k(k-1)/2 times the pairs from the same generation: more for the reward model to learn from, at more
training time; pairs of one prompt share answers, so train-reward and dpo hold out whole prompts
(data.split_eval's groups), not single pairs.

Why best of k against worst of k: two samples of one model often read alike, so many of their judge margins are
tiny and the reward model learns from coin flips; the extremes of k samples are further apart (the expected gap
between the best and worst of k grows with k), at k times the generation cost per pair. Both answers are still
the starting model's own (on-policy pairs: the reward model must rank what the policy will actually produce).

Output: JSONL in TRL's explicit conversational preference format, which `rlchat train-reward` reads directly:

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [...], "judge_chosen": 0.71, "judge_rejected": 0.44, "label_flipped": false,
     "eos_chosen": true, "eos_rejected": false}

`judge_chosen` / `judge_rejected` are the judge's scores of the two answers as labelled (after a flip, chosen is
the lower one); `train-reward` uses them to say how much signal the pairs hold (rlchat/reward_checks.py). The
judge is used here only to label; nothing else in rlchat trains on it.

    rlchat sample-pairs --model .models/smollm2-135m-instruct --dataset data/prompts.jsonl \\
        --judge rlchat.tasks.readable:judge --out data/pairs.jsonl --samples 4 --label-noise 0.1
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from rlchat.errors import ConfigError, DataError, RlchatError


def check_settings(label_noise: float, min_margin: float, max_new_tokens: int, temperature: float, top_p: float,
                   batch_size: int, max_prompts: int | None, samples: int = 2) -> None:
    """Every bad setting at once, as one ConfigError."""
    problems = []
    if not 0 <= label_noise < 0.5:
        problems.append(f"label_noise must be in [0, 0.5), got {label_noise}")
    if not min_margin >= 0:
        problems.append(f"min_margin must be >= 0, got {min_margin}")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0 (greedy answers to one prompt would be identical), got "
                        f"{temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        problems.append(f"batch_size must be > 0, got {batch_size}")
    if max_prompts is not None and max_prompts < 1:
        problems.append(f"max_prompts must be > 0, got {max_prompts}")
    if samples < 2:
        problems.append(f"samples must be >= 2 (a pair needs two answers), got {samples}")
    if problems:
        raise ConfigError(problems, "use values in the ranges shown (see `rlchat sample-pairs --help`)")


def check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise RlchatError(f"{out} is a directory", "pass a file path such as data/pairs.jsonl")
    if out.exists() and not overwrite:
        raise RlchatError(f"{out} already exists", "pass another --out, or --overwrite to replace it")


PAIRINGS = ("best-worst", "all")


def make_pairs(prompts: list, completions: list[tuple[str, ...]], scores: list[tuple[float, ...]],
               eos: list[tuple[bool, ...]], label_noise: float, min_margin: float, seed: int,
               pairing: str = "best-worst") -> tuple[list, int]:
    """Pairs from k scored answers per prompt: (rows, n_skipped). "best-worst": the highest-scored answer is
    chosen and the lowest rejected (the first of equals); "all": every two answers (k(k-1)/2 per prompt), the
    higher-scored one chosen. Each kept pair is then swapped with probability label_noise (one seeded draw per
    pair). A score difference <= min_margin, a tie, or two identical texts is skipped."""
    rng = random.Random(seed)
    rows, skipped = [], 0
    for messages, texts, sc, ends in zip(prompts, completions, scores, eos):
        if pairing == "all":
            order = sorted(range(len(sc)), key=lambda i: (-sc[i], i))  # best first
            combos = [(order[x], order[y]) for x in range(len(order)) for y in range(x + 1, len(order))]
        else:
            combos = [(max(range(len(sc)), key=lambda i: (sc[i], -i)), min(range(len(sc)), key=lambda i: (sc[i], i)))]
        for hi, lo in combos:
            a, b, sa, sb, ea, eb = texts[hi], texts[lo], sc[hi], sc[lo], ends[hi], ends[lo]
            if sa - sb <= min_margin or sa == sb or a == b:
                skipped += 1
                continue
            flip = rng.random() < label_noise
            if flip:
                a, b, sa, sb, ea, eb = b, a, sb, sa, eb, ea
            rows.append({"prompt": messages, "chosen": [{"role": "assistant", "content": a}],
                         "rejected": [{"role": "assistant", "content": b}], "judge_chosen": sa,
                         "judge_rejected": sb, "label_flipped": flip, "eos_chosen": ea, "eos_rejected": eb})
    return rows, skipped


def _read_prompts(dataset: str, split: str, dataset_config: str | None, max_prompts: int | None):
    """(messages, texts) of the first max_prompts prompts; DataError when there are none."""
    from rlchat import data

    ds = data.load_any(dataset, split=split, config=dataset_config)
    if len(ds) == 0:
        raise DataError(f"dataset {dataset} has no prompts", "pass a dataset with at least one row")
    column = data.detect_prompt_column(ds, dataset)
    n = len(ds) if max_prompts is None else min(max_prompts, len(ds))
    rows = [ds[i] for i in range(n)]
    return [data.to_prompt_messages(r, column) for r in rows], [data.prompt_text(r, column) for r in rows]


def _sample(lm, tokenizer, messages: list, k: int, max_new_tokens: int, temperature: float, top_p: float,
            batch_size: int) -> tuple[list[list[str]], list[list[bool]], int, float]:
    """k answers per prompt (each batch holds batch_size // k prompts, each k times): (answers, has_eos,
    tokens generated, generation seconds)."""
    from rlchat.generation import (decode_responses, encode_prompt, generate, generation_config, prompt_limit,
                                   stop_token_ids)
    from rlchat.progress import stage_progress

    n = len(messages)
    limit = prompt_limit(lm, max_new_tokens)
    prompt_ids = [encode_prompt(tokenizer, m, limit) for m in messages]
    stop_ids = stop_token_ids(lm, tokenizer)
    gen = generation_config(max_new_tokens, temperature, top_p, stop_ids, tokenizer.pad_token_id,
                            bos_id=tokenizer.bos_token_id)
    per_batch = max(1, batch_size // k)
    answers: list[list[str]] = [[] for _ in range(n)]
    has_eos: list[list[bool]] = [[] for _ in range(n)]
    n_tokens, t0 = 0, time.time()
    with stage_progress() as progress:
        task = progress.add_task("sample-pairs", total=n, info="")
        for start in range(0, n, per_batch):
            idx = list(range(start, min(start + per_batch, n)))
            resp, stops = generate(lm, tokenizer, [prompt_ids[i] for i in idx for _ in range(k)], gen, stop_ids)
            for j, (text, stopped) in enumerate(zip(decode_responses(tokenizer, resp, stop_ids), stops)):
                answers[idx[j // k]].append(text.strip())
                has_eos[idx[j // k]].append(bool(stopped))
            n_tokens += sum(len(ids) for ids in resp)
            progress.update(task, completed=idx[-1] + 1,
                            info=f"{n_tokens / max(time.time() - t0, 1e-9):.0f} tokens/s")
    return answers, has_eos, n_tokens, time.time() - t0


def sample_pairs(model: str, dataset: str, judge: str, out: str | Path, *, split: str = "train",
                 dataset_config: str | None = None, max_prompts: int | None = None, samples: int = 2,
                 label_noise: float = 0.0, min_margin: float = 0.0, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                 overwrite: bool = False, trust_remote_code: bool = False, dtype: str = "auto",
                 pairing: str = "best-worst") -> dict:
    """Sample k answers per prompt, label best against worst with the judge, write TRL preference pairs to `out`
    (JSONL, atomically). Returns a summary dict; nothing is written on bad input."""
    import torch

    from rlchat import models
    from rlchat.fileio import atomic_write_text
    from rlchat.progress import console, quiet_libraries
    from rlchat.rewards import DUMMY_COMPLETIONS, DUMMY_PROMPTS, call_judge, load_judge

    t0 = time.time()
    out = Path(out)
    # 1. validate everything before loading a model
    check_settings(label_noise, min_margin, max_new_tokens, temperature, top_p, batch_size, max_prompts, samples)
    models.resolve_dtype(dtype)  # an unknown name: ConfigError before anything loads
    if pairing not in PAIRINGS:
        raise ConfigError(f"--pairs {pairing!r} is not a pairing", "use best-worst or all")
    check_out(out, overwrite)
    messages, texts = _read_prompts(dataset, split, dataset_config, max_prompts)
    judge_fn = load_judge(judge)
    call_judge(judge_fn, judge, DUMMY_PROMPTS, DUMMY_COMPLETIONS, during="the check on two dummy prompts")

    # 2. the model, with its own chat template and stop token(s); k answers per prompt
    quiet_libraries()
    tokenizer = models.load_tokenizer(model, trust_remote_code=trust_remote_code)
    lm = models.load_causal_lm(model, trust_remote_code=trust_remote_code, dtype=dtype, device=models.pick_device())
    models.align_model_with_tokenizer(lm, tokenizer)
    lm.eval()
    n, k = len(messages), samples
    console.print(f"[bold]sample-pairs[/] {n} prompts from {dataset}, {k} answers each from {model} (temperature "
                  f"{temperature}, top-p {top_p}, at most {max_new_tokens} new tokens); judge {judge}",
                  highlight=False)
    torch.manual_seed(seed)
    answers, has_eos, n_tokens, gen_s = _sample(lm, tokenizer, messages, k, max_new_tokens, temperature, top_p,
                                                batch_size)

    # 3. judge, pair best against worst, label noise; write
    flat = call_judge(judge_fn, judge, [t for t in texts for _ in range(k)], [a for row in answers for a in row])
    scores = [tuple(flat[k * i:k * (i + 1)]) for i in range(n)]
    pairs, skipped = make_pairs(messages, [tuple(a) for a in answers], scores, [tuple(e) for e in has_eos],
                                label_noise, min_margin, seed, pairing)
    if not pairs:
        raise DataError(f"no pair left: all {n} prompts got answers with judge scores within min_margin "
                        f"{min_margin} of each other", "lower --min-margin, raise --temperature or --samples, or "
                        "use more prompts")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    return _summary(out, n, k, pairs, skipped, flat, has_eos, n_tokens, gen_s, time.time() - t0, min_margin,
                    label_noise, pairing)


def _summary(out: Path, n: int, k: int, pairs: list, skipped: int, flat: list[float], has_eos: list, n_tokens: int,
             gen_s: float, wall_s: float, min_margin: float, label_noise: float, pairing: str = "best-worst") -> dict:
    """What was written: counts, the judge's spread per answer, the kept pairs' margins, EOS rate, speed."""
    mean, std = statistics.fmean(flat), (statistics.stdev(flat) if len(flat) > 1 else 0.0)
    margins = [abs(r["judge_chosen"] - r["judge_rejected"]) for r in pairs]
    eos_rate = sum(e for row in has_eos for e in row) / (k * n)
    result = {
        "out": str(out), "prompts": n, "samples": k, "pairing": pairing, "pairs": len(pairs), "skipped": skipped,
        "flipped": sum(r["label_flipped"] for r in pairs), "label_noise": label_noise,
        "judge_mean": mean, "judge_std": std, "margin_mean": statistics.fmean(margins),
        "margin_median": statistics.median(margins), "eos_rate": eos_rate, "tokens": n_tokens,
        "tokens_per_s": n_tokens / max(gen_s, 1e-9), "generation_s": round(gen_s, 1), "wall_s": round(wall_s, 1),
    }
    result["summary"] = (
        f"{len(pairs)} pairs ({'best vs worst' if pairing == 'best-worst' else 'every two'} of {k}) from {n} prompts ({skipped} skipped: margin <= {min_margin}; "
        f"{result['flipped']} labels flipped) -> {out}; judge {mean:.3f} +- {std:.3f} per answer, kept |margin| "
        f"mean {result['margin_mean']:.3f} median {result['margin_median']:.3f}; EOS rate {eos_rate:.2f}; "
        f"{result['tokens_per_s']:.0f} tokens/s, {result['wall_s']:.0f}s")
    return result
