"""Child processes run to their end, which a stop must take along: the packed conda-unpack and the
environment's activate.d scripts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

from entrypoint.errors import StopSignal


def run(argv: list[str], *, own_group: bool, **popen: Any) -> tuple[int, Any, Any]:
    """(exit status, stdout, stderr) of argv, run with pipes. A stop (StopSignal) is raised once
    Popen returned the child (StopSignal.deferred: raised inside Popen, after the fork, it left the
    child running), and the child is then killed and reaped: with the group it leads (`own_group`,
    for children that start their own), or alone (one sharing the start's group)."""
    proc = None
    try:
        with StopSignal.deferred():
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=own_group, **popen
            )
        stdout, stderr = proc.communicate()
    except BaseException:
        if proc is not None:
            if own_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
        raise
    return proc.returncode, stdout, stderr
