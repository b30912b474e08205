"""Data from the Hugging Face Hub (`hf:NAME[:CONFIG][@SPLIT]`) and from folders written by `datasets.save_to_disk`.

Rows come back as plain dicts with row numbers, so `intentlora.data` checks
them as it checks a file's lines and every message says SPEC:ROW. Class-label
integers become their names; a source that cannot be read at all (no such
dataset or split, a missing field) is one problem that names what it has.
"""

from __future__ import annotations

from typing import NamedTuple

from pathlib import Path

HUB_PREFIX = "hf:"


def is_dataset_spec(spec: str) -> bool:
    """True for hf:NAME[:CONFIG][@SPLIT], and for a `save_to_disk` folder (FOLDER or FOLDER@SPLIT)."""
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        return True
    folder, _ = split_spec(spec)
    return is_saved_dataset(Path(folder))


def split_spec(spec: str) -> tuple[str, str | None]:
    """("hf:NAME[:CONFIG]" or FOLDER, SPLIT or None)."""
    source, at, split = spec.rpartition("@")
    if not at or not split or "/" in split or (not spec.startswith(HUB_PREFIX) and not Path(source).is_dir()):
        return spec, None
    return source, split


def is_saved_dataset(folder: Path) -> bool:
    """A Dataset (state.json) or a DatasetDict (dataset_dict.json) written by save_to_disk."""
    return folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file())


def read_rows(spec: str, text_field: str, label_field: str) -> tuple[list[tuple[int, dict]], list]:
    """([(row number from 1, {text_field: str, label_field: str})], whole-source problems)."""
    source, split = split_spec(str(spec))
    try:
        loaded = load(source)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; each is one problem for the source
        return [], [Problem(spec, f"cannot load the dataset: {type(err).__name__}: {err}")]
    dataset, problem = pick_split(loaded, split, spec)
    if problem:
        return [], [problem]
    missing = [name for name in (text_field, label_field) if name not in dataset.column_names]
    if missing:
        fields = ", ".join(repr(name) for name in missing)
        return [], [Problem(spec, f"no field {fields} (it has: {', '.join(dataset.column_names)}); name yours with --text-field / --label-field")]
    columns = dataset.select_columns([text_field, label_field]).to_dict()
    names = {field: class_names(dataset.features[field]) for field in (text_field, label_field)}
    rows = [
        (i, {field: as_text(columns[field][i - 1], names[field]) for field in (text_field, label_field)})
        for i in range(1, len(dataset) + 1)
    ]
    return rows, []


class Problem(NamedTuple):
    """A whole-source problem; intentlora.data turns it into its own Problem (data imports this module, not the reverse)."""

    where: str
    message: str


def load(source: str):
    """datasets.load_dataset for hf:NAME[:CONFIG] (every split), load_from_disk for a folder."""
    import datasets

    if source.startswith(HUB_PREFIX):
        name, _, config = source.removeprefix(HUB_PREFIX).partition(":")
        return datasets.load_dataset(name, config or None)
    return datasets.load_from_disk(source)


def pick_split(loaded, split: str | None, spec: str):
    """(the Dataset to read, None) or (None, the problem): a DatasetDict needs a split unless it has only one."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split:
            return None, Problem(spec, f"@{split}: this dataset has no splits (it is a single Dataset); drop @{split}")
        return loaded, None
    splits = list(loaded.keys())
    if split is None:
        if len(splits) == 1:
            return loaded[splits[0]], None
        return None, Problem(spec, f"the dataset has several splits ({', '.join(splits)}): name one, e.g. {spec}@{splits[0]}")
    if split not in loaded:
        return None, Problem(spec, f"no split {split!r} (it has: {', '.join(splits)})")
    return loaded[split], None


def class_names(feature) -> list[str] | None:
    """The names of a ClassLabel column, else None."""
    import datasets

    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def as_text(value, names: list[str] | None):
    """Class-label ids -> names (-1, "no label", -> None); integer labels -> their digits; anything else as is, for the row checks to judge."""
    if names is not None and isinstance(value, int):
        return names[value] if 0 <= value < len(names) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value
