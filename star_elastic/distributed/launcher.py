"""A worker that torchrun started ends when torchrun ends.

torchrun starts each worker in a session of its own, so a signal to torchrun's process group never
reaches the workers, and a torchrun killed outright (SIGKILL, the OOM killer) forwards nothing:
its workers would train on and keep writing the run. So every worker watches its launcher: a
daemon thread checks every POLL_S seconds that the process that started it is still its parent (an
orphan is re-parented to init or a subreaper) and otherwise ends the process at once with
`os._exit` (a rank blocked in a collective never returns to Python to run a signal handler; the
kernel drops its run-folder lock). SIGTERM, which torchrun sends its workers when it is itself
stopped (Ctrl-C, SIGTERM), keeps its default action: the worker ends at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

POLL_S = 0.2
_watching: list[int] = []


def watch_launcher() -> None:
    """Under torchrun (its TORCHELASTIC_RUN_ID is set), start watching the parent process; once
    per process. Call it from the main thread, as early as possible."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or _watching:
        return
    _watching.append(os.getppid())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch, args=(_watching[0],), name="star-elastic launcher watch", daemon=True).start()


def _watch(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_S)
    try:
        print(f"star-elastic: torchrun (pid {launcher}) has ended; ending worker {os.getpid()}", file=sys.stderr,
              flush=True)
    except (OSError, ValueError):  # stderr was torchrun's pipe, or is closed
        pass
    os._exit(1)
