"""GGUF input: conversion of a tiny GGUF written here (tests/gguf_writer.py), the cache, `import-gguf`, bad files,
and rlchat's handling of pad == eos (the trap llama.cpp files set up)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat import gguf, models
from rlchat.pad_token import distinct_pad_token
from rlchat.cli import app
from rlchat.errors import ModelError
from tests.conftest import snapshot
from tests.gguf_writer import roundtrip, write_llama_gguf

TEXTS = ["Tell me about the red apple.", "  two  spaces\nnew line 123 <|end|> x", "héllo wörld"]
CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test converts into its own cache, never into the user's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RLCHAT_CACHE", str(root))
    return root / "gguf"


def _tiny_llama(out: Path, tied: bool) -> Path:
    """rlchat's tiny Llama (tokenizer trained on the spot), optionally with tied embeddings like SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlchat import tiny

    texts = tiny.read_corpus(None)
    tok = tiny.train_tokenizer(texts, vocab_size=600)
    config = tiny.model_config("llama", "tiny", tok)
    config.tie_word_embeddings = tied
    config.num_key_value_heads = 2  # grouped-query attention, as SmolLM2 (9 heads, 3 kv heads)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf-src")
    untied = _tiny_llama(root / "untied", tied=False)
    tied = _tiny_llama(root / "tied", tied=True)
    return {
        "untied": untied, "tied": tied,
        "f32": write_llama_gguf(untied, root / "tiny-f32.gguf"),
        "q8": write_llama_gguf(tied, root / "tiny-q8_0.gguf", qtype="Q8_0"),
        # pad == eos in the file, as in SmolLM2's GGUF
        "pad_eos": write_llama_gguf(untied, root / "tiny-pad-eos.gguf", pad_token="<|endoftext|>"),
        "rwkv": write_llama_gguf(untied, root / "tiny-rwkv.gguf", architecture="rwkv6"),
        "incomplete": write_llama_gguf(untied, root / "tiny-incomplete.gguf",
                                       drop=("model.layers.1.mlp.down_proj.weight",)),
    }


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _reference(src: Path, qtype: str):
    """The source model with each weight matrix replaced by what the GGUF holds after quantizing it."""
    import torch
    from gguf import GGMLQuantizationType
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(roundtrip(p.numpy(), GGMLQuantizationType[qtype])))
    return model.eval()


# ------------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("kind,src,qtype", [("f32", "untied", "F32"), ("q8", "tied", "Q8_0")])
def test_converted_model_matches_source(sources, tmp_path, kind, src, qtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "converted"
    result = gguf.convert(sources[kind], out)
    assert result["sha256"] == gguf.file_sha256(sources[kind]) and result["path"] == str(out)
    assert (out / gguf.MARKER).is_file() and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.gguf")) and not list(tmp_path.glob(".converted.tmp-*"))

    # stock transformers loads it (safetensors, no quantization_config, no gguf needed)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert model.config.tie_word_embeddings == (src == "tied")
    tok = AutoTokenizer.from_pretrained(out)
    source_tok = AutoTokenizer.from_pretrained(sources[src])
    for text in TEXTS:
        assert tok(text)["input_ids"] == source_tok(text)["input_ids"], text
    assert tok.apply_chat_template(CHAT, tokenize=False) == source_tok.apply_chat_template(CHAT, tokenize=False)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (source_tok.eos_token, source_tok.bos_token,
                                                             source_tok.pad_token)

    reference = _reference(sources[src], qtype)
    ids = source_tok(TEXTS[0])["input_ids"]
    got, want = _logits(model, ids), _logits(reference, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    if qtype != "F32":  # the quantization really changed the weights: the check above can fail
        plain = AutoModelForCausalLM.from_pretrained(sources[src]).eval()
        assert (_logits(plain, ids) - got).abs().max() > 1e-4


def test_pad_equal_to_eos_in_the_file_is_replaced(sources, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "converted"
    result = gguf.convert(sources["pad_eos"], out)
    assert result["pad_token_in_file"] == result["eos_token"] == "<|endoftext|>"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.pad_token == "<|pad|>" != tok.eos_token
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_distinct_pad_token_order(tmp_path):
    from tokenizers import Tokenizer, models as tmodels
    from transformers import PreTrainedTokenizerFast

    def make(vocab, **special):
        backend = Tokenizer(tmodels.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
        return PreTrainedTokenizerFast(tokenizer_object=backend, **special)

    base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"]
    smol = make(base, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
                pad_token="<|im_end|>")
    assert distinct_pad_token(smol) == "<|endoftext|>"
    llama3 = make(base + ["<|finetune_right_pad_id|>"], eos_token="<|im_end|>", unk_token="<|endoftext|>",
                  extra_special_tokens=["<|finetune_right_pad_id|>"])
    assert distinct_pad_token(llama3) == "<|finetune_right_pad_id|>"  # a pad-named token first
    gpt2 = make(["<|endoftext|>", "a"], eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                unk_token="<|endoftext|>")
    assert distinct_pad_token(gpt2) is None  # nothing else: pad stays eos


def test_load_tokenizer_moves_pad_off_eos(sources, tmp_path):
    # a directory whose tokenizer pads with eos (as SmolLM2's own HF files do)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sources["untied"])
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "tok")
    loaded = models.load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == "<|pad|>" and loaded.pad_token != loaded.eos_token


# ------------------------------------------------------------------------------------------------------ cache


def test_stage_model_spec_converts_once_into_the_cache(sources, cache, monkeypatch):
    spec = str(sources["f32"])
    model = models.load_causal_lm(spec)
    tok = models.load_tokenizer(spec)
    key = gguf.file_sha256(spec)[:16]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [key]
    assert tok.pad_token_id == model.config.pad_token_id
    marker = json.loads((cache / key / gguf.MARKER).read_text())
    assert marker["sha256"] == gguf.file_sha256(spec)

    # a second use reads the cache: converting again would fail here
    def boom(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf, "_write_converted", boom)
    models.load_causal_lm(spec)
    models.load_tokenizer(spec)

    from rlchat.fileio import input_record

    record = input_record(spec, hash=False)
    assert record["format"] == "gguf" and record["hash"] == "sha256:" + marker["sha256"]
    assert record["converted"] == str(cache / key) and record["path"] == str(Path(spec).resolve())


def test_interrupted_conversion_leaves_no_cache_entry(sources, cache, monkeypatch):
    real = gguf._write_converted

    def killed(src, dest, info):
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_write_converted", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf.model_dir(sources["f32"])
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    # a damaged entry (marker present, weights cut short) is converted again, not used
    monkeypatch.setattr(gguf, "_write_converted", real)
    path = gguf.model_dir(sources["f32"])
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = gguf.model_dir(sources["f32"])
    assert again == path and models.safetensors_problem(again / "model.safetensors") is None
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_sft_manifest_records_the_gguf(sources, demo_data, tmp_path, cache):
    from rlchat.cli import app as cli_app

    run = tmp_path / "run"
    res = CliRunner().invoke(cli_app, ["sft", "--run-dir", str(run), "--model", str(sources["f32"]),
                                       "--dataset", str(demo_data["sft"]), "--max-steps", "1", "--batch-size", "2",
                                       "--eval-fraction", "0", "--max-length", "64"])
    assert res.exit_code == 0, res.output
    rec = json.loads((run / "run.json").read_text())["stages"]["sft"]
    model_input = rec["inputs"]["model"]
    assert model_input["format"] == "gguf" and model_input["hash"] == "sha256:" + gguf.file_sha256(sources["f32"])
    assert Path(model_input["converted"]).is_dir()
    # the next stage loads the SFT policy through the same GGUF base
    from rlchat.run_models import load_sft_policy

    policy, tok = load_sft_policy(run)
    assert tok.pad_token_id == policy.config.pad_token_id


# -------------------------------------------------------------------------------------------------------- CLI


def test_import_gguf_command(sources, tmp_path):
    out = tmp_path / "models" / "tiny"
    runner = CliRunner()
    res = runner.invoke(app, ["import-gguf", str(sources["q8"]), str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert "import-gguf: llama model" in res.stderr and "Q8_0" in res.stderr
    data = json.loads(res.stdout)
    assert data["path"] == str(out) and data["architecture"] == "llama"

    res = runner.invoke(app, ["import-gguf", str(sources["f32"]), str(out)])
    assert res.exit_code == 2 and "exists and is not empty" in res.stderr and "--overwrite" in res.stderr
    assert json.loads((out / gguf.MARKER).read_text())["sha256"] == data["sha256"]  # untouched
    res = runner.invoke(app, ["import-gguf", str(sources["f32"]), str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / gguf.MARKER).read_text())["sha256"] == gguf.file_sha256(sources["f32"])

    res = runner.invoke(app, ["import-gguf", "--help"])
    assert res.exit_code == 0 and "Example: rlchat import-gguf" in res.output


def _bad(args, tmp_path, cache):
    before = snapshot(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert snapshot(tmp_path) == before  # OUT not created, cache untouched
    return lines[0]


def test_not_a_gguf_file(tmp_path, cache, demo_data):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    line = _bad(["import-gguf", str(fake), str(tmp_path / "out")], tmp_path, cache)
    assert "is not a GGUF file" in line
    line = _bad(["import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")], tmp_path, cache)
    assert "GGUF file not found" in line
    # as a stage's --model: the same line, and no run directory
    line = _bad(["sft", "--run-dir", str(tmp_path / "run"), "--model", str(fake), "--dataset",
                 str(demo_data["sft"]), "--max-steps", "1"], tmp_path, cache)
    assert "is not a GGUF file" in line


def test_unsupported_architecture(sources, tmp_path, cache):
    line = _bad(["import-gguf", str(sources["rwkv"]), str(tmp_path / "out")], tmp_path, cache)
    assert "'rwkv6' model" in line and "cannot load from GGUF" in line and "llama" in line


def test_incomplete_file_is_refused_not_filled_with_random_weights(sources, tmp_path, cache):
    line = _bad(["import-gguf", str(sources["incomplete"]), str(tmp_path / "out")], tmp_path, cache)
    assert "lacks weights" in line and "model.layers.1.mlp.down_proj.weight" in line


def test_gguf_package_missing(sources, tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    line = _bad(["import-gguf", str(sources["f32"]), str(tmp_path / "out")], tmp_path, cache)
    assert "needs the gguf Python package" in line and "pip install gguf" in line
    with pytest.raises(ModelError, match="gguf"):
        models.load_causal_lm(str(sources["f32"]))
    assert not cache.exists() or not any(cache.iterdir())


def test_plan_reads_a_gguf_without_converting(sources, tmp_path, cache):
    config = gguf.read_config(sources["tied"].parent / "tiny-q8_0.gguf")
    assert config.model_type == "llama" and config.tie_word_embeddings and config.num_key_value_heads == 2
    assert not cache.exists()


# -------------------------------------------------------------------------------------------- pad == eos


def test_rlchat_masks_come_from_lengths_when_pad_is_eos():
    """With pad == eos, masks built as `ids != pad` would drop the real EOS; rlchat builds them from lengths."""
    import torch

    from rlchat.generation import cut_at_stop, left_pad, right_pad

    eos = pad = 2
    response = torch.tensor([[5, eos, 7, 8], [5, 6, 7, 8], [eos, 9, 9, 9]])
    ids, mask, has_eos = cut_at_stop(response, [eos], pad)
    assert ids.tolist() == [[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert has_eos.tolist() == [True, False, True]

    ids, mask = right_pad([[5, eos], [eos]], pad)
    assert mask.tolist() == [[True, True], [True, False]]
    ids, mask = left_pad([[eos, 5, eos], [5]], pad)
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    ids, mask = left_pad([[eos], [4, eos]], pad)
    assert mask.tolist() == [[False, True], [True, True]]


def test_sft_collator_keeps_eos_in_labels_when_pad_is_eos():
    """TRL's collator (what rlchat's SFT uses) pads labels by length with -100, so a final EOS that equals the pad
    id is still a label: the model learns to stop."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    eos = pad = 2
    batch = DataCollatorForLanguageModeling(pad_token_id=pad)([{"input_ids": [5, 6, eos]}, {"input_ids": [5, eos]}])
    assert batch["labels"].tolist() == [[5, 6, eos], [5, eos, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


# ------------------------------------------------------------------------------------------------ real model

REAL = Path(__file__).resolve().parents[1] / ".models"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "smollm2-135m-instruct" / gguf.MARKER).is_file(),
                    reason="real model not fetched (make real-model)")
def test_real_smollm2_answers_through_its_chat_template():
    """`make real-model`'s conversion of SmolLM2-135M-Instruct.Q4_1.gguf: stock transformers loads it, its own
    chat template renders the prompt, greedy decoding answers and stops at <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = REAL / "smollm2-135m-instruct"
    marker = json.loads((path / gguf.MARKER).read_text())
    source = REAL / marker["source"]
    if source.is_file():
        assert marker["sha256"] == gguf.file_sha256(source)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 2, "<|endoftext|>")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = tok.decode(inputs["input_ids"][0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert answer[-1] == tok.eos_token_id and tok.eos_token_id not in answer[:-1]
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)
