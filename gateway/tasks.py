"""Background tasks: how the gateway's parts stop the ones they started."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and return once all have ended. What they end with (their cancellation,
    an exception) is not raised here: a task that must report a failure logs it itself."""
    tasks = list(tasks)  # a done callback may take a task out of the caller's collection
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
