"""``python -m kubetune`` is the console script."""

from kubetune.cli import console

console()
