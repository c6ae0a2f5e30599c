"""Offline tiny models: a byte-level BPE tokenizer trained on a corpus plus a random-init causal LM from a config.

Nothing is downloaded. `build_tiny_model` writes a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline, deterministic for a seed and corpus (same weights, same vocab).
Used by tests (size "tiny"), by the demo pipeline (size "demo") and to match the peer benchmark (size "small").

The chat template (`CHAT_TEMPLATE`) renders, with no whitespace between pieces:

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>{% generation %}...<|endoftext|>{% endgeneration %}

so every assistant turn ends with the eos token, which sits inside the `{% generation %}` span: TRL's
`assistant_only_loss` trains the model to emit eos, and generation stops there. `add_generation_prompt` appends
`<|assistant|>`. The eos token is `<|endoftext|>` (the name Qwen2Tokenizer expects, so AutoTokenizer adds no
unk token for qwen2 models). Pad (`<|pad|>`) is not eos; padding is on the left (for batched generation).

What it leaves out: pretrained weights, sentencepiece/unigram tokenizers, multimodal models.
Heavy imports (torch, transformers, tokenizers) happen inside the functions, so importing this module is cheap.

    from rlchat.tiny import build_tiny_model
    build_tiny_model("tiny-model", arch="llama", size="demo", seed=0)
"""
from __future__ import annotations

import json
from pathlib import Path

from rlchat.errors import DataError, ModelError

# Model shapes. "small" is the peer benchmark's Llama (14.9M params at vocab 2000, untied embeddings).
# "demo" is sized so SFT from random init learns the demo task in about two minutes on two CPU cores.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=256),
    "demo": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1408),
}
ARCHS = ("llama", "qwen2", "gpt2")
MAX_POSITIONS = 512

PAD, EOS, BOS, END = "<|pad|>", "<|endoftext|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS, BOS, END, *ROLE_TOKENS)   # ids 0..6 in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% else %}"
    "{{ raise_exception('unsupported chat role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with special tokens and `CHAT_TEMPLATE`.

    The vocabulary holds the 7 special tokens, the 256 byte symbols and up to `vocab_size` entries in all; a small
    corpus may stop merging earlier. Deterministic for the same texts and vocab_size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("the tokenizer corpus has no text", "pass a non-empty list of strings or a text/JSONL file")
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ModelError(f"vocab_size {vocab_size} is too small for a byte-level BPE",
                         f"use at least {len(SPECIAL_TOKENS) + 256}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # padding_side and chat_template go in the constructor so save_pretrained records them.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[END, *ROLE_TOKENS], padding_side="left", chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False,
    )


def model_config(arch: str, size: str, tokenizer):
    """The transformers config for `arch` at `size`, with the tokenizer's vocab and pad/bos/eos ids."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise ModelError(f"unknown tiny model arch {arch!r}", f"use one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ModelError(f"unknown tiny model size {size!r}", f"use one of {', '.join(SIZES)}")
    dims = SIZES[size]
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt2":
        return GPT2Config(n_embd=dims["hidden_size"], n_layer=dims["num_hidden_layers"],
                          n_head=dims["num_attention_heads"], n_inner=dims["intermediate_size"],
                          n_positions=MAX_POSITIONS, tie_word_embeddings=False, **ids)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **dims, **ids)


def read_corpus(corpus) -> list[str]:
    """Texts from a list of strings, or a file: .jsonl/.json (every string value, recursively) or plain text lines."""
    if corpus is None:
        from rlchat.demo.task import corpus_texts
        return corpus_texts(0)
    if isinstance(corpus, (list, tuple)):
        return [str(t) for t in corpus]
    path = Path(corpus)
    if not path.is_file():
        raise DataError(f"tokenizer corpus file {str(path)!r} does not exist",
                        "pass a text file (one text per line) or a JSONL file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix not in (".jsonl", ".json"):
        return lines
    texts: list[str] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            _collect_strings(json.loads(line), texts)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{no} is not valid JSON ({err.msg})", "fix or remove that line") from None
    return texts


def _collect_strings(obj, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key != "role":   # "user"/"assistant" labels are not text
                _collect_strings(value, out)
    elif isinstance(obj, list):
        for value in obj:
            _collect_strings(value, out)


def build_tiny_model(out_dir, arch: str = "llama", size: str = "tiny", corpus=None, seed: int = 0,
                     vocab_size: int = 2000, overwrite: bool = False) -> Path:
    """Train a tokenizer on `corpus`, random-init an `arch` model of `size` with `seed`, save both to `out_dir`.

    corpus: list of strings, a text/JSONL file path, or None for the demo task's text (`demo.task.corpus_texts`).
    Writes config.json, generation_config.json, model.safetensors, tokenizer files and tiny.json (how it was
    built). Raises ModelError if `out_dir` holds files and `overwrite` is False. Returns `out_dir` as a Path.
    """
    out = Path(out_dir)
    if arch not in ARCHS or size not in SIZES:
        model_config(arch, size, None)   # raises the ModelError naming the valid choices
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelError(f"{out} already exists and is not empty", "choose a new directory or pass overwrite")
    texts = read_corpus(corpus)

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = model_config(arch, size, tokenizer)
    with torch.random.fork_rng(devices=[]):   # seed the init without changing the caller's RNG state
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"arch": arch, "size": size, "seed": seed, "vocab_size": len(tokenizer),
            "params": sum(p.numel() for p in model.parameters()),
            "corpus": "demo" if corpus is None else (str(corpus) if not isinstance(corpus, (list, tuple))
                                                     else f"{len(texts)} texts")}
    (out / "tiny.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out
