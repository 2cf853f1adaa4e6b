"""``python -m kubetune`` is the console script."""

import sys

from kubetune.cli import main

sys.exit(main())
