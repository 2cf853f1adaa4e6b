"""The throughput figures the README quotes are measured ones: each is in a result file under
``bench/results/``, and each ratio of the README's table is its two tok/s figures divided."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _performance_section() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Performance\n")[1].split("\n## ")[0]


def _measured() -> set[str]:
    """Every number of the result files, as the README writes it: thousands with commas, GiB with one decimal."""
    found: set[str] = set()
    for path in (ROOT / "bench" / "results").iterdir():
        text = path.read_text(encoding="utf-8", errors="replace")
        found.update(re.findall(r"\d{1,3}(?:,\d{3})+", text))
        for number in re.findall(r"(?<![\d.,])\d+\.\d+|(?<![\d.,])\d{4,}", text):
            found.add(f"{round(float(number)):,}")
            found.add(f"{float(number):.1f}")
    return found


def test_every_tokens_per_second_and_peak_memory_figure_is_in_a_result_file() -> None:
    section = _performance_section()
    throughput = set(re.findall(r"(?<![\d.,])\d{1,3},\d{3}(?![\d,])", section)) - {"2,048"}  # 2,048: a chunk size
    peaks = set(re.findall(r"(\d+\.\d) → (\d+\.\d)", section))
    assert len(throughput) >= 10 and len(peaks) >= 4
    measured = _measured()
    missing = sorted(n for n in throughput | {gib for pair in peaks for gib in pair} if n not in measured)
    assert not missing, f"README.md quotes figures no file under bench/results/ holds: {missing}"


def test_each_ratio_of_the_table_is_its_figures_divided() -> None:
    rows = [line for line in _performance_section().splitlines() if re.match(r"^\| (fixed|instruction)", line)]
    assert len(rows) >= 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        baseline, kubetune = (float(re.match(r"[\d,]+", c).group().replace(",", "")) for c in cells[2:4])  # type: ignore[union-attr]
        ratio = re.match(r"([\d.]+)x", cells[4])
        assert ratio is not None, row
        decimals = len(ratio.group(1).split(".")[1])
        assert round(kubetune / baseline, decimals) == float(ratio.group(1)), row
