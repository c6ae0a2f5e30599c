"""GGUF model files (llama.cpp's format) as rlchat input: converted once into a safetensors model directory.

- `convert(src, out)`: read a `.gguf` file, dequantise it to float32 and write a standard transformers directory
  (config.json, generation_config.json, model.safetensors, tokenizer files, `rlchat_gguf.json` saying where it came
  from). Used by `rlchat import-gguf FILE OUT`; OUT appears complete or not at all (tmp directory + rename).
- `model_dir(spec)`: the converted directory of a `.gguf` given as any stage's `--model`, from the cache (below),
  converting it on first use. `rlchat.models.load_causal_lm` / `load_tokenizer` call it, so every stage accepts a
  GGUF file wherever it accepts a model directory.
- `input_record(spec)`: the manifest entry of a GGUF input: its sha256 and the directory it was converted into.
- `read_config(spec)`: the model config from the file's metadata alone (no tensors read), for `rlchat plan`.

How: transformers' own GGUF loader (it needs the `gguf` package) builds the config and the tokenizer from the
metadata and dequantises every tensor. A model loaded that way is marked as quantized and `save_pretrained` refuses
it, so the plain model class is rebuilt from the config (on the meta device: no second copy of the weights), the
dequantised tensors are assigned to it, and that is saved. Weights stay float32: Q4/Q8 blocks dequantise to
values that bfloat16 would round again.

Pad token: llama.cpp files often set pad = EOS (SmolLM2: both `<|im_end|>`). rlchat's own masks come from lengths,
but a sequence-classification (reward) model finds its last token as "the last id that is not pad", so pad = EOS
makes it skip a final EOS. The converter gives the tokenizer a pad token distinct from EOS when the vocabulary has
one (`rlchat.pad_token.distinct_pad_token`: a token named like a pad, the unk token, `<|endoftext|>`), and records
the choice in `rlchat_gguf.json`.

Cache: `$RLCHAT_CACHE/gguf/<first 16 hex digits of the file's sha256>/`; without RLCHAT_CACHE,
`$XDG_CACHE_HOME/rlchat/gguf/...`, else `~/.cache/rlchat/gguf/...`. Keyed by content, not by path, so a file that
is moved, renamed or given by another relative path converts once, and a file that changes converts again.
Outside the run directory: a dequantised model is large (135M parameters: 540 MB in float32) and many runs share
one base. A conversion holds `<key>.lock` (flock), so the processes of a run convert once. Delete entries freely.

What it leaves out: writing GGUF files, keeping the quantization (rlchat trains float weights), architectures
transformers cannot read from GGUF.

    rlchat import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
    rlchat sft --model SmolLM2-135M-Instruct.Q4_1.gguf ...
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from rlchat import __version__
from rlchat.errors import ModelError, first_line

MAGIC = b"GGUF"
MARKER = "rlchat_gguf.json"   # written last into a converted directory: its presence means "complete"
CONVERTER_VERSION = 1         # bump when the output of `convert` changes: cached directories are then redone
_SHA_MEMO: dict[tuple, str] = {}


# ------------------------------------------------------------------------------------------------ recognising


def is_gguf_spec(spec: Any) -> bool:
    """True if a --model value names a GGUF file (by its extension; Hub ids do not end in .gguf)."""
    return str(spec).lower().endswith(".gguf")


def cache_root() -> Path:
    """Where `.gguf` models given as --model are converted to (see the module docstring)."""
    if os.environ.get("RLCHAT_CACHE"):
        return Path(os.environ["RLCHAT_CACHE"]).expanduser() / "gguf"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rlchat" / "gguf"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes; remembered per (path, size, mtime) within the process, since each stage
    resolves its --model more than once (manifest, tokenizer, model)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


# ------------------------------------------------------------------------------------------------ checking


def _check_file(path: Path) -> None:
    """ModelError unless `path` is a readable file that starts with the GGUF magic bytes."""
    if not path.exists():
        raise ModelError(f"GGUF file not found: {path}", f"check the path (relative to {os.getcwd()})")
    if not path.is_file():
        raise ModelError(f"{path} is a directory, not a .gguf file", "pass the .gguf file itself")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ModelError(f"cannot read {path}: {(err.strerror or str(err)).lower()}",
                         "check that the file exists and that you may read it") from None
    if head != MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {head!r}, a GGUF file with b'GGUF')",
                         "pass a llama.cpp .gguf model file; for a safetensors model pass its directory instead")


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("reading a .gguf file needs the gguf Python package, which is not installed",
                         "pip install gguf (or reinstall rlchat: it is a dependency)") from None
    from transformers.utils.import_utils import is_gguf_available

    if not is_gguf_available():
        from transformers.utils.import_utils import GGUF_MIN_VERSION

        raise ModelError(f"the installed `gguf` package is too old for transformers (it needs >= {GGUF_MIN_VERSION})",
                         "pip install -U gguf")


def _field(reader, key: str, default: Any = None) -> Any:
    """A metadata value of the file, or `default` when it is missing or unreadable."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - an unreadable value is the same as a missing one here
        return default


def _open_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as err:  # a truncated or corrupt file fails in many ways inside the reader
        raise ModelError(f"{path} is damaged or not a model GGUF file: {first_line(err)}",
                         "download the file again (compare its size and checksum with the source)") from None


def _check_architecture(path: Path, arch: Any) -> str:
    """The transformers model_type of the file's architecture; ModelError if transformers cannot load it."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not arch:
        raise ModelError(f"{path} has no general.architecture entry, so it is not a model GGUF file",
                         "pass a llama.cpp model file (converted with convert_hf_to_gguf.py)")
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"tokenizer", "general"})
    # the loader renames a few (mistral models stored as llama, qwen2moe -> qwen2_moe); accept what it accepts
    model_type = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "gemma3": "gemma3_text",
                  "minimax-m2": "minimax_m2"}.get(arch, arch)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and model_type not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{path} holds a '{arch}' model, which transformers {transformers.__version__} cannot "
                         f"load from GGUF (it reads {', '.join(supported)})",
                         "use the original safetensors model (a Hub id or directory), or a GGUF of one of those "
                         "architectures")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{path} holds a '{arch}' model, which is not a causal language model",
                         "pass a decoder-only chat model (llama, qwen2, mistral, ...)")
    return model_type


def _check_tokenizer(path: Path, reader, arch: str) -> str:
    """The file's tokenizer type; ModelError if it has none or transformers cannot rebuild it."""
    import transformers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_SENTENCEPIECE_BUILDERS, GGUF_TOKENIZER_TYPES

    tok_type = _field(reader, "tokenizer.ggml.model")
    if tok_type is None or "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelError(f"{path} has no tokenizer (no tokenizer.ggml.model / tokens metadata)",
                         "use a GGUF file that embeds its tokenizer (llama.cpp's converter writes one)")
    if tok_type not in GGUF_TOKENIZER_TYPES and not (tok_type == "llama" and arch in GGUF_SENTENCEPIECE_BUILDERS):
        raise ModelError(f"{path} has a '{tok_type}' tokenizer, which transformers {transformers.__version__} "
                         f"cannot rebuild from GGUF (it reads {', '.join(sorted(GGUF_TOKENIZER_TYPES))})",
                         "use the original model's directory instead")
    return tok_type


def _check_quantizations(path: Path, reader) -> dict[str, int]:
    """{quantization type: tensor count}; ModelError if one row of one tensor of some type does not dequantise."""
    import numpy as np
    from gguf import dequantize

    seen: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            continue
        try:
            data = tensor.data[:1] if tensor.data.ndim >= 2 else tensor.data  # one row is enough
            dequantize(np.asarray(data), tensor.tensor_type)
        except Exception as err:  # noqa: BLE001 - NotImplementedError for types gguf-py cannot dequantise
            raise ModelError(f"{path} stores tensor {tensor.name} as {name}, which the installed gguf package "
                             f"cannot dequantise ({first_line(err)})",
                             "pip install -U gguf, or use a file quantized as Q8_0, Q4_K, F16 or similar") from None
    return seen


def inspect_file(path: str | Path) -> dict:
    """Read the metadata (no tensor data) and check that transformers can convert the file.

    Returns {"architecture", "model_type", "name", "tokenizer", "quantizations", "tensors"}. Raises ModelError
    for a missing or non-GGUF file, no `gguf` package, a damaged file, an architecture transformers cannot read
    from GGUF or that is not a causal LM, a file without tokenizer metadata, or a quantization `gguf` cannot
    dequantise. Nothing is written.
    """
    path = Path(path).expanduser()
    _check_file(path)
    _require_gguf_package()
    reader = _open_reader(path)
    arch = _field(reader, "general.architecture")
    model_type = _check_architecture(path, arch)
    tok_type = _check_tokenizer(path, reader, arch)
    seen = _check_quantizations(path, reader)
    return {"architecture": arch, "model_type": model_type, "name": _field(reader, "general.name"),
            "tokenizer": tok_type, "quantizations": seen, "tensors": len(reader.tensors)}


# ------------------------------------------------------------------------------------------------ converting


@contextlib.contextmanager
def _quiet_loader() -> Iterator[None]:
    """Silence transformers' per-tensor tqdm bar during a conversion (the CLI prints one line instead)."""
    from transformers import modeling_gguf_pytorch_utils as mod

    original = mod.tqdm
    mod.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        mod.tqdm = original


def _load_with_transformers(src: Path, info: dict):
    """(tokenizer, model) as transformers' GGUF loader builds them (dequantised to float32); ModelError if the
    file lacks weights the model needs (transformers would fill them with random values, a warning only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    with _quiet_loader():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded, loading = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                                   output_loading_info=True)
        except ModelError:
            raise
        except Exception as err:  # inspect_file caught the known cases; anything else is still one line
            raise ModelError(f"transformers could not convert {src}: {first_line(err)}",
                             "use the original safetensors model instead, or report the file") from None
    missing = [k for k in loading.get("missing_keys") or () if not (k.startswith("lm_head.")
                                                                   and loaded.config.tie_word_embeddings)]
    if missing:
        raise ModelError(f"{src} lacks weights the {info['architecture']} model needs (e.g. {sorted(missing)[0]}, "
                         f"{len(missing)} in all)", "use a complete model file (or the original safetensors model)")
    return tokenizer, loaded


def _plain_model(src: Path, loaded):
    """The plain model class from the loaded model's config, its weights assigned (not copied): a model loaded
    from GGUF is marked as quantized and save_pretrained refuses it."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    if config.get_text_config().tie_word_embeddings:
        plain.tie_weights()
    still_meta = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if still_meta or result.unexpected_keys:
        example = (still_meta or result.unexpected_keys)[0]
        raise ModelError(f"converting {src} left weights without values (e.g. {example})",
                         "report the file; use the original safetensors model meanwhile")
    plain.generation_config = loaded.generation_config
    return plain


def _set_pad(tokenizer, plain) -> None:
    """A pad token distinct from EOS when the vocabulary allows (see the module docstring), into the tokenizer and
    the model's configs; the context length as the tokenizer's limit."""
    from rlchat.pad_token import distinct_pad_token

    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        choice = distinct_pad_token(tokenizer)
        if choice is not None:
            tokenizer.pad_token = choice
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    text_config = plain.config.get_text_config()
    text_config.pad_token_id = tokenizer.pad_token_id
    gen = plain.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit and (not tokenizer.model_max_length or tokenizer.model_max_length > 10**9):
        tokenizer.model_max_length = limit  # the GGUF tokenizer says "unlimited"; the context length is known


def _ordinary_mode(path: Path, mode: int) -> None:
    """chmod to `mode` less the umask: mkdtemp and some writers make private (0600/0700) files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _write_converted(src: Path, dest: Path, info: dict) -> dict:
    """Convert `src` into the empty directory `dest`; returns the marker dict (also written as MARKER, last)."""
    import transformers

    t0 = time.time()
    tokenizer, loaded = _load_with_transformers(src, info)
    plain = _plain_model(src, loaded)
    before = tokenizer.pad_token
    _set_pad(tokenizer, plain)
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    del loaded
    marker = {
        "source": src.name, "sha256": info["sha256"], "bytes": src.stat().st_size,
        "architecture": info["architecture"], "quantizations": info["quantizations"],
        "name": info.get("name"), "dtype": "float32",
        "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
        "pad_token_in_file": before, "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "converter_version": CONVERTER_VERSION, "rlchat_version": __version__,
        "transformers_version": transformers.__version__,
        "seconds": round(time.time() - t0, 1),
    }
    for f in dest.iterdir():
        _ordinary_mode(f, 0o666)
    (dest / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return marker


def _fresh_tmp(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    _ordinary_mode(tmp, 0o777)
    return tmp


def _swap_in(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished tmp directory to `final`; an old `final` is moved aside first and deleted after."""
    old = None
    if final.exists() and overwrite:
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    elif final.exists():  # an empty directory (checked by the caller) is replaced by the rename
        final.rmdir()
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert(src: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Convert the GGUF file `src` into the model directory `out` (see the module docstring).

    `out` must be new or empty unless `overwrite`. Every check runs before anything is written; the conversion
    goes into a tmp directory beside `out`, renamed into place only when complete, so a failure or a kill never
    leaves a half-written `out` (nor touches an old one). Returns the marker dict plus "path".
    """
    src = Path(src).expanduser()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} exists and is a file", "choose a directory path for the converted model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out} exists and is not empty", "choose another directory or pass --overwrite")
    if src.resolve().is_relative_to(out.resolve()):  # --overwrite would delete the source
        raise ModelError(f"{out} holds the GGUF file itself", "write the converted model to another directory")
    info = inspect_file(src)
    info["sha256"] = file_sha256(src)
    try:
        tmp = _fresh_tmp(out)
    except OSError as err:
        raise ModelError(f"cannot write to {out}: {(err.strerror or str(err)).lower()}",
                         "choose a directory you can write to") from None
    marker = _convert_into(src, tmp, out, info, overwrite, "free some disk space or choose another directory")
    return {**marker, "path": str(out)}


def _convert_into(src: Path, tmp: Path, final: Path, info: dict, overwrite: bool, fix: str) -> dict:
    """Convert into `tmp`, then rename it to `final`; on any failure (a kill included) `tmp` is removed and
    `final` is left as it was. An OSError becomes a one-line ModelError with `fix`."""
    try:
        marker = _write_converted(src, tmp, info)
        _swap_in(tmp, final, overwrite)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise ModelError(f"could not write the converted model to {final}: "
                             f"{(err.strerror or str(err)).lower()}", fix) from None
        raise
    return marker


def _complete(directory: Path, sha: str) -> bool:
    """True if `directory` is a finished conversion of the file with this sha256 by this converter version."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("sha256") != sha or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    from rlchat.models import safetensors_problem

    weights = list(directory.glob("*.safetensors"))
    return bool(weights) and all(safetensors_problem(p) is None for p in weights)


@contextlib.contextmanager
def _cache_lock(root: Path, key: str) -> Iterator[None]:
    """An exclusive flock on <root>/<key>.lock while converting (released when the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock; two simultaneous first runs may convert twice
        yield
        return
    with open(root / f"{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def model_dir(spec: str | Path) -> Path:
    """The converted model directory of a GGUF --model: from the cache, or converted into it now (once)."""
    src = Path(spec).expanduser()
    _check_file(src)
    sha = file_sha256(src)
    final = cache_root() / sha[:16]
    if _complete(final, sha):
        return final
    info = inspect_file(src)   # every check before the first write to the cache
    info["sha256"] = sha
    from rlchat.progress import console

    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(f"cannot create the GGUF cache {root}: {(err.strerror or str(err)).lower()}",
                         "set RLCHAT_CACHE to a directory you can write to") from None
    with _cache_lock(root, sha[:16]):
        if _complete(final, sha):  # another process converted it while we waited
            return final
        size = src.stat().st_size / 1e6
        console.print(f"gguf: converting {src.name} ({size:.0f} MB, {info['architecture']}) once into {final}",
                      highlight=False)
        # overwrite: a stale (older converter, damaged) directory is replaced
        _convert_into(src, _fresh_tmp(final), final, info, True,
                      "free some disk space, or set RLCHAT_CACHE to another directory")
    return final


def input_record(spec: str) -> dict:
    """Manifest entry of a GGUF input: where it is, its sha256, and the directory it converts into."""
    path = Path(spec).expanduser()
    _check_file(path)  # a stage records its inputs first: a file that is not GGUF fails here, before any data
    sha = file_sha256(path)
    return {"spec": str(spec), "kind": "local", "format": "gguf", "path": str(path.resolve()),
            "hash": "sha256:" + sha, "converted": str(cache_root() / sha[:16])}


def read_config(spec: str | Path):
    """The transformers config described by the file's metadata (no tensors read, nothing written)."""
    from transformers import AutoConfig

    src = Path(spec).expanduser()
    inspect_file(src)
    try:
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot read the model config of {src}: {first_line(err)}",
                         "use the original safetensors model instead") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
