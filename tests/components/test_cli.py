"""The command line's exit paths: SIGTERM unwinds like Ctrl-C, and either one stops the processes
the command started (`components.children`) with everything they started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from components import children

ROOT = Path(__file__).resolve().parents[2]

# A stand-in command that does what `capfilt run` does while a stage runs: waits on a child (dvc)
# that waits on its own child (the stage), with an atexit handler registered (as Prefect registers
# its local server's stop). With "thread" the child runs from a worker thread while the main thread
# waits on it, as under Prefect's task runner; then cli's stop_all ends it, else `children.run`.
SCRIPT = """
import argparse, atexit, sys, threading
from components import children, cli
atexit.register(lambda: print("atexit ran", flush=True))
STAGE = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(120)'])"

def command(args):
    if sys.argv[1] == "thread":
        worker = threading.Thread(target=children.run, args=([sys.executable, "-c", STAGE],), daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    else:
        children.run([sys.executable, "-c", STAGE])
    return 0

def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=command, command="run")
    return p

cli.build_parser = parser
sys.exit(cli.main([]))
"""


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                    (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_signal_to_the_command_alone_ends_its_children_and_grandchildren(sig, code, word, where):
    # SIGINT's default disposition, as in a terminal: a shell starts background jobs (a CI runner's
    # `make test &`) with SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, where], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(tree) < 2 and time.monotonic() < deadline:  # the child and the grandchild
            time.sleep(0.1)
            tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) == 2, "the stand-in command never started its processes"
        proc.send_signal(sig)  # to the command's pid only, as `kill` does
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        stopped = " (stopped 1 child process(es) with their descendants)" if where == "thread" else "\n"
        assert f"capfilt run: {word}{stopped}" in err
        assert "atexit ran" in out
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, "a process the command started outlived it"
    finally:
        for p in tree:
            if p.is_running():
                p.kill()
        if proc.poll() is None:
            proc.kill()


def test_run_returns_like_subprocess_run_and_a_timeout_ends_the_tree(tmp_path):
    done = children.run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], capture_output=True,
                        text=True)
    assert (done.returncode, done.stdout.strip()) == (3, "out")
    pid_file = tmp_path / "grandchild.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    stage = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {sleeper!r}])"
    with pytest.raises(subprocess.TimeoutExpired):
        children.run([sys.executable, "-c", stage], timeout=3.0)
    pid = int(pid_file.read_text())
    grandchild = psutil.Process(pid) if psutil.pid_exists(pid) else None
    if grandchild is not None:  # a zombie for a moment at most, never left sleeping
        _, alive = psutil.wait_procs([grandchild], timeout=10)
        assert not alive, "the timed-out child's own child outlived it"
    assert children.stop_all() == 0  # nothing left recorded
