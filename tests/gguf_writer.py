"""Write a llama.cpp GGUF file from a tiny transformers Llama (tests only), with the `gguf` package's GGUFWriter.

It writes what transformers' GGUF loader reads back (transformers/integrations/ggml.py for the config keys,
integrations/gguf/gguf_tokenizer_mapping.py for the tokenizer, modeling_gguf_pytorch_utils.py for the tensors):

- `general.architecture = "llama"` and the `llama.*` hyper-parameters (block count, embedding length, heads, ...);
- the tokenizer as llama.cpp stores a byte-level BPE: `tokenizer.ggml.model = "gpt2"`, the tokens in id order
  (spelled in the GPT-2 byte alphabet, as tokenizer.json has them), token types (3 = control for special tokens,
  1 = normal), the merges as "a b" strings, bos/eos/unk/pad ids and the chat template;
- the tensors under llama.cpp's names (gguf's tensor name map), with the q/k projection rows permuted the way
  llama.cpp's convert_hf_to_gguf.py does (the loader undoes it), stored as F32 or quantized (Q8_0, ...).

`quantize` returns what the file holds after the round trip, so a test can build the exact reference model.
"""
from __future__ import annotations

import json
from pathlib import Path


def _permute(w, n_head: int, n_head_kv: int | None):
    """llama.cpp's q/k row order (pairs of rotary halves interleaved per head)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w, qtype):
    """The float32 values a tensor has after being stored as `qtype` and dequantised again."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    if qtype == GGMLQuantizationType.F32:
        return np.asarray(w, dtype=np.float32)
    return dequantize(quantize(np.asarray(w, dtype=np.float32), qtype), qtype).reshape(w.shape)


def write_llama_gguf(model_dir: str | Path, out: str | Path, qtype: str = "F32", pad_token: str | None = None,
                     architecture: str = "llama", name: str = "tiny-llama", drop: tuple[str, ...] = ()) -> Path:
    """Write the Llama in `model_dir` (config.json, model.safetensors, tokenizer.json) as a GGUF file `out`.

    qtype: "F32" or a gguf quantization name ("Q8_0") for the 2-D weight matrices (norms stay F32).
    pad_token: the pad token to record (default: the tokenizer's); e.g. the eos token, as many llama.cpp files do.
    architecture: written as general.architecture (a wrong one makes an unsupported file for the tests).
    drop: transformers parameter names left out of the file (an incomplete file for the tests).
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, MODEL_ARCH, get_tensor_name_map
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    model_dir, out = Path(model_dir), Path(out)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    n_head, n_kv, n_layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    w = GGUFWriter(str(out), architecture)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])

    # tokenizer: tokens by id, special ones marked as control, merges as "a b"
    vocab = dict(tok_json["model"]["vocab"])
    added = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    vocab.update(added)
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    assert None not in tokens, "tokenizer ids are not contiguous"
    special = {t["content"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(ids[tok_cfg["bos_token"]])
    w.add_eos_token_id(ids[tok_cfg["eos_token"]])
    w.add_pad_token_id(ids[pad_token or tok_cfg["pad_token"]])
    w.add_add_bos_token(False)
    template = tok_cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)

    # tensors under llama.cpp names
    qt = GGMLQuantizationType[qtype]
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)
    state = load_file(str(model_dir / "model.safetensors"))
    for hf_name, value in state.items():
        if hf_name in drop:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        value = value.astype(np.float32)
        if base.endswith("self_attn.q_proj"):
            value = _permute(value, n_head, n_head)
        elif base.endswith("self_attn.k_proj"):
            value = _permute(value, n_head, n_kv)
        if value.ndim == 2 and qt != GGMLQuantizationType.F32:
            w.add_tensor(f"{gguf_name}.{suffix}", quantize(value, qt), raw_dtype=qt)
        else:
            w.add_tensor(f"{gguf_name}.{suffix}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
