"""Type checks of the run.json manifest's stage entries: a hand-edited or damaged run.json is refused with the
field named (see RunDir.manifest), instead of an AttributeError deep inside status, export or a stage.
No imports from rlchat.
"""
from __future__ import annotations

import json

# The type every field of a manifest stage entry must have (None is always allowed but for status): a hand-edited
# run.json is refused with the field named, instead of an AttributeError deep inside status, export or a stage.
ENTRY_TYPES = {"status": (str,), "config": (dict,), "inputs": (dict,), "parent": (str,), "outputs": (dict,),
                "metrics": (dict,), "versions": (dict,), "started": (str,), "ended": (str,),
                "wall_s": (int, float), "error": (str,), "host": (str,), "pid": (int,), "resumed": (bool,)}


PATH_OUTPUTS = ("kind", "adapter", "model", "tokenizer", "policy", "value", "base", "report", "responses")


def entry_problem(stages: dict) -> str | None:
    """What is wrong with the manifest's stage entries (the first problem), or None."""
    for stage, entry in stages.items():
        if not isinstance(entry, dict):
            return f"the entry of stage '{stage}' is a {type(entry).__name__}, not an object"
        for key, types in ENTRY_TYPES.items():
            v = entry.get(key)
            if v is None or (isinstance(v, types) and not (isinstance(v, bool) and bool not in types)):
                continue
            want = {"wall_s": "a number", "pid": "an integer", "resumed": "true or false"}.get(
                key, "a string" if str in types else "an object")
            return f"stage '{stage}' field '{key}' is {json.dumps(v)[:40]}, not {want}"
        outputs = entry.get("outputs") or {}
        for k in PATH_OUTPUTS:
            v = outputs.get(k)
            if v is not None and not isinstance(v, str):
                return f"stage '{stage}' output '{k}' is {json.dumps(v)[:40]}, not a path"
    return None
