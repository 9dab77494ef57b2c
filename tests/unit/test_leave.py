"""A job's fast exit (augbench.__main__.leave) keeps what the interpreter's exit guarantees: running threads finish,
idle executor workers are released (no hang), atexit handlers run, buffered output is written, the code is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from augbench.__main__ import leave

out = Path(sys.argv[1])
pool = ThreadPoolExecutor(2)  # never shut down: its idle workers wait on their queue
assert pool.submit(lambda: 1).result() == 1
threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
atexit.register(lambda: (out / "atexit").write_text("ran"))
sys.stdout.write("buffered, no newline")
leave(7)
"""


def test_leave_finishes_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 7, res.stderr[-2000:]
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert res.stdout == "buffered, no newline"


def test_a_flush_that_fails_keeps_the_jobs_exit_code(tmp_path: Path) -> None:
    """A job whose log reader went away (a closed pipe: `| head`, a killed tail) still leaves with its own code: the
    failed flush of its buffered output is not a new error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a job's stdout to a pipe is block-buffered
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the job flushes (its thread sleeps 0.5 s first)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err.decode()[-2000:]
    assert (tmp_path / "atexit").read_text() == "ran"
