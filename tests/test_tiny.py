"""rlchat.tiny: offline tokenizer + random-init models load back, generate through the template, are deterministic."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlchat.errors import DataError, ModelError
from rlchat.tiny import ARCHS, CHAT_TEMPLATE, SIZES, build_tiny_model, read_corpus, train_tokenizer

CORPUS = ["Tell me about the red fox.", "The red fox lives in the forest. Hope this helps!",
          "Describe the blue boat.", "The blue boat floats on the lake. Hope this helps!"] * 5
CHAT = [{"role": "user", "content": "Tell me about the red fox."},
        {"role": "assistant", "content": "The red fox lives in the forest. Hope this helps!"}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory):
    torch.set_num_threads(1)
    out = build_tiny_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param, corpus=CORPUS,
                           vocab_size=400)
    return request.param, out


def test_tokenizer_special_tokens(tok):
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|bos|>"
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3
    assert tok.padding_side == "left"
    for t in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t   # never split
    text = "Ünïcode 🙂 and digits 42, never seen before"   # byte-level: any text round-trips
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_renders_and_round_trips(tok):
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == ("<|bos|><|user|>Tell me about the red fox.<|end|>"
                    "<|assistant|>The red fox lives in the forest. Hope this helps!<|endoftext|>")
    ids = tok.apply_chat_template(CHAT, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|user|>Tell me about the red fox.<|end|><|assistant|>"
    assert text.startswith(prompt)   # prompt + completion == full conversation (prefix preserving)
    system = tok.apply_chat_template([{"role": "system", "content": "Be kind."}] + CHAT[:1], tokenize=False)
    assert system.startswith("<|bos|><|system|>Be kind.<|end|><|user|>")


def test_assistant_mask_covers_content_and_eos(tok):
    out = tok.apply_chat_template(CHAT + [{"role": "user", "content": "More?"}], return_dict=True,
                                  return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "The red fox lives in the forest. Hope this helps!<|endoftext|>"
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained
    assert has_generation_markers(CHAT_TEMPLATE) and is_chat_template_stop_token_trained(tok)


def test_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="unsupported chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_build_loads_back_and_generates(built):
    arch, out = built
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").is_file() and json.loads((out / "tiny.json").read_text())["arch"] == arch
    assert model.config.vocab_size == len(tok)   # no stray added tokens (qwen2's AutoTokenizer adds none)
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert model.config.eos_token_id == tok.eos_token_id and model.config.bos_token_id == tok.bos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.padding_side == "left" and tok.chat_template == CHAT_TEMPLATE
    assert tok(CORPUS[1])["input_ids"] == train_tokenizer(CORPUS, vocab_size=400)(CORPUS[1])["input_ids"]
    batch = tok.apply_chat_template([CHAT[:1], [{"role": "user", "content": "Describe the blue boat."}]],
                                    add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    assert batch["attention_mask"][0, 0] == 0 or batch["attention_mask"][1, 0] == 0   # left padding
    gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] > batch["input_ids"].shape[1]
    assert isinstance(tok.decode(gen[0, batch["input_ids"].shape[1]:], skip_special_tokens=True), str)


def test_sizes_and_small_param_count():
    assert SIZES["tiny"]["hidden_size"] == 64 and SIZES["tiny"]["num_hidden_layers"] == 2
    # "small" is the peer benchmark model: 14.9M parameters at vocab 2000 (untied embeddings)
    d = SIZES["small"]
    per_layer = 4 * d["hidden_size"] ** 2 + 3 * d["hidden_size"] * d["intermediate_size"] + 2 * d["hidden_size"]
    total = d["num_hidden_layers"] * per_layer + 2 * 2000 * d["hidden_size"] + d["hidden_size"]
    assert round(total / 1e6, 1) == 14.9


def test_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", corpus=CORPUS, seed=3, vocab_size=400)
    b = build_tiny_model(tmp_path / "b", corpus=CORPUS, seed=3, vocab_size=400)
    c = build_tiny_model(tmp_path / "c", corpus=CORPUS, seed=4, vocab_size=400)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_corpus_from_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("one line\nanother line\n")
    assert read_corpus(txt) == ["one line", "another line"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                           "content": "hello"}]}) + "\n\n")
    assert read_corpus(jl) == ["hi", "hello"]
    jl.write_text("{bad\n")
    with pytest.raises(DataError, match="c.jsonl:1"):
        read_corpus(jl)
    with pytest.raises(DataError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    assert len(read_corpus(None)) > 100   # built-in demo corpus


def test_errors(tmp_path):
    with pytest.raises(ModelError, match="llama, qwen2, gpt2"):
        build_tiny_model(tmp_path / "x", arch="bert", corpus=CORPUS)
    with pytest.raises(ModelError, match="unknown tiny model size"):
        build_tiny_model(tmp_path / "x", size="huge", corpus=CORPUS)
    with pytest.raises(DataError):
        train_tokenizer(["", "  "])
    with pytest.raises(ModelError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        build_tiny_model(tmp_path / "full", corpus=CORPUS)
    assert not (tmp_path / "x").exists()   # nothing written on bad input
