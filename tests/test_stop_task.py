"""``sidecar.core.tasks.stop_task``: a control plane's close ends its Redis loops even when a
cancellation is turned into the client's own error. CI saw ``ControlPlane.aclose`` wait forever
on the audit-stream consumer after Redis was killed and restarted: its retry loop catches Redis
errors, so a cancellation that surfaced as one was retried, not obeyed."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

from sidecar.core.tasks import stop_task


async def retry_loop(caught: list[int]) -> None:
    """Like AuditStreamConsumer._run and ChangeBus._listen, with a client whose timeout raced
    the first cancellation and reported it as its own error; later ones propagate. Gives up
    after ~5 s so that a failing test fails instead of hanging asyncio.run's cleanup."""
    for _ in range(500):
        try:
            try:
                await asyncio.sleep(30)  # a blocking read
            except asyncio.CancelledError:
                caught.append(1)
                if len(caught) == 1:
                    raise RedisError("Timeout reading from socket") from None
                raise
        except RedisError:
            await asyncio.sleep(0.01)  # the backoff, then read again


def test_a_task_that_outlives_one_cancellation_is_stopped() -> None:
    async def scenario() -> tuple[bool, int]:
        caught: list[int] = []
        task = asyncio.create_task(retry_loop(caught))
        await asyncio.sleep(0)
        # One cancellation, as the closes did before: the loop carries on.
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
        survived = not task.done()
        await stop_task(task, every=0.05)
        return survived and task.cancelled(), len(caught)

    stopped, cancellations = asyncio.run(scenario())
    assert stopped and cancellations == 2


def test_an_ordinary_task_ends_with_one_cancellation_and_its_error_is_consumed() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            raise ValueError("raised while closing")

    async def scenario() -> bool:
        task = asyncio.create_task(failing())
        await asyncio.sleep(0)
        await stop_task(task)
        return task.done() and isinstance(task.exception(), ValueError)

    assert asyncio.run(scenario())
