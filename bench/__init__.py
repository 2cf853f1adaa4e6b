"""Benchmarks (GPU trainer throughput); run from the repository root, e.g. ``python -m bench.throughput``.

On a GPU host where the project is not pip-installed, the folders are mapped onto the ``kubetune``
namespace here the way pyproject's ``package-dir`` does it, so ``kubetune.trainer`` imports from
``trainer/`` of this checkout.
"""

from pathlib import Path

try:
    import kubetune.trainer  # noqa: F401  (installed, e.g. `pip install -e .`)
except ImportError:
    import kubetune

    kubetune.__path__.append(str(Path(__file__).resolve().parent.parent))
