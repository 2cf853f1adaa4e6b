"""A finished trainer process ends without the interpreter's teardown, and loses nothing by it.

``kubetune.trainer.exiting.end_process`` is the last call of the workers, the launcher and
``kubetune train``: each check here runs a small script in a fresh interpreter and reads what it
left behind. An object's ``__del__`` that prints at teardown tells whether the teardown ran.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.trainer.conftest import trainer_env

PRELUDE = """
import atexit, logging, sys
from kubetune.trainer.exiting import end_process

class Torn:
    def __del__(self):
        sys.__stdout__.write("teardown ran\\n")
        sys.__stdout__.flush()

torn = Torn()  # freed only when the interpreter tears its modules down
atexit.register(lambda: print("atexit ran", flush=True))
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.getLogger("t").info("logged before the exit")
sys.stdout.write("buffered, no newline")  # still in the buffer when end_process is called
"""


def _run(body: str, tmp_path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), str(tmp_path / "log.txt")], capture_output=True, text=True,
                          env=trainer_env(), timeout=120)


def test_end_process_keeps_the_code_output_atexit_and_logs_and_skips_only_the_teardown(tmp_path):
    proc = _run("end_process(143)\n", tmp_path)
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout.startswith("buffered, no newline")  # flushed
    assert "atexit ran" in proc.stdout
    assert "logged before the exit" in (tmp_path / "log.txt").read_text()
    assert "teardown ran" not in proc.stdout

    ordinary = _run("sys.exit(143)\n", tmp_path)  # the same script exiting as usual tears down
    assert ordinary.returncode == 143 and "teardown ran" in ordinary.stdout


def test_a_live_non_daemon_thread_gets_the_ordinary_exit_that_waits_for_it(tmp_path):
    proc = _run("""
        import threading, time
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
        end_process(2)
    """, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "thread finished" in proc.stdout and "atexit ran" in proc.stdout
    assert "teardown ran" in proc.stdout


def test_a_process_group_still_open_is_destroyed_before_the_exit(tmp_path):
    proc = _run("""
        import torch.distributed as dist
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(lambda: print("group open at atexit:", dist.is_initialized(), flush=True))
        end_process(0)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "group open at atexit: False" in proc.stdout
    assert "teardown ran" not in proc.stdout
