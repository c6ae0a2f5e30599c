"""Load any dataset spec and detect the TRL dataset formats the stages accept.

A dataset spec is one of:

- a local file: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or JSON lines),
  ``.parquet`` or ``.csv``. A single file is one split, ``train``;
- a ``Dataset.save_to_disk`` directory (one split) or ``DatasetDict.save_to_disk`` directory (pick ``split``);
- any other local directory is handed to ``datasets.load_dataset`` (a cloned Hub dataset repo, a folder of files);
- a Hub dataset id (``trl-lib/tldr``), loaded with ``datasets.load_dataset(spec, config, split=split)``;
- a mixture of the above, comma-separated: ``a.jsonl,b.jsonl`` (all rows) or ``a.jsonl:0.3,b.jsonl:0.7`` (each
  input's share of the mixture, as TRL's dataset_mixture ``fraction``); see rlchat/mixtures.py.

Local files are read into memory (no cache files are written next to them, and a ``save_to_disk`` directory is
loaded with ``keep_in_memory=True`` so later ``.map()`` calls never write cache files into the user's folder).
JSONL is parsed here line by line so that a bad line is reported by number.

Formats (https://huggingface.co/docs/trl/dataset_formats):

- SFT: ``messages`` (conversational), ``prompt`` + ``completion`` (strings, or lists of messages), ``text``.
- Preference: ``explicit`` (``prompt`` + ``chosen`` + ``rejected``) or ``implicit`` (``chosen`` + ``rejected``,
  the prompt inside both); each either plain strings or lists of messages.
- Prompts (PPO, eval): a ``prompt`` column (string or messages), else ``messages`` (a trailing assistant turn is
  dropped), else ``text``.

Every user error is a one-line ``DataError`` naming the file, row or column and the fix. Heavy libraries
(``datasets``, ``pyarrow``) are imported inside the functions that need them, so importing this module is cheap.

Not here on purpose: tokenization and chat templates (the stages and TRL do that), streaming datasets.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.errors import DataError, first_line
from rlchat.mixtures import load_mixture, parse_mixture

if TYPE_CHECKING:  # pragma: no cover
    import datasets

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
SFT_FORMATS = ("messages", "prompt_completion", "text")
PREFERENCE_FORMATS = ("explicit", "implicit")
PROMPT_COLUMNS = ("prompt", "messages", "text")

_SFT_HELP = ("'messages' (a list of {role, content}), 'prompt' + 'completion' (strings or lists of messages) "
             "or 'text' (a string)")
_PREFERENCE_HELP = ("'prompt' + 'chosen' + 'rejected' (explicit prompt) or 'chosen' + 'rejected' (implicit prompt), "
                    "as strings or lists of {role, content}")
_PROMPT_HELP = "'prompt' (a string or a list of {role, content}), 'messages' or 'text'"
# Rows checked for value types: enough to catch a wrong column, cheap on a large dataset.
# A Hub repo id: "name" or "owner/name" (huggingface_hub.utils.validate_repo_id, simplified).
_HUB_ID = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")


# ----------------------------------------------------------------------------------------------------- loading


def looks_like_path(spec: str, extensions: tuple[str, ...] = SUPPORTED_EXTENSIONS) -> bool:
    """True if `spec` is meant as a local path rather than a Hub id.

    A path starts with '.', '/' or '~', has a known file extension, contains the OS separator where that is not
    '/', or is not shaped like a Hub id ("name" or "owner/name"). Used so that a missing local file is reported
    as missing instead of being looked up on the Hub.
    """
    spec = str(spec)
    if spec.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in spec):
        return True
    if extensions and spec.lower().endswith(tuple(extensions)):
        return True
    return _HUB_ID.match(spec) is None


def load_any(spec: str, split: str | None = "train", config: str | None = None) -> "datasets.Dataset":
    """Load a local file, a save_to_disk directory, a Hub dataset or a mixture of them as one `datasets.Dataset`.

    `split` picks a split of a DatasetDict directory or Hub dataset; a single file or a saved Dataset is one split
    named "train" (a saved Dataset also answers to the split it was saved from), and asking it for another split
    is a DataError. `split=None` takes the only split there is. `config` is the Hub dataset configuration (subset), ignored for local files.
    Raises DataError for a missing path, an unsupported extension, a malformed line, an unknown split, an empty
    dataset or a Hub failure.
    """
    spec = str(spec)
    try:
        parts = parse_mixture(spec)
    except ValueError as err:
        raise DataError(f"dataset mixture {spec!r}: {err}", "write it as a.jsonl,b.jsonl or a.jsonl:0.3,b.jsonl:0.7"
                        ) from None
    if len(parts) > 1:
        return load_mixture(spec, parts, split, config)
    path = Path(spec).expanduser()
    if path.is_dir():
        ds = _load_directory(spec, path, split, config)
    elif path.is_file():
        ds = _load_file(spec, path)
        _check_single_split(spec, split, "train")
    elif looks_like_path(spec):
        raise DataError(f"dataset file not found: {spec}",
                        "check the path (relative paths are resolved from the current directory "
                        f"{os.getcwd()}), or pass a Hub dataset id such as trl-lib/tldr")
    else:
        ds = _load_hub(spec, split, config)
    if len(ds) == 0:
        where = f"split '{split}' of {spec}" if split and not path.is_file() else spec
        raise DataError(f"dataset {where} has no rows", "check that the file or split holds examples")
    return ds


def _load_file(spec: str, path: Path) -> "datasets.Dataset":
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(f"unsupported dataset file type '{path.suffix or '(none)'}': {spec}",
                        f"use one of {', '.join(SUPPORTED_EXTENSIONS)}, a save_to_disk directory or a Hub id")
    if suffix in (".jsonl", ".json"):
        rows = _read_json_rows(spec, path)
        return _rows_to_dataset(spec, rows)
    import datasets

    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError with a readable message
        raise DataError(f"could not read {spec}: {first_line(err)}",
                        f"check that the file is valid {suffix[1:].upper()}") from err
    return datasets.Dataset(table)


def _read_json_rows(spec: str, path: Path) -> list[dict]:
    """Rows of a .json/.jsonl file. A .json file may be a list of objects, {"key": [objects]}, a dict of columns,
    a single object, or JSON lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{spec} is not UTF-8 text (byte {err.start})", "save the file as UTF-8") from err
    except OSError as err:
        raise DataError(f"cannot read dataset {spec}: {(err.strerror or str(err)).lower()}",
                        "check that the file exists and that you may read it") from None
    first = text.lstrip()[:1]
    if path.suffix.lower() == ".json" and first == "[":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{spec} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
                            "fix the file: it must be a JSON list of objects, or one JSON object per line") from None
        for i, row in enumerate(whole):
            if not isinstance(row, dict):
                raise DataError(f"item {i} of {spec} is a JSON {_json_type(row)}, not an object",
                                'make the file a list of objects such as {"prompt": "...", "completion": "..."}')
        return whole
    if path.suffix.lower() == ".json" and first == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one JSON document: read it as JSON lines below
        if isinstance(whole, dict):
            values = list(whole.values())
            if len(values) == 1 and isinstance(values[0], list) and all(isinstance(r, dict) for r in values[0]):
                return values[0]  # {"data": [{...}, ...]}
            if values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
                return [dict(zip(whole, row)) for row in zip(*values)]  # columns: {"prompt": [...], ...}
            return [whole]  # a single example
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are allowed
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"line {lineno} of {spec} is not valid JSON: {err.msg} (column {err.colno})",
                            "fix or remove that line; each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"line {lineno} of {spec} is a JSON {_json_type(row)}, not an object",
                            'make each line one object such as {"prompt": "...", "completion": "..."}')
        rows.append(row)
    return rows


def _rows_to_dataset(spec: str, rows: list[dict]) -> "datasets.Dataset":
    import datasets

    # Dataset.from_list takes the columns of the first row only; use the union, in order of appearance.
    columns: dict[str, None] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, None)
    data = {key: [row.get(key) for row in rows] for key in columns}
    try:
        return datasets.Dataset.from_dict(data)
    except Exception as err:  # pyarrow: a column mixes types (e.g. a number in one row, text in another)
        raise DataError(f"could not build a table from {spec}: {first_line(err)}",
                        "give each column one type in every row (for example always a string)") from err


def _load_directory(spec: str, path: Path, split: str | None, config: str | None) -> "datasets.Dataset":
    import datasets

    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if saved:
        try:
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as err:  # noqa: BLE001 - damaged or foreign save_to_disk files: one line for the user
            raise DataError(f"could not load the save_to_disk directory {spec}: {first_line(err)}",
                            "save it again with dataset.save_to_disk(dir), or pass a .jsonl/.parquet file") from None
    if (path / "dataset_dict.json").is_file():
        return _pick_split(spec, loaded, split)
    if (path / "state.json").is_file():
        ds = loaded
        # a saved Dataset is one split: "train" always names it, and so does the split it was saved from
        if split not in (None, "train"):
            _check_single_split(spec, split, str(ds.split) if ds.split else "train")
        return ds
    # Any other folder: let `datasets` find data files in it (a cloned Hub repo, a folder of parquet files).
    try:
        loaded = datasets.load_dataset(str(path), config, split=None)
    except Exception as err:
        raise DataError(f"could not load dataset directory {spec}: {first_line(err)}",
                        "pass a .jsonl/.json/.parquet/.csv file, a save_to_disk directory or a Hub id") from None
    return _pick_split(spec, loaded, split)


def _pick_split(spec: str, dd: Any, split: str | None) -> "datasets.Dataset":
    names = list(dd.keys())
    if split is None:
        if len(names) == 1:
            return dd[names[0]]
        raise DataError(f"{spec} has several splits ({', '.join(names)}) and no split was chosen",
                        f"set split to one of: {', '.join(names)}")
    if split not in dd:
        raise DataError(f"split '{split}' not found in {spec}; available splits: {', '.join(names)}",
                        f"set split to one of: {', '.join(names)}")
    return dd[split]


def _check_single_split(spec: str, split: str | None, name: str) -> None:
    if split not in (None, name):
        raise DataError(f"split '{split}' not found in {spec}; it holds a single split, '{name}'",
                        f"set split to '{name}', or use a save_to_disk DatasetDict directory that has '{split}'")


def _load_hub(spec: str, split: str | None, config: str | None) -> "datasets.Dataset":
    import datasets

    try:
        loaded = datasets.load_dataset(spec, config, split=split)
    except Exception as err:  # DatasetNotFoundError, ConnectionError (offline), ValueError (unknown split/config)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set: only datasets already in the local cache load)" if offline else ""
        raise DataError(f"could not load dataset '{spec}' from the Hub{hint}: {first_line(err)}; "
                        f"no local file named '{spec}' exists either",
                        "check the id, config and split, or use a local file") from None
    if isinstance(loaded, datasets.DatasetDict):  # split=None
        return _pick_split(spec, loaded, None)
    return loaded


# ---------------------------------------------------------------------------------------------- format checks


def is_message_list(value: Any) -> bool:
    """True for a non-empty list of dicts that each have a string 'role' and a 'content'."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value))


def is_conversational(ds_or_row: Any) -> bool:
    """True if a row (or the first row of a dataset) holds its text as lists of messages (TRL's conversational)."""
    row = ds_or_row if isinstance(ds_or_row, dict) else (ds_or_row[0] if len(ds_or_row) else {})
    return any(is_message_list(row.get(key)) for key in ("messages", "prompt", "completion", "chosen", "rejected"))


def detect_sft_format(ds: "datasets.Dataset", name: str | None = None) -> str:
    """Return "messages", "prompt_completion" or "text", checking value types on the first rows.

    `name` (the dataset spec) only makes error messages clearer.
    """
    columns = ds.column_names
    if "messages" in columns:
        _check_rows(ds, name, ["messages"], "messages")
        return "messages"
    if "prompt" in columns and "completion" in columns:
        _check_rows(ds, name, ["prompt", "completion"], "either")
        return "prompt_completion"
    if "text" in columns:
        _check_rows(ds, name, ["text"], "string")
        return "text"
    hint = ""
    if "conversations" in columns:
        hint = " ('conversations' looks like ShareGPT: rename it to 'messages' with role/content keys)"
    raise DataError(f"{_name(name)}has columns [{', '.join(columns)}], which is no SFT format{hint}",
                    f"give it {_SFT_HELP}")


def detect_preference_format(ds: "datasets.Dataset", name: str | None = None) -> str:
    """Return "explicit" (prompt + chosen + rejected) or "implicit" (chosen + rejected)."""
    columns = ds.column_names
    if "chosen" not in columns or "rejected" not in columns:
        raise DataError(f"{_name(name)}has columns [{', '.join(columns)}], which is no preference format "
                        "(no 'chosen' and 'rejected' columns)", f"give it {_PREFERENCE_HELP}")
    if "prompt" in columns:
        _check_rows(ds, name, ["prompt", "chosen", "rejected"], "either")
        return "explicit"
    _check_rows(ds, name, ["chosen", "rejected"], "either")
    return "implicit"


def detect_prompt_column(ds: "datasets.Dataset", name: str | None = None) -> str:
    """Return the column that holds prompts for generation: "prompt", "messages" or "text" (first found)."""
    columns = ds.column_names
    for column in PROMPT_COLUMNS:
        if column in columns:
            _check_rows(ds, name, [column], {"prompt": "either", "messages": "messages", "text": "string"}[column])
            return column
    raise DataError(f"{_name(name)}has columns [{', '.join(columns)}] and no prompt column",
                    f"give it {_PROMPT_HELP}")


def _check_rows(ds: "datasets.Dataset", name: str | None, columns: list[str], kind: str) -> None:
    """Check every row: kind "string", "messages", or "either" (all columns strings, or all message lists).

    Every row, not a sample: a bad row 9,000 rows in would otherwise fail inside TRL after the stage began. Read in
    batches of columns (a row at a time is ~50x slower in `datasets`)."""
    for i, row in enumerate(_rows(ds, columns)):
        kinds = []
        for column in columns:
            value = row[column]
            if isinstance(value, str):
                kinds.append("string")
            elif is_message_list(value):
                kinds.append("messages")
            else:
                expected = {"string": "a string", "messages": "a list of {role, content}",
                            "either": "a string or a list of {role, content}"}[kind]
                raise DataError(f"row {i} of {_name(name)}has a {_describe_value(value)} in column "
                                f"'{column}', expected {expected}", f"give it {_help_for(columns)}")
            if kind != "either" and kinds[-1] != kind:
                found = "string" if kinds[-1] == "string" else "list of messages"
                raise DataError(f"row {i} of {_name(name)}has a {found} in column '{column}', "
                                f"expected {'a string' if kind == 'string' else 'a list of {role, content}'}",
                                f"give it {_help_for(columns)}")
        if kind == "either" and len(set(kinds)) > 1:
            mixed = ", ".join(f"'{c}' is {'a string' if k == 'string' else 'messages'}" for c, k in zip(columns, kinds))
            raise DataError(f"row {i} of {_name(name)}mixes plain text and messages ({mixed})",
                            "make these columns all strings or all lists of {role, content}")


def _rows(ds, columns: list[str], batch: int = 1024):
    """The rows of `ds` (only `columns`) as dicts, read a batch at a time."""
    if isinstance(ds, list):
        yield from ds
        return
    ds = ds.select_columns(columns)
    for start in range(0, len(ds), batch):
        part = ds[start:start + batch]
        for j in range(len(part[columns[0]])):
            yield {c: part[c][j] for c in columns}


def _help_for(columns: list[str]) -> str:
    if "chosen" in columns:
        return _PREFERENCE_HELP
    if columns == ["prompt"]:
        return _PROMPT_HELP
    return _SFT_HELP


# ------------------------------------------------------------------------------------------------ prompt rows


def to_prompt_messages(row: dict, column: str) -> list[dict]:
    """A prompt as chat messages, ready for `tokenizer.apply_chat_template(..., add_generation_prompt=True)`.

    A plain string becomes one user turn. A message list is copied with None-valued extra keys removed (Arrow adds
    them when rows differ); when the column is `messages`, a trailing assistant turn (the reference answer) is
    dropped so that the model writes its own.
    """
    value = row[column]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not is_message_list(value):
        raise DataError(f"column '{column}' holds a {_describe_value(value)}, not a prompt",
                        f"give it {_PROMPT_HELP}")
    messages = [{k: v for k, v in m.items() if v is not None or k in ("role", "content")} for m in value]
    if column == "messages" and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f"a row of column '{column}' has only an assistant turn, so there is no prompt",
                        "start each conversation with a user (or system) message")
    return messages


def prompt_text(row: dict, column: str) -> str:
    """The user's text of a prompt row (the last user turn), for reward functions and judges."""
    messages = to_prompt_messages(row, column)
    users = [m for m in messages if m["role"] == "user"] or messages
    return _content_text(users[-1]["content"])


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


# ---------------------------------------------------------------------------------------------- split, describe


def load_eval_split(spec: str, eval_split: str, config: str | None = None) -> "datasets.Dataset":
    """The held-out split `eval_split` of the dataset `spec` (--eval-split: e.g. a Hub dataset's `test`); a
    DataError that names eval_split when the dataset does not have it."""
    try:
        return load_any(spec, split=eval_split, config=config)
    except DataError as err:
        raise DataError(f"eval_split: {err.problem}", "name a split the dataset has (a single file or a saved "
                        "Dataset has only 'train': hold out a fraction of it with eval_fraction instead, and drop "
                        "eval_split)") from None


def split_eval(ds: "datasets.Dataset", fraction: float, seed: int,
               groups: list | None = None) -> tuple["datasets.Dataset", "datasets.Dataset | None"]:
    """Split off a random `fraction` of rows for evaluation; (ds, None) when fraction is 0.

    Deterministic for a given seed and dataset. At least one row goes to each side. Kept in memory, so no
    cache file is written next to the data. `groups` (one hashable key per row, e.g. the prompt of a preference
    pair) keeps rows of one group on one side: with several pairs per prompt, a random row split would hold out
    pairs whose prompt (and often whose answers) the model trained on, and the held-out accuracy would flatter
    it. Whole groups are held out, in a seeded random order, until `fraction` of the rows is reached. When every
    key is distinct this is the plain row split (the same rows as without `groups`).
    """
    if not fraction:
        return ds, None
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction must be between 0 and 1, got {fraction}",
                        "set eval_fraction to e.g. 0.05, or 0 for no evaluation split")
    n_eval = max(1, round(len(ds) * fraction))
    if n_eval >= len(ds):
        raise DataError(f"the dataset has {len(ds)} rows, too few to split off eval_fraction {fraction}",
                        "add rows, or set eval_fraction to 0")
    if groups is not None and len(set(groups)) < len(groups):
        return _split_groups(ds, groups, n_eval, fraction, seed)
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True, keep_in_memory=True)
    return parts["train"], parts["test"]


def _split_groups(ds, groups: list, n_eval: int, fraction: float, seed: int):
    import random

    members: dict = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    if len(members) < 2:
        raise DataError(f"all {len(ds)} rows share one prompt, so no prompt is left to hold out for eval_fraction "
                        f"{fraction}", "add rows with other prompts, or set eval_fraction to 0")
    keys = list(members)
    random.Random(seed).shuffle(keys)
    held: list[int] = []
    for key in keys[:-1]:  # at least one group trains
        if len(held) >= n_eval:
            break
        held += members[key]
    held_set = set(held)
    train = [i for i in range(len(ds)) if i not in held_set]
    return ds.select(train, keep_in_memory=True), ds.select(sorted(held), keep_in_memory=True)


_FORMAT_NAMES = {
    "messages": "conversational messages",
    "prompt_completion": "prompt-completion",
    "text": "plain text",
    "explicit": "preference pairs, explicit prompt",
    "implicit": "preference pairs, implicit prompt",
    "prompt": "prompts",
}


def describe(ds: "datasets.Dataset", fmt: str) -> str:
    """One line for the stage log, e.g. "412 rows, format: conversational messages"."""
    text = _FORMAT_NAMES.get(fmt, fmt)
    if fmt in ("prompt_completion", "explicit", "implicit", "prompt") and len(ds):
        text = ("conversational " if is_conversational(ds[0]) else "plain-text ") + text
    return f"{len(ds)} row{'s' if len(ds) != 1 else ''}, format: {text}"


# ----------------------------------------------------------------------------------------------------- helpers


def _name(name: str | None) -> str:
    return f"dataset {name} " if name else "the dataset "


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        if not value:
            return "empty list"
        if all(isinstance(m, dict) for m in value):
            return "list of objects without string 'role' and 'content' keys"
        return "list that is not a list of messages"
    return type(value).__name__
