"""Multi-process data parallel (`--num-processes N`, accelerate; gloo on CPU): N processes holding 1/N of a batch
compute what one process holding all of it computes.

Fast (each a real 2-process `accelerate launch` of tests/dist_worker.py, a few seconds each):
  - batch statistics with reduce=rlchat.dist.all_sum (masked_whiten, masked_var, explained_variance): the halves put
    back together equal one process's result on the whole tensor; whitening each half with its own statistics
    (a forgotten `reduce`) does not, by far more than the tolerance;
  - the first PPO update (`ppo_update`, grad_accum 1 and 2): the gradient (Adam's first moment), the parameters
    after the step and the losses equal one process's; both processes hold identical parameters; the same update
    with reduce=None lands measurably elsewhere.
Slow (`python -m rlchat <stage> ... --num-processes 2` end to end on the tiny model):
  - sft: 2 processes x batch 4 == 1 process x batch 8 (per-step loss and grad norm, adapter weights, eval loss);
    the run directory holds the same files;
  - train-reward and ppo finish with 2 processes; ppo logs 2 x batch episodes per step, keeps every process's
    RNG in its checkpoints, resumes after the whole process group is SIGKILLed, and refuses to resume with
    another process count (one-line error, run directory untouched);
  - eval shards the prompts: every prompt answered once, the same greedy answers as one process;
  - a user error under --num-processes 2 is one `error:` line, exit 2, no traceback.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import snapshot

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
JUDGE = "rlchat.demo.task:judge"


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "RLCHAT_LAUNCHED", "RLCHAT_ERROR_FILE", "RLCHAT_TEST_KILL"):
        e.pop(k, None)  # pytest itself might run under a launcher
    return e


def tail(text: str, n: int = 3000) -> str:
    """The end of a run's output, after the exception lines of every process (a crash in one rank shows up in
    the others as a lost connection; the first cause is often far from the end)."""
    causes = list(dict.fromkeys(line.strip() for line in text.splitlines()
                                if re.search(r"^(\[rank\d+\]: )?\w*(Error|Exception|error)\b[:(]", line.strip())))
    return "\n".join(["exceptions:", *causes[:12], "---- output tail:", text[-n:]])


# ============================================================================ fast: the math, 2 real processes


def launch_worker(n: int, mode: str, outdir: Path, *args, timeout: float = 300) -> list[dict]:
    """Run tests/dist_worker.py in n processes under accelerate; each process's saved results, by rank."""
    import torch

    from rlchat.launch import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(n),
           "--main_process_port", str(free_port()), str(WORKER), mode, str(outdir), *map(str, args)]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, tail(res.stdout + res.stderr)
    out = [torch.load(outdir / f"rank-{r}.pt", weights_only=True) for r in range(n)]
    assert [o["world"] for o in out] == [n] * n
    return out


@pytest.fixture
def one_thread():
    """The in-process single-process reference runs with one intra-op thread, like the workers; the thread count
    and the global RNG (the reference seeds it) are restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(before)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_batch_statistics_of_two_processes_equal_one(tmp_path, one_thread):
    from tests import dist_worker as W

    x, y, mask = W.whiten_inputs()
    ref = W.whiten_results(x, y, mask, None)  # one process, the whole (8, 7) tensor
    parts = launch_worker(2, "whiten", tmp_path / "out")
    assert sorted(r for p in parts for r in p["rows"]) == list(range(W.B))

    def together(key):
        out = x.new_zeros(x.shape)
        for p in parts:
            out[p["rows"]] = p[key]
        return out

    # float32 values of order 1, statistics summed over ~35 elements in another order (two partial sums, then
    # gloo's sum): rounding differences are ~1e-7 (measured 2.4e-7); 1e-6 leaves room and is 1e5 times smaller
    # than what per-half statistics give (below)
    diffs = {}
    for key in ("whiten", "whiten_keep_mean"):
        diffs[key] = (together(key) - ref[key]).abs().max().item()
        assert diffs[key] <= 1e-6, (key, diffs[key])
    for key in ("var_unbiased", "var_biased", "explained_variance"):
        for p in parts:  # every process gets the global number
            diffs[key] = max(diffs.get(key, 0.0), abs(p[key].item() - ref[key].item()))
        assert diffs[key] <= 1e-6 * max(1.0, abs(ref[key].item())), (key, diffs[key])
    # the check can fail: without reduce each process whitens with its own half's mean and variance
    local = (together("noreduce/whiten") - ref["whiten"]).abs().max().item()
    print(f"\nwhitening, 2 processes vs 1: max abs diffs {diffs}; per-half statistics instead: {local:.3g}")
    assert local > 1e-2, local


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_first_ppo_update_of_two_processes_equals_one(grad_accum, tmp_path, tiny_model, one_thread):
    from tests import dist_worker as W

    lr = 1e-3
    ref = W.one_update(str(tiny_model), grad_accum, lr, 0, 1, True)  # one process, all 8 rollouts
    r0, r1 = launch_worker(2, "ppo_update", tmp_path / "out", "--model", tiny_model, "--grad-accum", grad_accum,
                           "--lr", lr)
    assert r0["distributed_type"] in ("MULTI_CPU", "MULTI_GPU"), r0["distributed_type"]
    assert r0["tokens"] + r1["tokens"] == ref["tokens"] and r0["tokens"] != r1["tokens"]  # ragged halves
    assert r1["widths"] != ref["widths"]  # rank 1's share is padded narrower than the whole batch

    # the gradient: after Adam's first step exp_avg = (1 - beta1) * the (clipped) gradient. Gradients here are up
    # to ~0.1; summation order (other padding widths, micro-batch splits, gloo's sum of two halves) changes them
    # by ~1e-7 relative (measured ~2e-9 absolute on exp_avg); 1e-4 of the largest entry is far above that and far
    # below what a wrong token denominator gives (below)
    scale = max(v.abs().max().item() for v in ref["exp_avg"].values())
    grad_diff = max_abs_diff(r0["exp_avg"], ref["exp_avg"])
    assert grad_diff <= 1e-4 * scale, (grad_diff, scale)
    # the parameters after the step: Adam's first step moves each by about lr * sign(gradient) = 1e-3, so
    # rounding-level gradient differences move them by far less (measured up to ~3e-7, where a gradient entry is
    # as small as Adam's eps); 1e-5 is 1% of a step
    param_diff = max_abs_diff(r0["params"], ref["params"])
    assert param_diff <= 1e-5, param_diff
    # DDP averages the gradients: every process takes exactly the same step
    assert max_abs_diff(r0["params"], r1["params"]) == 0.0
    assert max_abs_diff(r0["exp_avg"], r1["exp_avg"]) == 0.0
    # each process's loss is its part of the global token mean, times the number of processes: their mean is the
    # global loss (what _run logs after accelerator.reduce(..., "mean"))
    loss_diffs = {}
    for key in ("loss/policy", "loss/value"):
        both = (r0["stats"][key] + r1["stats"][key]) / 2
        loss_diffs[key] = abs(both - ref["stats"][key])
        assert loss_diffs[key] <= 1e-5, (key, both, ref["stats"][key])
    # the check can fail: ppo_update without reduce divides each process's loss by its own token count
    no_param = max_abs_diff(r0["noreduce/params"], ref["params"])
    no_grad = max_abs_diff(r0["noreduce/exp_avg"], ref["exp_avg"])
    print(f"\nPPO update, grad_accum {grad_accum}, 2 processes vs 1: exp_avg max abs diff {grad_diff:.3g} "
          f"(largest entry {scale:.3g}), parameters {param_diff:.3g}, losses {loss_diffs}; without reduce: "
          f"exp_avg {no_grad:.3g}, parameters {no_param:.3g}")
    assert no_grad > 1e-2 * scale and no_param > 1e-4, (no_grad, no_param)


# ========================================================================= slow: the stages, end to end via CLI


def rlchat(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlchat", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, tail(res.stdout + res.stderr)
    assert "Traceback" not in res.stderr, tail(res.stderr)
    return res


def manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def leftovers(run: Path) -> list[str]:
    """Tmp files and dirs of atomic writes, a lock: what a finished run must not hold."""
    return [str(p.relative_to(run)) for p in run.rglob("*")
            if ".tmp" in p.name or ".old-" in p.name or p.name == ".lock"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, demo_data) -> dict:
    """The first 200 rows of each demo file: every process of every run tokenizes its data on start."""
    out = tmp_path_factory.mktemp("mp-data")
    small = {}
    for key, path in demo_data.items():
        small[key] = out / Path(path).name
        small[key].write_text("".join(Path(path).read_text().splitlines(keepends=True)[:200]))
    return small


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_model, small_data) -> dict:
    """The same SFT run twice: 1 process x batch 8, and 2 processes x batch 4 (2 steps, no dropout)."""
    base = tmp_path_factory.mktemp("mp-sft")
    common = ["sft", "--model", tiny_model, "--dataset", small_data["sft"], "--max-steps", 2, "--lora-dropout", 0,
              "--logging-steps", 1, "--seed", 3]
    one, two = base / "one", base / "two"
    ok(rlchat(*common, "--run-dir", one, "--batch-size", 8))
    ok(rlchat(*common, "--run-dir", two, "--batch-size", 4, "--num-processes", 2))
    return {"one": one, "two": two, "base": base}


def _rng_name(rel: str) -> str | None:
    """The Trainer saves a checkpoint's RNG as rng_state.pth (1 process) or rng_state_<rank>.pth (several): the
    same file for rank 0, an extra one per other rank."""
    m = re.fullmatch(r"(.*/)rng_state_(\d+)\.pth", rel)
    if not m:
        return rel
    return m.group(1) + "rng_state.pth" if m.group(2) == "0" else None


@pytest.mark.slow
def test_sft_two_processes_half_batch_equals_one_process(sft_runs):
    from safetensors.torch import load_file

    one, two = sft_runs["one"], sft_runs["two"]
    rec1, rec2 = manifest(one)["stages"]["sft"], manifest(two)["stages"]["sft"]
    assert rec1["status"] == rec2["status"] == "done", (rec1, rec2)
    assert rec1["metrics"]["processes"] == 1 and rec2["metrics"]["processes"] == 2
    assert rec2["metrics"]["steps"] == 2

    rows1 = {r["step"]: r for r in read_jsonl(one / "sft" / "metrics.jsonl") if "loss" in r}
    rows2 = {r["step"]: r for r in read_jsonl(two / "sft" / "metrics.jsonl") if "loss" in r}
    assert sorted(rows1) == sorted(rows2) == [1, 2]
    diffs = {}
    for step in (1, 2):
        for key in ("loss", "grad_norm"):
            # the same 8 examples, split 4 + 4 and averaged by DDP: only summation order differs (measured
            # ~1e-7 relative); 1e-5 relative is far below what a skipped gradient average gives
            rel = abs(rows2[step][key] - rows1[step][key]) / abs(rows1[step][key])
            diffs[f"{key}@{step}"] = rel
            assert rel <= 1e-5, (step, key, rows1[step][key], rows2[step][key])
    w1 = load_file(str(one / "sft" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "sft" / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    weight_diff = max_abs_diff(w1, w2)
    assert weight_diff <= 1e-5, weight_diff  # measured ~2e-8 (two Adam steps of lr 2e-4 move them ~4e-4)
    # the Trainer's eval loss is a mean of per-batch means, and the eval batches differ (4 per process vs 8):
    # close, not equal (measured ~3e-5 relative)
    eval_diffs = {}
    for key in ("eval_loss", "eval_loss_before"):
        a, b = rec1["metrics"][key], rec2["metrics"][key]
        eval_diffs[key] = abs(a - b) / abs(a)
        assert eval_diffs[key] <= 2e-3, (key, a, b)
    print(f"\nsft 2x4 vs 1x8: relative diffs {diffs}, adapter max abs diff {weight_diff:.3g}, eval {eval_diffs}")

    # the same files (rank 0 alone writes); the Trainer adds one RNG file per extra process to its checkpoints
    files1 = {rel for rel, kind in snapshot(one).items() if kind != "dir"}
    files2 = {rel for rel, kind in snapshot(two).items() if kind != "dir"}
    assert {_rng_name(f) for f in files2} - {None} == {_rng_name(f) for f in files1}
    assert any(f.endswith("rng_state_1.pth") for f in files2), sorted(files2)
    assert not leftovers(one) and not leftovers(two), (leftovers(one), leftovers(two))


@pytest.mark.slow
def test_train_reward_with_two_processes(sft_runs, small_data):
    run = sft_runs["base"] / "reward-run"
    shutil.copytree(sft_runs["two"], run)
    ok(rlchat("train-reward", "--run-dir", run, "--dataset", small_data["pairs"], "--max-steps", 2,
              "--batch-size", 4, "--eval-fraction", 0.1, "--logging-steps", 1, "--num-processes", 2))
    rec = manifest(run)["stages"]["reward"]
    assert rec["status"] == "done", rec
    m = rec["metrics"]
    assert m["processes"] == 2 and m["steps"] == 2, m
    assert m["eval_accuracy"] is not None and 0.0 <= m["eval_accuracy"] <= 1.0, m
    assert (run / "reward" / "adapter" / "adapter_model.safetensors").is_file()
    assert not leftovers(run), leftovers(run)


@pytest.mark.slow
def test_eval_with_two_processes_answers_every_prompt_once_like_one_process(sft_runs, small_data):
    n_prompts = 18  # 5 batches of 4 (the last of 2): 3 for rank 0, 2 for rank 1
    args = ["--dataset", small_data["eval_prompts"], "--max-prompts", n_prompts, "--batch-size", 4,
            "--max-new-tokens", 8, "--judge", JUDGE, "--include-base"]
    runs = {}
    for n in (1, 2):
        runs[n] = sft_runs["base"] / f"eval-{n}"
        shutil.copytree(sft_runs["two"], runs[n])
        ok(rlchat("eval", "--run-dir", runs[n], *args, *(["--num-processes", 2] if n == 2 else [])))
    two = runs[2]
    assert (two / "eval" / "report.json").is_file()
    assert manifest(two)["stages"]["eval"]["status"] == "done"
    rows = read_jsonl(two / "eval" / "responses.jsonl")
    prompts = [json.loads(line)["prompt"] for line in  # chat messages
               Path(small_data["eval_prompts"]).read_text().splitlines()[:n_prompts]]
    assert [r["index"] for r in rows] == list(range(n_prompts))
    assert [r["messages"] for r in rows] == prompts  # every prompt once, in order
    for r in rows:
        assert set(r["policies"]) == {"base", "sft"}
        for p in r["policies"].values():
            assert isinstance(p["response"], str) and p["judge"] is not None and p["log_ratio"] is not None
    # greedy decoding of the same batches: the same answers as one process, in the same rows
    ref = read_jsonl(runs[1] / "eval" / "responses.jsonl")
    for a, b in zip(ref, rows):
        for name in ("base", "sft"):
            assert a["policies"][name]["response"] == b["policies"][name]["response"], (a["index"], name)
            assert a["policies"][name]["log_ratio"] == pytest.approx(b["policies"][name]["log_ratio"], abs=1e-4)
    report = json.loads((two / "eval" / "report.json").read_text())
    assert report["settings"]["n_prompts"] == n_prompts
    assert not leftovers(two), leftovers(two)


@pytest.mark.slow
def test_user_error_under_two_processes_is_one_line(tmp_path, small_data):
    run = tmp_path / "run"
    res = rlchat("sft", "--run-dir", run, "--model", tmp_path / "no-such-model", "--dataset", small_data["sft"],
                 "--max-steps", 2, "--num-processes", 2)
    out = res.stdout + res.stderr
    assert res.returncode == 2, tail(out)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no-such-model" in errors[0], tail(out)
    assert "Traceback" not in out and "ChildFailedError" not in out, tail(out)
    assert not run.exists()


# ---- ppo: 2 processes, killed, resumed; another process count refused ------------------------------------------


def complete_steps(ckpt_dir: Path) -> list[int]:
    steps = []
    for p in ckpt_dir.glob("step-*") if ckpt_dir.is_dir() else []:
        try:
            json.loads((p / "state.json").read_text())
        except (OSError, ValueError):
            continue
        steps.append(int(p.name.split("-")[1]))
    return sorted(steps)


def kill_group_when(proc: subprocess.Popen, ready, timeout: float = 240) -> list[int]:
    """SIGKILL the process group of `proc` (started with start_new_session=True) once ready() is true. Returns the
    pids of its descendants that outlived the kill (then killed one by one, so nothing keeps running)."""
    import psutil

    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed:\n"
                                 + tail("".join(proc.communicate())))
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.01)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    _, alive = psutil.wait_procs(family, timeout=1)
    survivors = []
    for p in alive:  # torchrun starts each worker in a session of its own
        try:
            if p.status() != psutil.STATUS_ZOMBIE:  # dead, not yet reaped by init
                survivors.append(p.pid)
                p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return survivors


@pytest.mark.slow
def test_ppo_two_processes_resume_after_kill_and_refuse_another_process_count(tmp_path, tiny_model, small_data):
    run = tmp_path / "run"
    ckpt = run / "ppo" / "checkpoints"
    batch, steps = 4, 30
    cmd = ["ppo", "--run-dir", run, "--model", tiny_model, "--dataset", small_data["prompts"], "--reward-fn", JUDGE,
           "--batch-size", batch, "--episodes", steps * batch * 2, "--ppo-epochs", 1, "--response-length", 8,
           "--lora-r", 4, "--lora-alpha", 8, "--save-every", 1, "--sample-every", 5]
    proc = subprocess.Popen([sys.executable, "-m", "rlchat", *map(str, cmd), "--num-processes", "2"], cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    survivors = kill_group_when(proc, lambda: bool(complete_steps(ckpt)))
    status_after_kill = manifest(run)["stages"]["ppo"]["status"]  # "running" unless survivors went on (below)
    last = complete_steps(ckpt)[-1]
    assert last < steps
    state = json.loads((ckpt / f"step-{last}" / "state.json").read_text())
    assert state["layout"]["processes"] == 2 and state["episodes"] == last * batch * 2, state
    assert (ckpt / f"step-{last}" / "rng-1.pt").is_file() and len(state["rng_ranks"]) == 2

    # the interrupted run cannot go on with another number of processes (its batches are per process)
    before = snapshot(run)
    res = rlchat(*cmd, "--num-processes", 1)
    out = res.stdout + res.stderr
    assert res.returncode == 2, tail(out)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "processes" in errors[0], tail(out)
    assert "Traceback" not in out, tail(out)
    assert snapshot(run) == before

    # the same command resumes from the newest checkpoint and finishes
    res = ok(rlchat(*cmd, "--num-processes", 2))
    assert f"resuming from step-{last}" in res.stdout + res.stderr, tail(res.stdout + res.stderr)
    rec = manifest(run)["stages"]["ppo"]
    assert rec["status"] == "done", rec
    m = rec["metrics"]
    assert m["processes"] == 2 and m["steps"] == steps and m["episodes"] == steps * batch * 2, m
    assert m["resumed_from"] == f"step-{last}", m
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # each step once, the killed run's extra dropped
    assert all(r["episodes"] == r["step"] * batch * 2 for r in rows), [r["episodes"] for r in rows]
    kept = complete_steps(ckpt)
    assert kept and all((ckpt / f"step-{s}" / "rng-1.pt").is_file() for s in kept), kept
    assert (run / "ppo" / "policy" / "adapter_model.safetensors").is_file()
    assert not leftovers(run), leftovers(run)
    # SIGKILL of the whole process group of `rlchat ... --num-processes 2` must stop its worker processes too
    # (then the manifest still says "running", as after any SIGKILL); checked last so that the resume above is
    # tested either way (the survivors were killed by pid after 1 s)
    assert not survivors and status_after_kill == "running", (
        f"the worker processes outlived the SIGKILL of the process group of `rlchat ppo --num-processes 2`: "
        f"{len(survivors)} still running 1 s later {survivors}; the manifest said {status_after_kill!r} (a killed "
        "process cannot write 'failed': a surviving worker did)")
