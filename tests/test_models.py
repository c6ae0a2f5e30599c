"""rlchat.models on tiny models built here from configs (2 layers, hidden 32) and a BPE tokenizer trained on a few
sentences: loading, every ModelError, the default chat template, the SFT policy of a fake run, reward-model init."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlchat import models  # noqa: E402
from rlchat import run_models  # noqa: E402
from rlchat.errors import ConfigError, ModelError, RunDirError  # noqa: E402

CORPUS = ["hello world", "the cat sat on the mat", "what is two plus two", "four", "user assistant system"] * 4
VOCAB = 300
CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the cat sat"}]


def make_tokenizer(out: Path, **specials) -> Path:
    """A byte-level BPE tokenizer (no chat template, no pad token unless given) saved to `out`."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(out)
    return out


def make_model(out: Path, arch: str, tokenizer_from: Path | None = None) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    elif arch == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64))
    elif arch == "llama-cls":
        model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=1, pad_token_id=0))
    else:
        raise ValueError(arch)
    model.save_pretrained(out)
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer(root / "tok", eos_token="<|endoftext|>")
    d = {"tok": tok,
         "tok_unk": make_tokenizer(root / "tok_unk", eos_token="</s>", unk_token="<unk>"),
         "tok_bare": make_tokenizer(root / "tok_bare"),
         "llama": make_model(root / "llama", "llama", tok),
         "gpt2": make_model(root / "gpt2", "gpt2", tok),
         "bert": make_model(root / "bert", "bert", tok),
         "cls": make_model(root / "cls", "llama-cls", tok)}
    # the same llama with only a pickled .bin file
    import torch
    from safetensors.torch import load_file

    d["bin"] = root / "bin"
    d["bin"].mkdir()
    shutil.copy(d["llama"] / "config.json", d["bin"] / "config.json")
    torch.save(load_file(str(d["llama"] / "model.safetensors")), d["bin"] / "pytorch_model.bin")
    # a config that needs custom code
    d["remote"] = root / "remote"
    shutil.copytree(d["llama"], d["remote"])
    cfg = json.loads((d["llama"] / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                    "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (d["remote"] / "config.json").write_text(json.dumps(cfg))
    return d


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_defaults_pad_template_left_padding(dirs):
    tok = models.load_tokenizer(str(dirs["tok"]))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # no unk: eos pads
    assert tok.chat_template == models.DEFAULT_CHAT_TEMPLATE
    assert tok.padding_side == "left"
    prompt = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhello world<|endoftext|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert full.startswith(prompt) and full.endswith("the cat sat<|endoftext|>\n")
    batch = tok(["hi", "hello world hello"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["attention_mask"][0][0] == 0


def test_default_template_marks_assistant_tokens_for_trl(dirs):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tok = models.load_tokenizer(str(dirs["tok"]))
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "the cat sat<|endoftext|>"  # the answer and the stop token, nothing else
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)  # TRL's own check: the model learns to stop


def test_pad_token_prefers_unk_then_adds_one(dirs, caplog):
    tok = models.load_tokenizer(str(dirs["tok_unk"]))
    assert tok.pad_token == "<unk>" and tok.eos_token == "</s>"
    with caplog.at_level("WARNING", logger="rlchat.models"):
        bare = models.load_tokenizer(str(dirs["tok_bare"]))
    assert bare.pad_token == "<|pad|>" and bare.pad_token_id == len(bare) - 1
    assert "added a new pad token" in caplog.text
    # the literal end-of-turn marker stands in for the missing eos
    assert bare.apply_chat_template(CHAT[:1], tokenize=False) == "<|im_start|>user\nhello world<|im_end|>\n"


def test_tokenizer_errors(dirs, tmp_path):
    with pytest.raises(ModelError, match="model directory not found: ./nowhere"):
        models.load_tokenizer("./nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no tokenizer files"):
        models.load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="could not load tokenizer 'no-such-org/no-such-model' from the Hub"):
        models.load_tokenizer("no-such-org/no-such-model")


# ------------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_causal_lm(dirs, arch):
    import torch

    model = models.load_causal_lm(str(dirs[arch]))
    assert model.dtype == torch.float32 and not model.training
    assert logits(model, torch.tensor([[1, 2, 3]])).shape == (1, 3, VOCAB)
    assert models.load_causal_lm(str(dirs[arch]), dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("key, message", [
    ("bert", "is a BertForMaskedLM model, not a causal LM"),
    ("cls", "is a LlamaForSequenceClassification model, not a causal LM"),
    ("bin", "has only PyTorch .bin weights; rlchat loads safetensors only"),
    ("remote", r"needs its own Python code to load \(trust_remote_code\).*--trust-remote-code"),
    ("tok", "has no config.json"),
])
def test_load_causal_lm_errors(dirs, key, message):
    with pytest.raises(ModelError, match=message) as info:
        models.load_causal_lm(str(dirs[key]))
    assert str(dirs[key]) in str(info.value) and "\n" not in str(info.value)


def test_load_causal_lm_missing_adapter_and_hub(dirs, tmp_path):
    with pytest.raises(ModelError, match=f"model directory not found: {tmp_path}/nope"):
        models.load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="model directory not found: ./tiny-model"):
        models.load_causal_lm("./tiny-model")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base-x"}))
    with pytest.raises(ModelError, match=r"is a PEFT adapter, not a full model. Fix: pass its base model \(base-x\)"):
        models.load_causal_lm(str(tmp_path / "adapter"))
    with pytest.raises(ModelError, match="could not load model 'no-such-org/no-such-model' from the Hub"):
        models.load_causal_lm("no-such-org/no-such-model")


def test_is_local_dtype_device_helpers(dirs):
    import torch

    assert models.is_local(str(dirs["llama"])) and models.is_local("./x") and models.is_local("a/b/c")
    assert not models.is_local("Qwen/Qwen2.5-0.5B-Instruct") and not models.is_local("gpt2")
    assert models.resolve_dtype("bf16") == torch.bfloat16 and models.resolve_dtype("float32") == torch.float32
    assert models.resolve_dtype(None) == (torch.bfloat16 if models.use_bf16() else torch.float32)
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        models.resolve_dtype("int3")
    if not torch.cuda.is_available():
        assert models.use_bf16() is False and models.pick_device() in ("cpu", "mps")


def test_lora_config_and_count_parameters(dirs):
    from peft import get_peft_model

    cfg = models.lora_config(4, 8, 0.0, "q_proj, v_proj")
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"] and cfg.r == 4 and cfg.lora_alpha == 8
    assert models.lora_config(4, 8, 0.0, "all-linear", task_type="SEQ_CLS").target_modules == "all-linear"
    model = models.load_causal_lm(str(dirs["llama"]))
    trainable, total = models.count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, cfg)
    trainable, total2 = models.count_parameters(peft_model)
    # q_proj (32x32) and k/v_proj (32x16, 2 kv heads of 8): A is r x in, B is out x r; 2 layers
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) and total2 == total + trainable


def test_lora_regex_targets_adapt_only_the_layers_named(dirs):
    """"re:<regex>" reaches peft as a full-match regex: here the q/v projections of the top layer only."""
    from peft import get_peft_model

    from rlchat import checks
    from rlchat.config import SFTConfig, resolve
    from rlchat.plan import count_params

    spec = r"re:.*layers\.1\.self_attn\.(q|v)_proj"
    cfg = resolve(SFTConfig, "sft", None, {"run_dir": "r", "lora_r": 4, "lora_target_modules": spec})
    assert cfg.lora_target_modules == spec  # not split, not listed
    model = models.load_causal_lm(str(dirs["llama"]))
    checks.check_lora_targets(model, spec)
    peft_model = get_peft_model(model, models.lora_config(4, 8, 0.0, spec))
    adapted = sorted({n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n})
    assert adapted == ["base_model.model.model.layers.1.self_attn.q_proj",
                       "base_model.model.model.layers.1.self_attn.v_proj"]
    trainable, _ = models.count_parameters(peft_model)
    assert trainable == (4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)  # q_proj 32x32, v_proj 32->16, one layer
    assert count_params(model.config, cfg)["trainable"] == trainable  # rlchat plan counts the same
    with pytest.raises(ConfigError, match="matches no linear layer"):
        checks.check_lora_targets(model, r"re:.*layers\.7\..*_proj")
    with pytest.raises(ConfigError, match="is not a valid regex"):
        resolve(SFTConfig, "sft", None, {"run_dir": "r", "lora_target_modules": "re:(q_proj"})


def test_align_model_with_tokenizer(dirs):
    tok = models.load_tokenizer(str(dirs["tok_bare"]))  # added <|pad|>: one more token than before
    model = models.load_causal_lm(str(dirs["llama"]))
    tok.add_special_tokens({"additional_special_tokens": [f"<x{i}>" for i in range(VOCAB)]})
    models.align_model_with_tokenizer(model, tok)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id


# ------------------------------------------------------------------------------------------- reward model init


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_seq_cls_from_causal_shares_backbone(dirs, arch):
    import torch

    causal = models.load_causal_lm(str(dirs[arch]))
    rm = models.seq_cls_from_causal(causal, num_labels=1, pad_token_id=0)
    assert rm.config.pad_token_id == 0 and rm.config.num_labels == 1
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])  # second row left-padded
    with torch.no_grad():
        h_causal = causal.base_model(input_ids=ids).last_hidden_state
        h_rm = rm.base_model(input_ids=ids).last_hidden_state
        scores = rm(input_ids=ids).logits
    torch.testing.assert_close(h_rm, h_causal, rtol=0, atol=0)
    assert scores.shape == (2, 1)
    with torch.no_grad():  # copied, not shared: training the reward model leaves the policy alone
        rm.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(rm.get_input_embeddings().weight, causal.get_input_embeddings().weight)


def test_seq_cls_from_causal_needs_pad_id(dirs):
    causal = models.load_causal_lm(str(dirs["llama"]))
    causal.config.pad_token_id = None
    causal.generation_config.pad_token_id = None
    with pytest.raises(ModelError, match="no pad_token_id"):
        models.seq_cls_from_causal(causal)


# --------------------------------------------------------------------------------------------- sft policy


def fake_run(root: Path, dirs, kind: str, base: str) -> tuple[Path, object]:
    """RUN/ as the SFT stage writes it; returns (run dir, the model whose outputs load_sft_policy must match)."""
    from peft import LoraConfig, get_peft_model

    run = root / "run"
    (run / "sft").mkdir(parents=True)
    tok = models.load_tokenizer(str(dirs["tok"]))
    tok.save_pretrained(run / "sft" / "tokenizer")
    model = models.load_causal_lm(str(dirs["llama"]))
    if kind == "lora":
        # init_lora_weights=False: B is random, so the adapter really changes the outputs
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
        model.save_pretrained(run / "sft" / "adapter")
    else:
        with __import__("torch").no_grad():
            model.lm_head.weight.mul_(2.0)
        model.save_pretrained(run / "sft" / "model")
    outputs = {"kind": kind, "adapter": "sft/adapter" if kind == "lora" else None,
               "model": "sft/model" if kind == "full" else None, "tokenizer": "sft/tokenizer", "base_model": base}
    manifest = {"rlchat_version": "0", "created": "2026-01-01T00:00:00", "stages": {
        "sft": {"status": "done", "config": {"model": base}, "outputs": outputs, "metrics": {}}}}
    (run / "run.json").write_text(json.dumps(manifest))
    model.eval()
    return run, model


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_load_sft_policy(dirs, tmp_path, kind):
    import torch

    run, reference = fake_run(tmp_path, dirs, kind, str(dirs["llama"]))
    model, tok = run_models.load_sft_policy(str(run))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert not hasattr(model, "peft_config") and not model.training
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    base = models.load_causal_lm(str(dirs["llama"]))
    assert not torch.allclose(logits(base, ids), logits(model, ids))  # the SFT weights are really applied
    assert tok.pad_token_id == model.config.pad_token_id and tok.padding_side == "left"


def test_load_sft_policy_relative_base_beside_run(dirs, tmp_path, monkeypatch):
    import torch

    shutil.copytree(dirs["llama"], tmp_path / "tiny-llama")
    run, reference = fake_run(tmp_path, dirs, "lora", "./tiny-llama")
    monkeypatch.chdir(dirs["llama"].parent)  # ./tiny-llama does not exist from here: found beside RUN
    model, _ = run_models.load_sft_policy(run)
    ids = torch.tensor([[7, 8, 9]])
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_load_sft_policy_errors(dirs, tmp_path):
    with pytest.raises(RunDirError, match="stage 'sft' has not run"):
        run_models.load_sft_policy(tmp_path / "empty-run")
    run, _ = fake_run(tmp_path, dirs, "lora", str(dirs["llama"]))
    manifest = json.loads((run / "run.json").read_text())
    manifest["stages"]["sft"]["status"] = "failed"
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="is failed, not done"):
        run_models.load_sft_policy(run)
    manifest["stages"]["sft"]["status"] = "done"
    (run / "run.json").write_text(json.dumps(manifest))
    manifest["stages"]["sft"]["outputs"]["base_model"] = "./moved-away"
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="cannot load the base model of the SFT adapter .*not found: ./moved-away"):
        run_models.load_sft_policy(run)
    shutil.rmtree(run / "sft" / "adapter")
    with pytest.raises(RunDirError, match="SFT adapter not found"):
        run_models.load_sft_policy(run)
