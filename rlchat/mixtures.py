"""Dataset mixtures: a spec of several datasets, `a.jsonl,b.jsonl` (all rows of each, concatenated) or
`a.jsonl:0.3,b.jsonl:0.7` (each input's share of the mixture, as TRL's dataset_mixture `fraction`).

parse_mixture splits a spec into its inputs (one input for a plain dataset); load_mixture loads each input with
rlchat.data.load_any and concatenates them (the columns all inputs share; weighted inputs as a seeded subset).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rlchat.errors import DataError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import datasets

# Rows a weighted mixture draws from each input are a seeded random subset, fixed by the spec (not by --seed), so
# the same spec always means the same rows (the manifest records the spec and every input's hash).
MIXTURE_SEED = 0


def parse_mixture(spec: str) -> list[tuple[str, float | None]]:
    """The inputs of a dataset spec: [(spec, None)] for one dataset; for a mixture `a.jsonl,b.jsonl` (all rows of
    each, concatenated) or `a.jsonl:0.3,b.jsonl:0.7` (weights: each input's share of the mixture, as TRL's
    dataset_mixture `fraction`), one (spec, weight or None) per input. ValueError says what is wrong."""
    spec = str(spec)
    if "," not in spec or Path(spec).expanduser().exists():
        return [(spec, None)]
    parts = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            raise ValueError("a mixture lists datasets separated by commas, with no empty entries")
        name, sep, tail = raw.rpartition(":")
        weight = None
        if sep and name and not Path(raw).expanduser().exists():
            try:
                weight = float(tail)
            except ValueError:
                name = raw  # a ':' that is part of the name
            else:
                if not weight > 0 or weight != weight or weight == float("inf"):
                    raise ValueError(f"the weight of {name} must be a number > 0, got {tail}")
        parts.append((name if weight is not None else raw, weight))
    weighted = [w is not None for _, w in parts]
    if any(weighted) and not all(weighted):
        raise ValueError("give a weight to every dataset of the mixture (a.jsonl:0.3,b.jsonl:0.7) or to none "
                         "(all rows of each)")
    names = [n for n, _ in parts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"{dup} is listed twice")
    return parts

def load_mixture(spec: str, parts: list[tuple[str, float | None]], split: str | None,
                  config: str | None) -> "datasets.Dataset":
    """The inputs of a mixture concatenated: all rows of each, or (weights) each input's share of the mixture, as
    large as it can be without repeating rows (the input with the fewest rows per unit of weight is used whole)."""
    import datasets

    from rlchat.data import load_any

    loaded = [load_any(name, split=split, config=config) for name, _ in parts]
    common = set(loaded[0].column_names).intersection(*[set(d.column_names) for d in loaded[1:]])
    if not common:
        listing = "; ".join(f"{name} has {', '.join(d.column_names)}" for (name, _), d in zip(parts, loaded))
        raise DataError(f"the datasets of mixture {spec!r} share no column ({listing})",
                        "mix datasets of the same format")
    # keep the columns every input has (an extra `id` column in one file must not stop the mixture), in the
    # first input's order
    loaded = [d.select_columns([c for c in loaded[0].column_names if c in common]) for d in loaded]
    if parts[0][1] is not None:
        weights = [w / sum(w for _, w in parts) for _, w in parts]
        total = min(len(d) / w for d, w in zip(loaded, weights))
        loaded = [d.shuffle(seed=MIXTURE_SEED, keep_in_memory=True).select(range(max(1, round(w * total))))
                  for d, w in zip(loaded, weights)]
    try:
        return datasets.concatenate_datasets(loaded)
    except ValueError as err:  # the same column with different types (a string in one, messages in another)
        raise DataError(f"the datasets of mixture {spec!r} do not fit together: {first_line(err)[:300]}",
                        "mix datasets of the same format (the same columns with the same kinds of values)"
                        ) from None
