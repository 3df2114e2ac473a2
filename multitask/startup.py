"""Quiet start-up for the command line: TensorFlow's start-up messages off, unless ``multitask -v``.

Importing TensorFlow prints C++ log lines that say nothing to a user (oneDNN, "Could not find cuda drivers", CPU
instruction sets), and the first tensor on a machine without a GPU adds an E-level "failed call to cuInit ...
UNKNOWN ERROR (303)". Most come before absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot silence
them: while ``tensorflow`` itself is imported, file descriptor 2 points at ``/dev/null``; ``TF_CPP_MIN_LOG_LEVEL=3``
silences what comes later (cuInit). Must run before anything imports TensorFlow; the CLI calls it first thing.
A ``TF_CPP_MIN_LOG_LEVEL`` the user set is left alone, and so is everything else TensorFlow prints.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_LEVEL = "3"  # TF_CPP_MIN_LOG_LEVEL: INFO, WARNING and ERROR lines off (cuInit's is an ERROR)


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up messages in this process (see the module docstring); a no-op once it is
    imported, or when the user set ``TF_CPP_MIN_LOG_LEVEL``."""
    if "tensorflow" in sys.modules or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_LEVEL
    for name in ("absl", "tensorflow"):  # their Python loggers: "All log messages before absl::...", retracing notes
        logging.getLogger(name).setLevel(logging.ERROR)
    if not any(isinstance(finder, _SilentImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SilentImport("tensorflow"))


class _SilentImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the normal machinery, then runs its import with file descriptor 2 silenced (once)."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            with stderr_silenced():
                load(module)

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """File descriptor 2 (C++ and Python stderr alike) goes to ``/dev/null`` inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
