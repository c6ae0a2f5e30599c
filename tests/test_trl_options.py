"""The options TRL users reach for, each checked where it lands: --dtype and --attn-implementation on the loaded
models, --lr-scheduler / --warmup-* / --weight-decay in the TrainingArguments, the optimizer and the learning rate
logged at each step (sft and ppo), --eval-split as the held-out set, dataset mixtures (rows, weights, manifest
hashes, resume), and the resume checks of the new settings. Tiny models, CPU, offline.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlchat.config import PPOConfig, SFTConfig, resolve
from rlchat.errors import ConfigError, DataError, ModelError, RunDirError


# one torch thread for the whole module (reproducible, fast on 2 shared cores)
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chats(n: int, tag: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}."}]} for i in range(n)]


# ------------------------------------------------------------------------------------------ TrainingArguments


def test_schedule_weight_decay_and_precision_reach_the_training_arguments(tmp_path):
    from trl import SFTConfig as TrlSFTConfig

    from rlchat.stages.common import trainer_args

    cfg = resolve(SFTConfig, "sft", None, {"run_dir": "r", "lr_scheduler": "cosine", "warmup_ratio": 0.1,
                                           "weight_decay": 0.05, "dtype": "float32"})
    args = TrlSFTConfig(**trainer_args(cfg, tmp_path / "ckpt", has_eval=False))
    assert args.lr_scheduler_type.value == "cosine"
    assert args.warmup_steps == 0.1  # transformers 5: a float < 1 is a fraction of the steps
    assert args.get_warmup_steps(200) == 20
    assert args.weight_decay == 0.05
    assert args.bf16 is False  # --dtype float32 asks for full precision (no autocast even on a bf16 GPU)

    cfg = resolve(SFTConfig, "sft", None, {"run_dir": "r", "warmup_steps": 7})
    args = TrlSFTConfig(**trainer_args(cfg, tmp_path / "ckpt", has_eval=False))
    assert args.get_warmup_steps(200) == 7 and args.lr_scheduler_type.value == "linear" and args.weight_decay == 0


@pytest.mark.parametrize("overrides, phrase", [
    ({"warmup_ratio": 0.1, "warmup_steps": 5}, "warmup_ratio (0.1) and warmup_steps (5) are both set"),
    ({"lr_scheduler": "constant", "warmup_steps": 5}, "use 'constant_with_warmup'"),
    ({"lr_scheduler": "cosin"}, "did you mean 'cosine'?"),
    ({"dtype": "fp16"}, "dtype must be one of auto, float32, bfloat16, float16"),
    ({"dtype": "float16", "full": True}, "full fine-tuning in dtype float16"),
    ({"attn_implementation": "flash"}, "attn_implementation must be one of eager, sdpa, flash_attention_2"),
    ({"eval_split": "train"}, "eval_split 'train' is also the training split"),
    ({"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1)"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"dataset": "a.jsonl:0.5,b.jsonl"}, "give a weight to every dataset of the mixture"),
    ({"dataset": "a.jsonl:-1,b.jsonl:1"}, "the weight of a.jsonl must be a number > 0"),
])
def test_bad_new_options_are_config_errors(overrides, phrase):
    with pytest.raises(ConfigError) as err:
        resolve(SFTConfig, "sft", None, {"run_dir": "r", **overrides})
    assert any(phrase in p for p in err.value.problems), err.value.problems


# ------------------------------------------------------------------------------------------------ loading


def test_dtype_and_attention_reach_every_loader(tiny_model):
    import torch

    from rlchat import models

    with models.load_settings("bfloat16", "eager"):
        lm = models.load_causal_lm(str(tiny_model))
        seq = models.seq_cls_from_causal(lm, pad_token_id=0)
    assert lm.dtype == torch.bfloat16 and lm.config._attn_implementation == "eager"
    assert seq.dtype == torch.bfloat16 and seq.config._attn_implementation == "eager"
    with models.load_settings("auto", "sdpa"):
        lm = models.load_causal_lm(str(tiny_model))
    assert lm.dtype == torch.float32 and lm.config._attn_implementation == "sdpa"  # auto on CPU: float32
    lm = models.load_causal_lm(str(tiny_model))  # outside a stage: as before
    assert lm.dtype == torch.float32
    with models.load_settings("float16"):  # an explicit dtype argument still wins
        assert models.load_causal_lm(str(tiny_model), dtype="float32").dtype == torch.float32


def test_flash_attention_without_the_package_is_a_one_line_model_error(tiny_model):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    from rlchat import models

    with models.load_settings(None, "flash_attention_2"), pytest.raises(ModelError) as err:
        models.load_causal_lm(str(tiny_model))
    assert "\n" not in str(err.value) and "flash" in str(err.value).lower()


# ----------------------------------------------------------------------------------------------- sft runs


def run_sft(tmp_path, tiny_model, dataset, monkeypatch, **kw):
    """A short sft run; returns (run dir, metrics, the Trainer it trained)."""
    from rlchat.stages import common, sft

    seen = {}
    real_train = common.train

    def spy(trainer, begun, stage, cfg):
        seen["trainer"] = trainer
        return real_train(trainer, begun, stage, cfg)

    monkeypatch.setattr(common, "train", spy)
    run = tmp_path / "run"
    overrides = {"run_dir": str(run), "model": str(tiny_model), "dataset": str(dataset), "max_steps": 4,
                 "batch_size": 4, "logging_steps": 1, "save_steps": 100, "lr": 1e-3, "eval_fraction": 0.0}
    overrides.update(kw)
    metrics = sft.run(resolve(SFTConfig, "sft", None, overrides))
    return run, metrics, seen["trainer"]


def test_sft_trains_in_bfloat16_with_eager_attention_warmup_and_weight_decay(tmp_path, tiny_model, demo_data,
                                                                           monkeypatch):
    import torch

    run, metrics, trainer = run_sft(tmp_path, tiny_model, demo_data["sft"], monkeypatch, dtype="bfloat16",
                                    attn_implementation="eager", lr_scheduler="constant_with_warmup",
                                    warmup_steps=2, weight_decay=0.1)
    assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 4
    base = trainer.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.config._attn_implementation == "eager"
    decays = sorted({g["weight_decay"] for g in trainer.optimizer.param_groups})
    assert decays == [0.0, 0.1] or decays == [0.1]  # biases / norms (if trainable) are not decayed
    # the learning rate each step trained with (the Trainer logs the rate of the step's update): linear warmup
    # over 2 steps (0, 1/2 of lr), then constant
    rows = [json.loads(x) for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["learning_rate"] for r in rows if "learning_rate" in r]
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 1e-3])
    config = json.loads((run / "run.json").read_text())["stages"]["sft"]["config"]
    assert config["dtype"] == "bfloat16" and config["lr_scheduler"] == "constant_with_warmup"


def test_sft_dataset_mixture_with_weights_records_each_input(tmp_path, tiny_model, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", chats(40, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "id": i} for i, r in enumerate(chats(10, "beta"))])
    spec = f"{a}:0.5,{b}:0.5"  # equal shares: 10 rows of each (b has only 10), the extra `id` column dropped
    run, metrics, trainer = run_sft(tmp_path, tiny_model, spec, monkeypatch, max_steps=2)
    assert metrics["n_train"] == 20
    texts = [m[0]["content"] for m in trainer.train_dataset["messages"]] if "messages" in \
        trainer.train_dataset.column_names else None
    if texts is not None:  # (TRL may have tokenized the column away)
        assert sum(t.startswith("alpha") for t in texts) == 10
    record = json.loads((run / "run.json").read_text())["stages"]["sft"]["inputs"]["dataset"]
    assert record["kind"] == "mixture" and record["spec"] == spec and record["hash"].startswith("sha256:")
    assert [(p["spec"], p["weight"]) for p in record["parts"]] == [(str(a), 0.5), (str(b), 0.5)]
    assert all(p["hash"].startswith("sha256:") for p in record["parts"])

    # a resume notices that one input of the mixture changed
    from rlchat.fileio import input_record
    from rlchat.rundir import RunDir
    from rlchat.stages.sft import check_resume_matches

    write_jsonl(b, chats(11, "beta"))
    cfg = resolve(SFTConfig, "sft", None, {"run_dir": str(run), "model": str(tiny_model), "dataset": spec})
    with pytest.raises(RunDirError, match="differs from"):
        check_resume_matches(RunDir(run), cfg, {"model": input_record(str(tiny_model)),
                                                "dataset": input_record(spec)})


def test_mixture_rows_and_errors(tmp_path):
    from rlchat import data

    a = write_jsonl(tmp_path / "a.jsonl", chats(30, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", chats(10, "beta"))
    assert len(data.load_any(f"{a},{b}")) == 40  # no weights: every row of each
    mixed = data.load_any(f"{a}:0.75,{b}:0.25")  # 3:1, as large as b allows without repeats: 30 + 10
    firsts = [m[0]["content"].split()[0] for m in mixed["messages"]]
    assert firsts.count("alpha") == 30 and firsts.count("beta") == 10
    mixed = data.load_any(f"{a}:0.2,{b}:0.8")  # 1:4: b (10 rows) bounds it: 2.5 -> 2 or 3 alpha, 10 beta
    firsts = [m[0]["content"].split()[0] for m in mixed["messages"]]
    assert firsts.count("beta") == 10 and firsts.count("alpha") in (2, 3)
    assert data.load_any(f"{a}:0.2,{b}:0.8")["messages"] == mixed["messages"]  # the same rows every time

    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match="share no column"):
        data.load_any(f"{a},{pc}")
    with pytest.raises(DataError, match="dataset file not found"):
        data.load_any(f"{a},{tmp_path / 'missing.jsonl'}")


# ------------------------------------------------------------------------------------------------ eval split


def test_eval_split_is_the_held_out_set(tmp_path, tiny_model, monkeypatch):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(chats(24, "train")),
                 "test": Dataset.from_list(chats(6, "test"))}).save_to_disk(str(path))
    run, metrics, trainer = run_sft(tmp_path, tiny_model, path, monkeypatch, max_steps=2, eval_split="test",
                                    eval_fraction=0.1)
    assert metrics["n_train"] == 24 and metrics["n_eval"] == 6  # all of train trains; eval_fraction unused
    assert metrics["eval_loss"] is not None

    from rlchat.stages import sft

    cfg = resolve(SFTConfig, "sft", None, {"run_dir": str(tmp_path / "r2"), "model": str(tiny_model),
                                           "dataset": str(write_jsonl(tmp_path / "one.jsonl", chats(8, "x"))),
                                           "eval_split": "test"})
    with pytest.raises(DataError) as err:
        sft.run(cfg)
    assert str(err.value).startswith("eval_split: split 'test' not found") and "eval_fraction" in str(err.value)
    assert not (tmp_path / "r2" / "run.json").exists()


def test_reward_eval_split(tmp_path, tiny_model, demo_data):
    from datasets import Dataset, DatasetDict

    from rlchat.config import RewardConfig
    from rlchat.stages import reward

    rows = [json.loads(x) for x in Path(demo_data["pairs"]).read_text().splitlines()]
    path = tmp_path / "pairs"
    DatasetDict({"train": Dataset.from_list(rows[:40]), "test": Dataset.from_list(rows[40:52])}).save_to_disk(
        str(path))
    cfg = resolve(RewardConfig, "reward", None, {"run_dir": str(tmp_path / "run"), "model": str(tiny_model),
                                                 "dataset": str(path), "eval_split": "test", "max_steps": 2,
                                                 "batch_size": 8, "dtype": "bfloat16"})
    metrics = reward.run(cfg)
    assert metrics["n_eval"] == 12 and metrics["n_train"] == 40, metrics
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["reward"]["status"] == "done"


def test_eval_loads_its_models_in_the_asked_dtype(tmp_path, tiny_model, demo_data, monkeypatch):
    import torch

    from rlchat import models
    from rlchat.config import EvalConfig
    from rlchat.stages import evaluate

    run, _, _ = run_sft(tmp_path, tiny_model, demo_data["sft"], monkeypatch, max_steps=2)
    loaded = []
    real = models.load_causal_lm

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(models, "load_causal_lm", spy)
    cfg = resolve(EvalConfig, "eval", None, {"run_dir": str(run), "dataset": str(demo_data["eval_prompts"]),
                                             "max_prompts": 2, "max_new_tokens": 4, "dtype": "bfloat16",
                                             "attn_implementation": "eager"})
    evaluate.run(cfg)
    assert loaded and all(m.dtype == torch.bfloat16 and m.config._attn_implementation == "eager" for m in loaded)
    assert json.loads((run / "run.json").read_text())["stages"]["eval"]["status"] == "done"


# ------------------------------------------------------------------------------------------------------- ppo


def test_ppo_schedule_weight_decay_and_dtype(tmp_path, tiny_model, demo_data, monkeypatch):
    import torch

    from rlchat.stages import ppo
    from tests.test_ppo_stage import make_reward_stage

    seen = {}
    real_build = ppo._build

    def spy(cfg, inp):
        seen["setup"] = real_build(cfg, inp)
        return seen["setup"]

    monkeypatch.setattr(ppo, "_build", spy)
    run = tmp_path / "run"
    make_reward_stage(run, tiny_model)
    # 3 PPO steps x 2 epochs x 1 minibatch = 6 optimizer updates; cosine after 2 warmup updates:
    # after step 1 (u=2): warmup done, lr = 1e-3; step 2 (u=4): progress 2/4, 0.5 (1 + cos(pi/2)) = 0.5;
    # step 3 (u=6): 0
    cfg = resolve(PPOConfig, "ppo", None, dict(
        run_dir=str(run), model=str(tiny_model), dataset=str(demo_data["prompts"]), episodes=24, batch_size=8,
        response_length=6, ppo_epochs=2, seed=0, lr=1e-3, lr_scheduler="cosine", warmup_steps=2,
        weight_decay=0.2, dtype="bfloat16", attn_implementation="eager", save_every=100))
    metrics = ppo.run(cfg)
    assert metrics["steps"] == 3
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([1e-3, 0.5e-3, 0.0], abs=1e-9)
    s = seen["setup"]
    assert {g["weight_decay"] for g in s.optimizer.param_groups} == {0.2}
    lm = next(m for m in s.core.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"))
    assert lm.config._attn_implementation == "eager"
    assert any(p.dtype == torch.bfloat16 for p in s.core.parameters())  # the frozen base weights
    assert all(math.isfinite(r.get("loss/policy", 0.0)) for r in rows)


def test_ppo_default_schedule_is_the_old_linear_decay():
    import torch

    from rlchat.stages.ppo import lr_schedule

    cfg = resolve(PPOConfig, "ppo", None, {"run_dir": "r"})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, cfg, 10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([max(0.0, 1.0 - u / 10) for u in range(1, 11)])  # lr x (1 - u / total)
    assert cfg.weight_decay == 0.01  # torch AdamW's default, which ppo used before the option existed


# ---------------------------------------------------------------------------------------------------- resume


def test_resume_refuses_a_changed_dtype_or_schedule(tmp_path):
    from rlchat.rundir import RunDir
    from rlchat.stages.resume import check_resume_settings

    run = RunDir(tmp_path / "run")
    old = resolve(SFTConfig, "sft", None, {"run_dir": str(run.path), "dtype": "bfloat16"})
    from rlchat.config import to_dict

    run.begin_stage("sft", config=to_dict(old), inputs={}, parent=None, overwrite=False)
    run.fail_stage("sft", "killed")
    check_resume_settings(run, "sft", old)  # the same settings: fine
    check_resume_settings(run, "sft", resolve(SFTConfig, "sft", None, {"run_dir": str(run.path), "dtype": "bfloat16",
                                                                        "batch_size": 2, "attn_implementation": "eager"}))
    # weight_decay: the restored optimizer state would keep the old value
    for change in ({"dtype": "float32"}, {"lr_scheduler": "cosine"}, {"warmup_ratio": 0.1}, {"warmup_steps": 3},
                   {"weight_decay": 0.1}):
        new = resolve(SFTConfig, "sft", None, {"run_dir": str(run.path), "dtype": "bfloat16", **change})
        with pytest.raises(RunDirError, match=f"{next(iter(change))} "):
            check_resume_settings(run, "sft", new)


def test_ppo_resume_checks_the_schedule_dtype_and_mixture(tmp_path):
    from rlchat.config import to_dict
    from rlchat.rundir import RunDir
    from rlchat.stages.resume import check_ppo_resume_settings as _check_resume_settings

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    from rlchat.fileio import input_record

    def cfg(**kw):
        return resolve(PPOConfig, "ppo", None, {"run_dir": str(tmp_path / "run"), "dataset": f"{a},{b}", **kw})

    run = RunDir(tmp_path / "run")
    run.begin_stage("ppo", config=to_dict(cfg()), inputs={"dataset": input_record(f"{a},{b}")}, parent=None,
                    overwrite=False)
    run.fail_stage("ppo", "killed")
    step = tmp_path / "step-1"
    _check_resume_settings(run, cfg(attn_implementation="eager"), step)  # another kernel: the same training
    for change in ({"dtype": "bfloat16"}, {"lr_scheduler": "cosine"}, {"warmup_steps": 3}, {"weight_decay": 0.0}):
        with pytest.raises(RunDirError, match=f"{next(iter(change))} "):
            _check_resume_settings(run, cfg(**change), step)
    write_jsonl(b, [{"prompt": "changed"}])  # one input of the mixture changed
    with pytest.raises(RunDirError, match="other content"):
        _check_resume_settings(run, cfg(), step)
