"""rlchat.data: every loader path, every DataError, the TRL format detectors and the prompt helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlchat import data  # noqa: E402
from rlchat.errors import DataError  # noqa: E402

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ds_of(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------------- loading


def test_import_is_cheap():
    code = "import sys, rlchat.data, rlchat.models; print(sorted(m for m in ('torch', 'datasets', 'transformers', " \
           "'peft', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_jsonl_blank_lines_and_union_of_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n  \n{"prompt": "c", "completion": "d", "extra": 1}\n')
    ds = data.load_any(str(path))
    assert len(ds) == 2
    assert ds.column_names == ["prompt", "completion", "extra"]
    assert ds[0]["extra"] is None and ds[1]["extra"] == 1


def test_load_json_list_dict_and_lines(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    write_jsonl(tmp_path / "lines.json", ROWS)
    (tmp_path / "columns.json").write_text(json.dumps({k: [r[k] for r in ROWS] for k in ("prompt", "completion")}))
    for name in ("list.json", "wrapped.json", "lines.json", "columns.json"):
        ds = data.load_any(str(tmp_path / name))
        assert len(ds) == 10 and ds[3] == {"prompt": "q3", "completion": "a3"}, name


def test_load_parquet_and_csv(tmp_path):
    ds = ds_of(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        loaded = data.load_any(str(tmp_path / name))
        assert loaded.to_list() == ROWS, name


def test_load_save_to_disk_dataset_and_datasetdict(tmp_path):
    import datasets

    ds_of(ROWS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds_of(ROWS), "test": ds_of(ROWS[:3])}).save_to_disk(str(tmp_path / "dict"))
    assert len(data.load_any(str(tmp_path / "one"))) == 10
    with pytest.raises(DataError, match="it holds a single split, 'train'"):
        data.load_any(str(tmp_path / "one"), split="test")
    assert len(data.load_any(str(tmp_path / "dict"), split="test")) == 3
    assert len(data.load_any(str(tmp_path / "dict"))) == 10  # default split "train"
    before = sorted(p.name for p in (tmp_path / "dict" / "test").iterdir())
    ds = data.load_any(str(tmp_path / "dict"), split="test").map(lambda r: {"n": len(r["prompt"])})
    assert ds[0]["n"] == 2
    assert sorted(p.name for p in (tmp_path / "dict" / "test").iterdir()) == before  # no cache files written


def test_unknown_split_lists_available(tmp_path):
    import datasets

    datasets.DatasetDict({"train": ds_of(ROWS), "test": ds_of(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"split 'valid' not found .*available splits: train, test"):
        data.load_any(str(tmp_path / "dict"), split="valid")
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"split 'test' not found in .*d.jsonl; it holds a single split, 'train'"):
        data.load_any(path, split="test")
    assert len(data.load_any(path, split=None)) == 10


@pytest.mark.parametrize("spec", ["missing.jsonl", "./data/x", "data/sub/file", "~/nope.csv", "dir/name.parquet"])
def test_missing_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"dataset file not found: {spec}"):
        data.load_any(spec)


def test_hub_error_is_wrapped_offline():
    with pytest.raises(DataError) as info:
        data.load_any("no-such-org/no-such-dataset")
    msg = str(info.value)
    assert msg.startswith("could not load dataset 'no-such-org/no-such-dataset' from the Hub")
    assert "Fix: check the id" in msg and "\n" not in msg


def test_empty_dataset(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "e.csv").write_text("prompt,completion\n")
    for name in ("e.jsonl", "e.csv"):
        with pytest.raises(DataError, match="has no rows"):
            data.load_any(str(tmp_path / name))


def test_malformed_jsonl_line_is_reported_by_number(tmp_path):
    lines = [json.dumps(r) for r in ROWS[:6]] + ['{"prompt": "x", "completion": }'] + [json.dumps(ROWS[0])]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        data.load_any(str(tmp_path / "bad.jsonl"))
    assert str(info.value).startswith(f"line 7 of {tmp_path / 'bad.jsonl'} is not valid JSON: Expecting value")


def test_json_file_errors_and_single_object(tmp_path):
    (tmp_path / "broken.json").write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=r"broken.json is not valid JSON: Expecting value \(line 3, column 12\)"):
        data.load_any(str(tmp_path / "broken.json"))
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="item 0 of .*nums.json is a JSON number, not an object"):
        data.load_any(str(tmp_path / "nums.json"))
    (tmp_path / "one.json").write_text(json.dumps({"prompt": "q", "completion": "a"}, indent=2))
    assert data.load_any(str(tmp_path / "one.json")).to_list() == [{"prompt": "q", "completion": "a"}]


def test_jsonl_line_that_is_not_an_object(tmp_path):
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 2 of .*list.jsonl is a JSON list, not an object"):
        data.load_any(str(tmp_path / "list.jsonl"))


def test_mixed_types_in_a_column(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"text": 3}])
    with pytest.raises(DataError, match="could not build a table from .*mixed.jsonl"):
        data.load_any(path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported dataset file type '.txt'.*Fix: use one of .jsonl, .json, "):
        data.load_any(str(tmp_path / "d.txt"))


def test_looks_like_path():
    assert not data.looks_like_path("trl-lib/tldr")
    assert not data.looks_like_path("imdb")
    for spec in ("./x", "../x", "/abs", "~/x", "a/b/c", "x.jsonl", "org/x.csv", "has space"):
        assert data.looks_like_path(spec), spec


# ----------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("rows, fmt", [
    ([{"messages": CHAT}], "messages"),
    ([{"prompt": "q", "completion": "a"}], "prompt_completion"),
    ([{"prompt": CHAT[:1], "completion": CHAT[1:]}], "prompt_completion"),
    ([{"text": "hello world"}], "text"),
])
def test_detect_sft_format(rows, fmt):
    assert data.detect_sft_format(ds_of(rows)) == fmt


def test_detect_sft_format_errors():
    with pytest.raises(DataError, match=r"has columns \[question, answer\], which is no SFT format.*'messages'"):
        data.detect_sft_format(ds_of([{"question": "q", "answer": "a"}]), name="qa.jsonl")
    with pytest.raises(DataError, match=r"row 0 .*has a string in column 'messages', expected a list of \{role"):
        data.detect_sft_format(ds_of([{"messages": "just text"}]))
    with pytest.raises(DataError, match="list of objects without string 'role' and 'content'"):
        data.detect_sft_format(ds_of([{"messages": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(DataError, match="mixes plain text and messages"):
        data.detect_sft_format(ds_of([{"prompt": CHAT[:1], "completion": "a"}]))
    with pytest.raises(DataError, match="ShareGPT"):
        data.detect_sft_format(ds_of([{"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(DataError, match="has a list of messages in column 'text', expected a string"):
        data.detect_sft_format(ds_of([{"text": CHAT}]))


@pytest.mark.parametrize("row, fmt, conversational", [
    ({"prompt": "q", "chosen": "good", "rejected": "bad"}, "explicit", False),
    ({"chosen": "q good", "rejected": "q bad"}, "implicit", False),
    ({"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": [{"role": "assistant", "content": "no"}]}, "explicit", True),
    ({"chosen": CHAT, "rejected": CHAT}, "implicit", True),
])
def test_detect_preference_format(row, fmt, conversational):
    ds = ds_of([row])
    assert data.detect_preference_format(ds) == fmt
    assert data.is_conversational(ds) is conversational


def test_detect_preference_format_errors():
    with pytest.raises(DataError, match=r"columns \[prompt, completion\], which is no preference format"):
        data.detect_preference_format(ds_of([{"prompt": "q", "completion": "a"}]))
    with pytest.raises(DataError, match="mixes plain text and messages"):
        data.detect_preference_format(ds_of([{"prompt": "q", "chosen": CHAT[1:], "rejected": CHAT[1:]}]))


@pytest.mark.parametrize("row, column", [
    ({"prompt": "q", "completion": "a"}, "prompt"),
    ({"messages": CHAT, "text": "x"}, "messages"),
    ({"text": "q"}, "text"),
])
def test_detect_prompt_column(row, column):
    assert data.detect_prompt_column(ds_of([row])) == column


def test_detect_prompt_column_error():
    with pytest.raises(DataError, match=r"columns \[question\] and no prompt column"):
        data.detect_prompt_column(ds_of([{"question": "q"}]))


def test_to_prompt_messages_and_prompt_text():
    assert data.to_prompt_messages({"prompt": "2+2?"}, "prompt") == [{"role": "user", "content": "2+2?"}]
    assert data.to_prompt_messages({"messages": CHAT}, "messages") == CHAT[:1]  # reference answer dropped
    system = [{"role": "system", "content": "be brief"}] + CHAT
    assert data.to_prompt_messages({"prompt": system}, "prompt") == system  # a prompt column keeps its turns
    # None-valued keys added by Arrow when rows differ are dropped
    rows = ds_of([{"messages": [{"role": "user", "content": "a", "name": None}]},
                 {"messages": [{"role": "user", "content": "b", "name": "bob"}]}])
    assert data.to_prompt_messages(rows[0], "messages") == [{"role": "user", "content": "a"}]
    assert data.prompt_text({"messages": system}, "messages") == "hi"
    assert data.prompt_text({"text": "plain"}, "text") == "plain"
    with pytest.raises(DataError, match="only an assistant turn"):
        data.to_prompt_messages({"messages": CHAT[1:]}, "messages")
    with pytest.raises(DataError, match="holds a int, not a prompt"):
        data.to_prompt_messages({"prompt": 3}, "prompt")


# ---------------------------------------------------------------------------------------------- split, describe


def test_split_eval_is_deterministic_and_disjoint():
    ds = ds_of([{"text": str(i)} for i in range(100)])
    train, evals = data.split_eval(ds, 0.1, seed=3)
    assert len(train) == 90 and len(evals) == 10
    assert not set(train["text"]) & set(evals["text"])
    assert data.split_eval(ds, 0.1, seed=3)[1]["text"] == evals["text"]
    assert data.split_eval(ds, 0.1, seed=4)[1]["text"] != evals["text"]
    assert data.split_eval(ds, 0.0, seed=3) == (ds, None)
    assert len(data.split_eval(ds_of(ROWS), 0.01, seed=0)[1]) == 1  # at least one eval row
    with pytest.raises(DataError, match="too few to split off"):
        data.split_eval(ds_of(ROWS[:1]), 0.5, seed=0)
    with pytest.raises(DataError, match="between 0 and 1"):
        data.split_eval(ds, 1.5, seed=0)


def test_describe():
    assert data.describe(ds_of([{"messages": CHAT}] * 412), "messages") == "412 rows, format: conversational messages"
    assert data.describe(ds_of(ROWS[:1]), "prompt_completion") == "1 row, format: plain-text prompt-completion"
    pairs = ds_of([{"chosen": CHAT, "rejected": CHAT}])
    assert data.describe(pairs, "implicit") == "1 row, format: conversational preference pairs, implicit prompt"
