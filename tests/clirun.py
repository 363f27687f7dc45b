"""``clipdistill ARGS`` run in the test process: the real entry point (stages.cli.main, its one-line errors and
exit codes included) without a fresh interpreter, whose imports cost ~5 s of CPU per command.

Tests about the process itself (a kill, DDP, what a fresh interpreter imports) still start one.
"""

from __future__ import annotations

import subprocess
import sys


def clipdistill(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command like ``python -m stages.cli ARGS``; returns its exit code, stdout and stderr."""
    from click.testing import CliRunner

    from stages import cli

    import torch

    argv = [str(a) for a in args]
    code = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess tests' OMP_NUM_THREADS=1: the same sums, so the same weights
    # HF_HUB_OFFLINE as in the subprocess tests (no download is ever attempted); restored afterwards
    with CliRunner().isolation(env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}) as streams:
        saved, sys.argv = sys.argv, ["clipdistill", *argv]
        try:
            cli.main()
        except SystemExit as exc:  # typer exits after every command; main exits 2 after a one-line error
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = saved
            torch.set_num_threads(threads)
        out, err = (s.getvalue().decode("utf-8", "replace") for s in streams[:2])
    return subprocess.CompletedProcess(["clipdistill", *argv], code, out, err)
