"""Stopping a background asyncio task for certain."""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL_EVERY = 0.5  # seconds between cancellations of a task that carries on


async def stop_task(task: asyncio.Task[Any], *, every: float = RECANCEL_EVERY) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``every`` seconds
    while it carries on. One cancellation is delivered once: a library that turns it into an
    error of its own (a Redis client's timeout racing the cancellation can) lets a retry loop
    catching that error go on forever, and a close awaiting the task never returns. Whatever the
    task ended with is consumed here (a close has nothing to do with it)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at collection
