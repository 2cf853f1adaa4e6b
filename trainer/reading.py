"""Reading a dataset source into a list of raw rows (dicts), each remembering where it came from.

Called by the trainer's data preparation (``kubetune.trainer.encoding.load_examples``) for every
``spec.data.datasets[i]`` and ``spec.data.eval.datasets[i]``, and by technique plugins that read
extra data (replay, general text). Supported: ``.jsonl``/``.json``/``.csv``/``.parquet`` files, a
folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: ``split`` picks one), a
folder of such files, and ``hf://org/name`` (``datasets.load_dataset`` with ``split``).

A row that is not a JSON object, a file that cannot be parsed, or an empty dataset raises
:class:`DataError` with the file and the (1-based) row, so a user can open the file and look.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.trainer.sources import SourceError, hub_token, is_hub, parse_hub, resolve_path

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Bad data: the message names the file, the row and the field."""


@dataclass
class Row:
    """One raw row and where it came from (for error messages)."""

    values: dict[str, Any]
    origin: str  # file or dataset name
    number: int  # 1-based row number

    def where(self, field: str | None = None) -> str:
        at = f"{self.origin}: row {self.number}"
        return f"{at}, field {field!r}" if field else at


def read_rows(
    source: str,
    *,
    base_dir: str | os.PathLike | None,
    where: str,
    split: str = "train",
    max_samples: int | None = None,
) -> list[Row]:
    """All rows of ``source`` (at most ``max_samples``); ``where`` is the spec path for errors."""
    if is_hub(source):
        rows = _read_hub(source, split, where)
    else:
        path = resolve_path(source, base_dir, where)
        if not path.exists():
            raise SourceError(f"{where}: {path} does not exist (from {source!r})")
        rows = _read_path(path, split, where)
    if not rows:
        raise DataError(f"{where}: {source!r} holds no rows")
    return rows[:max_samples] if max_samples else rows


def _read_path(path: Path, split: str, where: str) -> list[Row]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _read_saved(path, split, where)
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{where}: folder {path} holds no {'/'.join(FILE_SUFFIXES)} files and no saved dataset")
        return [row for f in files for row in _read_file(f, where)]
    return _read_file(path, where)


def _read_file(path: Path, where: str) -> list[Row]:
    suffix = path.suffix.lower()
    name = str(path)
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{name}: row {number}: invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
                rows.append(_row(value, name, number))
        return rows
    if suffix == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
        if isinstance(value, dict) and "data" in value and isinstance(value["data"], list):
            value = value["data"]
        if not isinstance(value, list):
            raise DataError(f"{name}: a .json dataset must be a list of objects (or {{\"data\": [...]}}), got {type(value).__name__}")
        return [_row(v, name, i) for i, v in enumerate(value, start=1)]
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            # Row 1 is the header, so data rows are numbered from 2 as in a spreadsheet.
            return [Row(dict(r), name, i) for i, r in enumerate(csv.DictReader(handle), start=2)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return [Row(r, name, i) for i, r in enumerate(table.to_pylist(), start=1)]
    raise DataError(f"{where}: {name}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _row(value: Any, name: str, number: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{name}: row {number}: must be a JSON object, got {type(value).__name__}")
    return Row(value, name, number)


def _read_saved(path: Path, split: str, where: str) -> list[Row]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{where}: saved dataset {path} has splits {sorted(loaded)}, not {split!r}; set split")
        loaded = loaded[split]
    return [Row(r, f"{path}[{split}]", i) for i, r in enumerate(loaded, start=1)]


def _read_hub(source: str, split: str, where: str) -> list[Row]:
    import datasets

    ref = parse_hub(source)
    try:
        loaded = datasets.load_dataset(ref.repo_id, split=split, revision=ref.revision, token=hub_token())
    except Exception as exc:
        raise SourceError(f"{where}: cannot load {source!r} split {split!r} ({type(exc).__name__}: {exc})") from exc
    return [Row(r, f"{source}[{split}]", i) for i, r in enumerate(loaded, start=1)]
