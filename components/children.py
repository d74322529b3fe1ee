"""Child processes that must not outlive the command that started them.

`run` is `subprocess.run` with the child in a process group of its own, recorded while it runs.
`stop_all` ends every recorded group — the child and whatever it started (a stage under
`dvc repro`, the ranks under the DeepSpeed launcher) — with SIGTERM, then SIGKILL after a grace
period. The command line calls it when it is interrupted (Ctrl-C) or terminated (SIGTERM); a
child in its own group does not get the terminal's Ctrl-C itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

_lock = threading.Lock()
_running: dict[int, subprocess.Popen[Any]] = {}


def run(argv: Sequence[str], *, capture_output: bool = False, timeout: float | None = None,
        **popen: Any) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(argv, check=False, ...)` in a new process group that `stop_all` can end."""
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(list(argv), start_new_session=True, **popen) as proc:
        with _lock:
            _running[proc.pid] = proc
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _end_group(proc, grace=5.0)
            raise
        finally:
            with _lock:
                _running.pop(proc.pid, None)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group's id is its leader's pid (start_new_session)
    except ProcessLookupError:
        pass


def _end_group(proc: subprocess.Popen[Any], grace: float) -> None:
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)  # whatever the leader left behind, too
    proc.wait()


def stop_all(grace: float = 10.0) -> int:
    """End every running child's process group (SIGTERM, SIGKILL after `grace` s); the count ended."""
    with _lock:
        procs = list(_running.values())
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
    return len(procs)
