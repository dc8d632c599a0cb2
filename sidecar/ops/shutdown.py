"""A hard bound on a graceful stop.

Every step of a stop has its own timeout (in-flight calls ``shutdown_grace``, audit shipping
``shutdown_grace``, usage reports and replication one RPC timeout each), but their sum, and a
step that blocks where no timeout reaches (a thread join, the interpreter's exit joining the
server's thread pool), could keep a stopping process alive until the orchestrator's SIGKILL,
which loses more: nothing of the stop is logged and its last records never reach the spool.
So the stop runs under a watchdog: past its budget the process writes every thread's stack to
stderr, logs why, and exits with ``OVERRUN_EXIT_CODE``. What was not delivered by then stays in
the spool for the next start (docs/operating.md, "Graceful shutdown")."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger("sidecar.server")

OVERRUN_EXIT_CODE = 70  # EX_SOFTWARE: the stop did not finish in its budget
SLACK = 15.0  # beyond the configured waits: the last usage report (5 s timeout, maybe two), flushes


def stop_budget(drain_delay: float, grace: float) -> float:
    """Seconds a stop may take from the signal: the drain, in-flight calls and delivery each
    within ``grace``, plus ``SLACK``."""
    return drain_delay + 2 * grace + SLACK


def arm(budget: float, what: str) -> None:
    """From now on the process has ``budget`` seconds to be gone, exit included (the
    interpreter's exit joins the server's thread pool). A daemon thread: an exit in time ends
    it with the process."""

    def watch() -> None:
        time.sleep(budget)
        _overrun(budget, what)

    threading.Thread(target=watch, name="spauth-stop-watchdog", daemon=True).start()


def _overrun(budget: float, what: str) -> None:
    try:
        log.error(
            "shutdown overran its budget; exiting without finishing it",
            extra={"component": what, "budget_s": round(budget, 1), "exit_code": OVERRUN_EXIT_CODE},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
    finally:  # whatever the reporting does, the process goes
        os._exit(OVERRUN_EXIT_CODE)
