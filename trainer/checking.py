"""Checking the data a manifest names before anything trains, for ``kubetune validate``.

The model folder (when on this machine) must hold a model, and every dataset of the spec whose
source is on this machine (a path, or ``pkg://``) is read and
turned into examples by the very code the trainer uses (:mod:`kubetune.trainer.reading`,
:mod:`kubetune.trainer.encoding`), so a missing file, a malformed row or a missing column fails
validation with the field path, the file and the row. Sources only the cluster (or the network)
can read — ``hf://``, ``s3://``, ``pvc://`` — are left to the trainer. Only the standard library
and the readers are imported: the operator image, which has no torch, runs this too.
"""

from __future__ import annotations

import os
from typing import Any

from kubetune.trainer.encoding import canonical_example, dataset_name
from kubetune.trainer.reading import DataError, read_rows
from kubetune.trainer.sources import SourceError, check_model_folder, resolve_path

NOT_CHECKED_HERE = ("hf://", "s3://", "pvc://")


def is_checkable(source: str) -> bool:
    """Whether ``source`` can be read on this machine without a cluster or the network."""
    return not source.startswith(NOT_CHECKED_HERE)


def check_data(spec: Any, base_dir: str | os.PathLike[str] | None) -> list[str]:
    """One line per dataset that cannot be read as the trainer will read it ([] when all can)."""
    problems = _model_problems(spec, base_dir)
    groups = [("spec.data.datasets", spec.data.datasets)]
    if spec.data.eval is not None and spec.data.eval.datasets:
        groups.append(("spec.data.eval.datasets", spec.data.eval.datasets))
    for field, datasets in groups:
        for i, ds in enumerate(datasets):
            if not is_checkable(ds.source):
                continue
            where = f"{field}[{i}]"
            name = dataset_name(ds, i)
            try:
                rows = read_rows(ds.source, base_dir=base_dir, where=f"{where}.source", split=ds.split,
                                 max_samples=ds.max_samples)
                for row in rows:
                    canonical_example(row, ds, name, ds.task or name)
            except (DataError, SourceError) as exc:
                # A bad row names its file and row; the line also names the dataset's field path.
                message = str(exc)
                problems.append(message if message.startswith(where) else f"{where}.source: {message}")
    return problems


def _model_problems(spec: Any, base_dir: str | os.PathLike[str] | None) -> list[str]:
    """The model source, when on this machine: it exists and is a model folder (config.json)."""
    source = spec.model.source
    if not is_checkable(source):
        return []
    try:
        check_model_folder(resolve_path(source, base_dir, "spec.model.source"), source)
    except SourceError as exc:
        return [str(exc)]
    return []

