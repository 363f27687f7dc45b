"""Testing switches for the kill-and-resume tests: an environment variable names a point (a training step, a
published shard) at which the process SIGKILLs itself. A test that sleeps before killing from outside lands before
or after its point depending on the machine's load; these land on it. A real SIGKILL, not an exit: no cleanup runs
(only the console is flushed, for the test to read)."""

from __future__ import annotations

import os
import signal
import sys

from pipeline.common.errors import PipelineError


def read_switch(name: str, what: str) -> int | None:
    """The count ``name`` asks for (None when unset); anything but a whole number >= 1 is one line."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise PipelineError(f"{name}={raw!r}: expected {what} >= 1 (a testing switch; unset it)")
    return int(raw)


def kill_self() -> None:
    sys.stdout.flush(), sys.stderr.flush()  # the console only: the job's own files stay as a kill leaves them
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["read_switch", "kill_self"]
