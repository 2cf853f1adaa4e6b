"""``helm lint --strict`` finds nothing to say about the chart, with the defaults and the matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import kubetune
from tests.chart.conftest import CHART, run_helm
from tests.chart.test_rendering import MATRIX


@pytest.mark.parametrize("values", MATRIX.values(), ids=MATRIX.keys())
def test_helm_lint_is_clean(helm: Path, tmp_path: Path, values: dict[str, Any]) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), values=values, tmp=tmp_path)
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    noise = [line for line in out.splitlines() if line.startswith("[")]
    assert noise == [], noise


def test_chart_and_images_follow_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == kubetune.__version__
    assert chart["version"] == kubetune.__version__
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # Empty tags mean the appVersion (tests/chart/test_rendering.py checks the rendered images).
    assert values["operator"]["image"]["tag"] in ("", kubetune.__version__)
    assert values["trainer"]["image"]["tag"] in ("", kubetune.__version__)


def test_default_trainer_image_is_the_operators_default() -> None:
    """Without the chart (``kubetune operator`` on a laptop) pods get the same image as with it."""
    from kubetune.operator.settings import DEFAULT_TRAINER_IMAGE

    values = yaml.safe_load((CHART / "values.yaml").read_text())["trainer"]["image"]
    assert DEFAULT_TRAINER_IMAGE == f"{values['repository']}:{values['tag'] or kubetune.__version__}"
