"""Small learnable data for the Techniques II tests: sentiment reviews a tiny model learns quickly.

Each review is six filler words with one cue word ("good", "awful", …) inserted at a random place;
the label follows the cue. A 2-layer, hidden-64 model learns it in a few dozen CPU steps, which
is what the transfer, distillation, adversarial, layer-selection, regularisation and
early-stopping tests need to see an effect. Not a fixture module: imported by those tests.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tests.techniques.conftest import write_jsonl

POSITIVE = ["good", "great", "love", "happy", "lovely", "nice"]
NEGATIVE = ["bad", "awful", "hate", "sad", "terrible", "boring"]
FILLER = "the a of is was it this that day night big small hot cold movie film book food".split()
LABELS = ["negative", "positive"]


def review_rows(n: int, seed: int, flip: bool = False) -> list[dict[str, Any]]:
    """``n`` reviews; ``flip`` gives every review the opposite label (an eval set training hurts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words = [rng.choice(FILLER) for _ in range(6)]
        words.insert(rng.randrange(7), cue)
        if flip:
            label = LABELS[1 - LABELS.index(label)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def review_files(folder: Path, n_train: int = 160, n_eval: int = 48, seed: int = 0, flip_eval: bool = False) -> dict[str, Any]:
    """Write train.jsonl/eval.jsonl under ``folder``; returns the ``spec.data`` block reading them."""
    write_jsonl(folder / "train.jsonl", review_rows(n_train, seed))
    write_jsonl(folder / "eval.jsonl", review_rows(n_eval, seed + 1000, flip=flip_eval))
    return {
        "datasets": [{"source": "train.jsonl", "format": "classification"}],
        "eval": {"datasets": [{"source": "eval.jsonl", "format": "classification"}]},
    }


CLASSIFY = {"type": "classification", "labels": LABELS}
