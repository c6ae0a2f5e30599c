"""Load tokenizers and causal LMs (Hub id or local directory), LoRA configs; check model files.

A run's own models (the SFT policy, the reward model, the PPO policy) are loaded by rlchat/run_models.py.

- `load_tokenizer(spec)`: AutoTokenizer with three defaults the stages rely on:
  1. a pad token distinct from eos where the vocabulary has one (rlchat/pad_token.py: the tokenizer's own unless
     it is eos, else a pad-named special token, unk or `<|endoftext|>`, else eos, else a new `<|pad|>` token: then
     the model's embeddings must grow, call `align_model_with_tokenizer`), logged on the `rlchat.models` logger;
  2. a chat template: `DEFAULT_CHAT_TEMPLATE` when the tokenizer has none. It is ChatML-shaped, closes every turn
     with the tokenizer's eos token (so generation stops after the answer) and wraps assistant content + eos in
     `{% generation %}` markers (TRL's `assistant_only_loss` needs them):
     "<|im_start|>user\nHi</s>\n<|im_start|>assistant\nHello!</s>\n";
  3. `padding_side = "left"`, which batched generation needs (PPO rollouts, eval). A stage that trains with
     padded batches and wants right padding sets it itself.
- Both accept a `.gguf` file as `spec`: it is converted once into a cached safetensors directory (rlchat.gguf).
- `load_causal_lm(spec)`: `AutoModelForCausalLM.from_pretrained(spec, use_safetensors=True)`. A local directory is
  checked first, so the common mistakes are one-line `ModelError`s: missing directory, no config.json, a PEFT
  adapter instead of a model, .bin-only weights, an encoder or classifier instead of a causal LM, custom code
  without `--trust-remote-code`. Hub ids are looked up by transformers (the cache first; nothing is downloaded
  when HF_HUB_OFFLINE=1).
- `seq_cls_from_causal(model)`: a sequence-classification model (reward / value model) that starts from the
  causal model's backbone weights, built in memory (nothing is written to disk).

Heavy libraries (torch, transformers, peft) are imported inside the functions, so importing this module is cheap.
Weights are always loaded from safetensors; `trust_remote_code` is only passed on when the user asked for it.
"""
from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rlchat.errors import ConfigError, ModelError, first_line
from rlchat.pad_token import set_pad_token

if TYPE_CHECKING:  # pragma: no cover
    import peft
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# ChatML layout with the tokenizer's eos token closing every turn, so that a model trained on it emits eos after
# its answer and generation stops there (generation_config.eos_token_id). `{% generation %}` marks the assistant
# tokens: transformers returns them as `assistant_masks` (return_assistant_tokens_mask=True), which TRL's
# SFTTrainer uses for `assistant_only_loss`. The eos token sits inside the marked span, so the model learns to stop
# (TRL checks exactly this in `is_chat_template_stop_token_trained`). Rendered example:
#   <|im_start|>user\nHi</s>\n<|im_start|>assistant\nHello!</s>\n
# with add_generation_prompt=True the prompt ends in "<|im_start|>assistant\n". A tokenizer without an eos token
# gets the literal "<|im_end|>" instead.
DEFAULT_CHAT_TEMPLATE = (
    "{%- set end = eos_token if eos_token else '<|im_end|>' -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + end -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + end + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


# ------------------------------------------------------------------------------------------------------ devices


def pick_device() -> str:
    """"cuda" if a GPU is visible (this process's GPU, cuda:LOCAL_RANK, in a multi-process run), else "mps" on
    Apple silicon, else "cpu"."""
    import os

    import torch

    if torch.cuda.is_available():
        if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            return f"cuda:{local}"
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def use_bf16() -> bool:
    """True on a CUDA device that supports bfloat16; fp32 everywhere else (CPU, MPS, older GPUs)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def cpu_has_bf16_matmul() -> bool:
    """True if this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there `--dtype bfloat16` runs the
    matmuls about twice as fast as float32 (scripts/demo_real.sh picks it); elsewhere bf16 is emulated and slower."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


# The stage's --dtype and --attn-implementation, set around a stage's run(cfg) by `with_load_settings`, so that
# every model the stage loads follows them (the SFT policy, the reward model, the reference, a --reward-model)
# without threading two arguments through each loader of run_models.py and rewards.py.
_LOAD_SETTINGS: contextvars.ContextVar[dict] = contextvars.ContextVar("rlchat_load_settings", default={})


@contextmanager
def load_settings(dtype: str | None = None, attn_implementation: str | None = None) -> Iterator[None]:
    """Within the block, `resolve_dtype(None)` is `dtype` (unless "auto") and `from_pretrained` gets
    `attn_implementation` (unless None)."""
    token = _LOAD_SETTINGS.set({"dtype": dtype, "attn_implementation": attn_implementation})
    try:
        yield
    finally:
        _LOAD_SETTINGS.reset(token)


def with_load_settings(run: Callable) -> Callable:
    """Decorator for a stage's `run(cfg)`: its models load in cfg.dtype with cfg.attn_implementation."""

    @functools.wraps(run)
    def wrapper(cfg, *args, **kwargs):
        with load_settings(getattr(cfg, "dtype", None), getattr(cfg, "attn_implementation", None)):
            return run(cfg, *args, **kwargs)

    return wrapper


def load_kwargs() -> dict:
    """Extra from_pretrained / from_config keywords of the current load settings: attn_implementation if set."""
    attn = _LOAD_SETTINGS.get().get("attn_implementation")
    return {"attn_implementation": attn} if attn else {}


def resolve_dtype(name: str | None = None) -> "torch.dtype":
    """A torch dtype from a name ("bf16", "float32", ...); None -> the stage's --dtype (`load_settings`);
    "auto" (or None without one) -> bfloat16 if `use_bf16()` else float32."""
    import torch

    if name is None:
        name = _LOAD_SETTINGS.get().get("dtype")
    if name is None or str(name).lower() == "auto":
        return torch.bfloat16 if use_bf16() else torch.float32
    if isinstance(name, torch.dtype):
        return name
    key = _DTYPES.get(str(name).lower().removeprefix("torch."))
    if key is None:
        raise ConfigError(f"unknown dtype '{name}'", "use auto, float32, bfloat16 or float16")
    return getattr(torch, key)


# --------------------------------------------------------------------------------------------------- tokenizers


def is_local(spec: str) -> bool:
    """True if `spec` names a local path (existing, or shaped like a path) rather than a Hub id."""
    from rlchat.data import looks_like_path

    return Path(str(spec)).expanduser().exists() or looks_like_path(str(spec), extensions=())


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """AutoTokenizer for a Hub id or local directory, with a pad token, a chat template and left padding."""
    from transformers import AutoTokenizer

    spec = _gguf_to_dir(str(spec))
    if is_local(spec):
        path = _check_local_dir(spec, "tokenizer")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelError(f"{spec} has no tokenizer files (tokenizer.json or tokenizer_config.json)",
                             "save the tokenizer into it with tokenizer.save_pretrained(dir), or pass a directory "
                             "or Hub id that has one")
        _check_remote_code(spec, path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(_load_path(spec), trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _load_error(spec, err, "tokenizer") from None

    set_pad_token(tokenizer, spec)
    if tokenizer.eos_token is None:
        log.warning("tokenizer %s has no eos token: generation stops only at the length limit", spec)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        log.info("tokenizer %s has no chat template; using rlchat's default ChatML-style template", spec)
    tokenizer.padding_side = "left"
    return tokenizer


def _gguf_to_dir(spec: str) -> str:
    """A `.gguf` file as --model: its converted directory in the cache (converted on first use, see rlchat.gguf)."""
    from rlchat import gguf

    return str(gguf.model_dir(spec)) if gguf.is_gguf_spec(spec) else spec


# ------------------------------------------------------------------------------------------------------- models


def load_causal_lm(spec: str, trust_remote_code: bool = False, dtype: Any = None,
                   device: str | None = None) -> "PreTrainedModel":
    """AutoModelForCausalLM from safetensors weights, in `resolve_dtype(dtype)`, moved to `device` if given.

    Raises ModelError for a missing directory, no config.json, .bin-only weights, a model that is not a causal
    LM, custom code without trust_remote_code, or a Hub id that cannot be fetched.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = _gguf_to_dir(str(spec))
    path = None
    if is_local(spec):
        path = _check_local_dir(spec)
        if not (path / "config.json").is_file():
            _check_model_files(spec, path)  # raises: an adapter directory, or not a model directory
        _check_remote_code(spec, path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(_load_path(spec), trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _load_error(spec, err, "model") from None
    _check_causal(spec, config, trust_remote_code)  # "not a causal LM" is the more useful message: check it first
    if path is not None:
        _check_model_files(spec, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(_load_path(spec), config=config, dtype=resolve_dtype(dtype),
                                                     use_safetensors=True, trust_remote_code=trust_remote_code,
                                                     **load_kwargs())
    except Exception as err:
        raise _load_error(spec, err, "model") from None
    if device is not None:
        model.to(device)
    return model


def align_model_with_tokenizer(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> None:
    """Grow the embeddings if the tokenizer has more tokens than the model, and copy pad/eos ids into its configs.

    Needed after `load_tokenizer` added a pad token; harmless otherwise (models often have spare embedding rows).
    """
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
        log.warning("resized the model's embeddings to %d tokens to fit the tokenizer", len(tokenizer))
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id


def lora_config(r: int, alpha: int, dropout: float, target_modules: list[str] | str | None,
                task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> "peft.LoraConfig":
    """A peft LoraConfig. `target_modules`: a list, a comma-separated string, "all-linear", "re:<regex>" (peft's
    full-match regex over module names, e.g. "re:.*layers\\.(2[2-9])\\..*_proj" for the top 8 of 30 layers: no
    gradient then flows below layer 22, which saves the backward pass and the activations kept for it there), or
    None (peft's default for known architectures). For task_type "SEQ_CLS", peft itself keeps the `score` head
    trainable and saves it with the adapter."""
    from peft import LoraConfig

    if isinstance(target_modules, str) and target_modules.startswith("re:"):
        target_modules = target_modules[3:]  # peft takes a str (other than "all-linear") as a full-match regex
    elif isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or None,
                      task_type=task_type, modules_to_save=modules_to_save, bias="none")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def seq_cls_from_causal(causal_model: "PreTrainedModel", num_labels: int = 1,
                        pad_token_id: int | None = None) -> "PreTrainedModel":
    """An AutoModelForSequenceClassification with the causal model's backbone weights and a fresh `score` head.

    The backbone tensors are copied (the causal model is left untouched). Only the classification head may be
    missing and only the LM head may be left over; anything else means the two architectures do not share a
    backbone and is a ModelError. `pad_token_id` (else the causal config's) goes into the config: the classifier
    reads the score at the last non-pad token, so it must be set for batches.
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_model.config)
    config.num_labels = num_labels
    config.architectures = None
    text_config = config.get_text_config()
    if pad_token_id is None:
        pad_token_id = text_config.pad_token_id
        if pad_token_id is None and getattr(causal_model, "generation_config", None) is not None:
            pad_token_id = causal_model.generation_config.pad_token_id
    if pad_token_id is None:
        raise ModelError("the model has no pad_token_id, which a reward model needs to find the last token",
                         "pass pad_token_id=tokenizer.pad_token_id")
    text_config.pad_token_id = pad_token_id
    config.pad_token_id = pad_token_id
    name = getattr(config, "_name_or_path", "") or type(causal_model).__name__
    try:
        model = AutoModelForSequenceClassification.from_config(config, dtype=causal_model.dtype, **load_kwargs())
    except ValueError as err:  # no sequence-classification class for this model type
        raise ModelError(f"{name} ({config.model_type}) has no sequence-classification variant in transformers: "
                         f"{first_line(err)}", "use a model family with a ...ForSequenceClassification class "
                         "(Llama, Qwen2, Mistral, GPT-2, ...)") from None
    state = {k: v.detach().clone() for k, v in causal_model.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    head = ("score.", "classifier.")
    bad_missing = [k for k in result.missing_keys if not k.startswith(head)]
    bad_unexpected = [k for k in result.unexpected_keys if not k.startswith("lm_head.")]
    if bad_missing or bad_unexpected:
        raise ModelError(f"cannot turn {name} into a reward model: backbone weights do not match "
                         f"(missing {bad_missing[:3]}, unexpected {bad_unexpected[:3]})",
                         "use a model whose ...ForSequenceClassification class shares the causal LM's backbone")
    model.to(causal_model.device)
    model.train(causal_model.training)
    return model


# ------------------------------------------------------------------------------------------------------ checks


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a .safetensors file, or None if it looks whole. Reads only the header: an 8-byte length,
    a JSON table of tensors with byte offsets; the file must end exactly where the last tensor does (a file cut
    short by a kill or a full disk does not)."""
    import struct

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"cut short ({size} bytes, no header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"cut short ({size} bytes, the header alone needs {n + 8})"
            header = json.loads(f.read(n))
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a table of tensors)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        return "not a safetensors file (bad tensor table)"
    if size != 8 + n + end:
        return f"cut short ({size} bytes, expected {8 + n + end})" if size < 8 + n + end else \
            f"has {size - 8 - n - end} unexpected trailing bytes"
    return None


def check_weights(directory: str | Path, fix: str) -> None:
    """ModelError naming the first damaged *.safetensors file in `directory` (see `safetensors_problem`)."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ModelError(f"{path} is damaged: {problem}", fix)


def _load_path(spec: str) -> str:
    return str(Path(spec).expanduser()) if is_local(spec) else spec


def _run_holding(path: Path) -> Path | None:
    """The run directory (holding run.json) that `path` lies inside, or None."""
    for parent in path.absolute().parents:
        if (parent / "run.json").is_file():
            return parent
    return None


def _check_local_dir(spec: str, what: str = "model") -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        run = _run_holding(path)
        if run is not None:  # a stage's output that went missing: a Hub id is no fix
            stage = path.absolute().relative_to(run.absolute()).parts[0]
            raise ModelError(f"{what} directory {spec} is missing from the run directory {run}",
                             f"restore it, or rerun that stage (`rlchat {'train-reward' if stage == 'reward' else stage}"
                             f" --run-dir {run} --overwrite ...`)")
        raise ModelError(f"model directory not found: {spec}",
                         f"check the path (relative to {os.getcwd()}), or pass a Hub id such as "
                         "Qwen/Qwen2.5-0.5B-Instruct")
    if not path.is_dir():
        raise ModelError(f"{spec} is a file, not a model directory",
                         "pass the directory that holds config.json and model.safetensors")
    return path


def _check_model_files(spec: str, path: Path) -> None:
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            base = read_json_object(path / "adapter_config.json").get("base_model_name_or_path")
            raise ModelError(f"{spec} is a PEFT adapter, not a full model",
                             f"pass its base model ({base or 'see adapter_config.json'}) as the model; "
                             "the adapter is applied by the stage that made it")
        raise ModelError(f"{spec} has no config.json, so it is not a transformers model directory",
                         "pass a directory written by save_pretrained (config.json + model.safetensors), or a Hub id")
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        check_weights(path, "restore the file (or rewrite the model with save_pretrained); if a stage wrote it, "
                            "rerun that stage with --overwrite")
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        convert = (f"python -c \"from transformers import AutoModelForCausalLM as M; "
                   f"M.from_pretrained('{spec}', use_safetensors=False).save_pretrained('{spec}-safetensors')\"")
        raise ModelError(f"{spec} has only PyTorch .bin weights; rlchat loads safetensors only (a .bin file is a "
                         "pickle that can run code when loaded)",
                         f"if you trust the file, convert it once with {convert} and pass {spec}-safetensors")
    raise ModelError(f"{spec} has no model weights (no *.safetensors file)",
                     "save the model with model.save_pretrained(dir), or pass a Hub id")


def _check_remote_code(spec: str, path: Path, trust_remote_code: bool) -> None:
    """Custom code (config.json auto_map for a model type transformers does not know) needs the flag."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_path = path / "config.json"
    if trust_remote_code or not config_path.is_file():
        return
    config = read_json_object(config_path)
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise _remote_code_error(spec)


def _check_causal(spec: str, config: Any, trust_remote_code: bool) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    native = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)

    def is_causal_arch(arch: str) -> bool:
        if arch in causal_names or arch.endswith(("ForCausalLM", "LMHeadModel")):
            return True
        # a bare decoder backbone ("LlamaModel") loads fine into ...ForCausalLM; an encoder ("BertModel") does not
        return arch.endswith("Model") and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if native and (not archs or any(is_causal_arch(a) for a in archs)):
        return
    what = archs[0] if archs else (model_type or "unknown")
    raise ModelError(f"{spec} is a {what} model, not a causal LM",
                     "pass a decoder-only language model (a ...ForCausalLM checkpoint such as "
                     "Qwen/Qwen2.5-0.5B-Instruct)")


def _remote_code_error(spec: str) -> ModelError:
    return ModelError(f"{spec} needs its own Python code to load (trust_remote_code)",
                      "read that code first, then pass --trust-remote-code if you trust it")


def _load_error(spec: str, err: BaseException, what: str) -> ModelError:
    """A transformers loading error as a one-line ModelError."""
    text = first_line(err)
    if "trust_remote_code" in str(err):
        return _remote_code_error(spec)
    if is_local(spec):
        return ModelError(f"could not load the {what} from {spec}: {text}",
                          "check that the directory was written by save_pretrained and is complete")
    if "safetensors" in str(err) and what == "model":
        return ModelError(f"{spec} on the Hub has no safetensors weights: {text}",
                          "use a model that publishes model.safetensors, or convert it locally and pass the "
                          "directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = " (HF_HUB_OFFLINE is set: only models already in the local cache load)" if offline else ""
    return ModelError(f"could not load {what} '{spec}' from the Hub{hint}: {text}; no local directory named "
                      f"'{spec}' exists either", "check the id and your network, or pass a local model directory")


def read_json_object(path: Path, fix: str = "restore or regenerate the file") -> dict:
    """A JSON file's object ({} for another JSON value); ModelError naming the file if it is not valid JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path} is not valid JSON: {first_line(err)}", fix) from None
    return data if isinstance(data, dict) else {}
