"""What a trainer process loads at start-up: only what its run needs (every pod and every local rank pays it).

* ``kubetune train --nproc N`` reads the latest checkpoint's state before it starts torchrun; that
  parent process imports no torch (about 2 s of CPU);
* a trainer process imports torchmetrics (and the scipy it brings) when the run first evaluates,
  and seqeval (scikit-learn) when an entity F1 is first counted: runs without an eval split, and
  runs that tag no tokens, never load them (about 1-2 s of CPU per process).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.trainer.conftest import REPO


def _loaded(code: str, modules: list[str]) -> list[str]:
    # Ends without the interpreter's teardown of the torch it loaded (~1 s; nothing to check in it).
    script = (f"import json, os, sys\n{code}\nprint(json.dumps([m for m in {modules!r} if m in sys.modules]), flush=True)\n"
              "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


def test_the_multi_process_launcher_reads_checkpoints_without_torch(tmp_path) -> None:
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / "trainer.json").write_text(json.dumps({"step": 3}))
    code = (
        "import kubetune.trainer.local, kubetune.trainer.fingerprinting, kubetune.trainer.techniques.base\n"
        "from kubetune.trainer import checkpoints\n"
        f"latest = checkpoints.find_latest(__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "assert checkpoints.read_state(latest)['step'] == 3, latest\n"
    )
    assert _loaded(code, ["torch", "transformers", "deepspeed"]) == []


def test_the_training_loop_loads_metrics_only_when_it_evaluates() -> None:
    code = "import kubetune.trainer.training\nassert 'torch' in sys.modules\n"
    assert _loaded(code, ["torchmetrics", "seqeval", "sklearn"]) == []
    code = "import kubetune.trainer.evaluating\n"
    assert _loaded(code, ["torchmetrics", "seqeval", "sklearn"]) == ["torchmetrics"]
    code = "from kubetune.trainer.evaluating import EntityF1\nm = EntityF1()\nm.update([['B-PER', 'O']], [['B-PER', 'O']])\nassert float(m.compute()) == 1.0\n"
    assert _loaded(code, ["seqeval"]) == ["seqeval"]
