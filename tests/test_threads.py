"""The suite's torch runs with the thread count the root conftest sets (one, unless given).

``tests/conftest.py`` sets ``OMP_NUM_THREADS`` before any test module imports torch; torch reads it
once, when it is first imported. Were torch imported earlier (a plugin, or a conftest imported
before the root one), every in-process training run of the session would get both cores' threads
again, and on these tiny models that costs 3-4x the CPU seconds (see the root conftest).
"""

from __future__ import annotations

import os


def test_torch_uses_the_thread_count_the_session_set() -> None:
    import torch

    given = os.environ.get("OMP_NUM_THREADS")
    assert given, "tests/conftest.py sets OMP_NUM_THREADS for the session"
    assert torch.get_num_threads() == int(given), (
        "torch was imported before tests/conftest.py set OMP_NUM_THREADS"
    )
