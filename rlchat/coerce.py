"""Values from a recipe (YAML) or the command line (strings) converted to a config field's type.

    coerce("1e-4", float) == 0.0001;  coerce("none", float | None) is None;  coerce("q_proj, v_proj", list[str])
    == ["q_proj", "v_proj"]  (the one place a comma-separated list is split);  coerce("x", int) raises BadValue

Used by rlchat/config.py::resolve. Importing it is cheap (standard library only).
"""
from __future__ import annotations

import math
import os
import types
import typing

NULL_WORDS = ("none", "null", "~")  # a string that means None for an Optional field (e.g. `--target-kl none`)


class BadValue(Exception):
    """The value cannot be read as the field's type; `expected` says what was wanted ("an integer")."""

    def __init__(self, expected: str):
        self.expected = expected


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _to_bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise BadValue("true or false")


def _to_int(v):
    if isinstance(v, bool):
        raise BadValue("an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        return int(v.strip())  # exact, however long (config validation bounds it)
    try:
        x = float(v.strip()) if isinstance(v, str) else float(v) if isinstance(v, float) else None
    except ValueError:
        x = None
    if x is not None and math.isfinite(x) and x.is_integer():
        return int(x)
    raise BadValue("an integer")


def _to_float(v):
    if isinstance(v, bool):
        raise BadValue("a number")
    x = None
    if isinstance(v, (int, float)):
        try:
            x = float(v)
        except OverflowError:  # an int too large for a float
            x = math.inf
    elif isinstance(v, str):
        try:
            x = float(v.strip())  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    # inf and nan are never a setting: `--epochs inf` overflowed inside the Trainer, `--lr inf` trained to NaN
    if x is None:
        raise BadValue("a number")
    if not math.isfinite(x):
        raise BadValue("a finite number")
    return x


def _to_str(v):
    if isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)  # e.g. `dataset_config: 2023` read by YAML as an int
    raise BadValue("a string")


def _to_str_list(v):
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (list, tuple)):
        try:
            return [_to_str(x) for x in v]
        except BadValue:
            pass
    raise BadValue("a list of strings")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def coerce(v, tp):
    """`v` (from YAML or a command-line string) converted to the field type `tp`; BadValue if it can't be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if optional and (v is None or (isinstance(v, str) and v.strip().lower() in NULL_WORDS)):
            return None
        if len(rest) == 1:
            try:
                return coerce(v, rest[0])
            except BadValue as bad:
                raise BadValue(bad.expected + (" or null" if optional else "")) from None
        if set(rest) == {str, list[str]}:  # lora_target_modules: a name, several names, or "re:<regex>"
            if isinstance(v, str) and ("," not in v or v.startswith("re:")):
                return v
            try:
                return _to_str_list(v)
            except BadValue:
                raise BadValue("a string or a list of strings") from None
        raise AssertionError(f"unsupported config type {tp}")
    if origin is list and args == (str,):
        return _to_str_list(v)
    if tp in _SCALARS:
        if v is None:
            raise BadValue({bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp])
        return _SCALARS[tp](v)
    raise AssertionError(f"unsupported config type {tp}")
