"""Makes one rank's writes fail, for the tests of a checkpoint that fails on one rank only.

A test puts this folder first on ``PYTHONPATH`` of a multi-process run and sets
``KUBETUNE_TEST_FAIL_WRITES=<rank>:<glob>:<errno name>`` (e.g. ``1:*/.tmp-step-00000004/*:ENOSPC``).
In the worker whose ``RANK`` is ``<rank>``, every ``open`` for writing, ``os.replace``,
``os.rename``, ``os.mkdir`` and ``torch.save`` (DeepSpeed's shards: torch's C++ writer opens the
file itself) of a path matching ``<glob>`` then raises ``OSError`` with that errno, as the kernel answers on a full or read-only volume (the tests run as root: chmod cannot
show it, and one rank's volume cannot be filled alone). The first refusal writes the time to
``KUBETUNE_TEST_FAIL_WRITES_MARK`` (if set), so the test can time how long the others take to stop.
``KUBETUNE_TEST_FAIL_WRITES_LINGER=<seconds>`` makes that rank, once a write was refused, wait
that long before it closes its process group (``destroy_process_group``): its connections stay
open, so the other ranks cannot learn of the failure from the transport. That is how a failed
peer looks under NCCL, whose collectives do not notice a peer that went away, or when the failed
process hangs in I/O on the broken volume; gloo alone would see the socket close at its exit.
Every other process (the launcher, the other ranks) is left untouched. Python runs a module named
``sitecustomize`` at start-up; this one replaces the system's (which only installs apport's hook).
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import importlib.abc
import importlib.util
import io
import os
import sys
import time
from typing import Any


def _install() -> None:
    spec = os.environ.get("KUBETUNE_TEST_FAIL_WRITES", "")
    if not spec:
        return
    rank, pattern, name = spec.split(":", 2)
    if os.environ.get("RANK") != rank:
        return
    code = getattr(errno, name)
    mark = os.environ.get("KUBETUNE_TEST_FAIL_WRITES_MARK")
    real_open, real_replace, real_rename, real_mkdir = builtins.open, os.replace, os.rename, os.mkdir

    refused: list[str] = []

    def refuse(path: object) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and fnmatch.fnmatch(os.path.abspath(os.fsdecode(path)), pattern):
            refused.append(os.fsdecode(path))
            if mark and not os.path.exists(mark):
                with real_open(mark, "w") as handle:
                    handle.write(repr(time.time()))
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    def open_(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        refuse(dst)
        return real_rename(src, dst, *args, **kwargs)

    def mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_  # pathlib's Path.open calls io.open
    os.replace, os.rename, os.mkdir = replace, rename, mkdir
    linger = float(os.environ.get("KUBETUNE_TEST_FAIL_WRITES_LINGER") or 0)
    sys.meta_path.insert(0, _PatchTorchSave(refuse, refused, linger))


class _PatchTorchSave(importlib.abc.MetaPathFinder):
    """Wraps ``torch.save`` once torch is imported (importing torch here would cost every process
    seconds)."""

    def __init__(self, refuse: Any, refused: list[str], linger: float) -> None:
        self.refuse, self.refused, self.linger, self.searching = refuse, refused, linger, False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "torch" or self.searching:
            return None
        # Not removed from sys.meta_path here: importlib.util.find_spec("torch") (transformers asks
        # whether torch is installed) comes here too without importing it.
        self.searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        if spec is None or spec.loader is None:
            return spec
        exec_module, refuse, finder = spec.loader.exec_module, self.refuse, self
        refused, linger = self.refused, self.linger

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            real_save = module.save

            def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
                refuse(f)
                return real_save(obj, f, *args, **kwargs)

            module.save = save
            real_destroy = module.distributed.destroy_process_group

            def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
                if refused and linger:
                    time.sleep(linger)
                return real_destroy(*args, **kwargs)

            module.distributed.destroy_process_group = destroy_process_group

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


_install()
