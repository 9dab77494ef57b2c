"""A job's fast exit (augbench.__main__.leave) keeps what the interpreter's exit guarantees: running threads finish,
idle executor workers are released (no hang), atexit handlers run, buffered output is written, the code is kept."""

from __future__ import annotations

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
