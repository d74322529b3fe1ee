"""Child processes that must not outlive the command that started them.

`run` is `subprocess.run` with the child recorded while it runs. `stop_all` ends every recorded
child together with everything it started — the stage under `dvc repro`, the ranks under the
DeepSpeed launcher — by SIGTERM to the whole tree, then SIGKILL after a grace period. The command
line calls it when it is interrupted (Ctrl-C) or terminated (SIGTERM): a plain `kill` reaches the
command alone, and Python's `subprocess` would end only the direct child, orphaning its own.
Children stay in the command's process group, so a signal to the group (the terminal's Ctrl-C, a
batch scheduler's kill) reaches them directly, as before.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

import psutil

_lock = threading.Lock()
_running: dict[int, subprocess.Popen[Any]] = {}


def run(argv: Sequence[str], *, capture_output: bool = False, timeout: float | None = None,
        **popen: Any) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(argv, check=False, ...)`, recorded for `stop_all`; a timeout or an exception
    while waiting (Ctrl-C, SIGTERM) ends the child's whole tree before it propagates."""
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(list(argv), **popen) as proc:
        with _lock:
            _running[proc.pid] = proc
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _end_trees([proc], grace=5.0)
            raise
        finally:
            with _lock:
                _running.pop(proc.pid, None)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _end_trees(procs: list[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM each process and all its descendants, SIGKILL what is left after `grace` s, reap."""
    tree: list[psutil.Process] = []
    for proc in procs:
        try:
            leader = psutil.Process(proc.pid)
            tree += [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    for proc in procs:
        proc.wait()


def stop_all(grace: float = 10.0) -> int:
    """End every running child with its descendants (SIGTERM, SIGKILL after `grace` s); the count."""
    with _lock:
        procs = list(_running.values())
    _end_trees(procs, grace)
    return len(procs)
