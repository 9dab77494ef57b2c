"""`python -m augbench <stage>`: see augbench.cli."""

import atexit
import os
import sys
import threading

from augbench.cli import main


def leave(code: int) -> None:
    """End a job without the interpreter's teardown, once everything it wrote is closed.

    Python's own exit finalises every module and then runs the C++ static destructors of libtorch, which fault
    in code pages no job touched: measured on the pinned CUDA build, `import torch` then a normal exit peaks at
    ~130 MB more resident memory than the job itself ever used, and takes ~1 s. A job's outputs are already
    written atomically and closed here, so: finish the threads as the interpreter would, run the atexit handlers
    (logging's flush, multiprocessing's clean-up), flush the standard streams, and leave with the exit code.
    """
    # the interpreter's own first exit step: threading's exit callbacks (they release the idle workers of a
    # ThreadPoolExecutor nobody shut down; joining those threads directly would wait forever), then the join of
    # every non-daemon thread
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a stream already closed: nothing left to lose
            pass
    os._exit(code)


if __name__ == "__main__":  # img2dataset spawns processes: the guard is required
    leave(main())
