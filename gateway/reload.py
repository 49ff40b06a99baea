"""Configuration reload without a restart: the file is read again when its content changes
(checked every `server.config_poll_interval_s`; 0: not checked) and on SIGHUP, and a configuration
that can run replaces the running one (`GatewayRuntime.reconfigure`).

A file that cannot run (unreadable, bad YAML, a bad field, an unknown policy) is refused with
one log line naming the field; the running configuration stays. Outcomes are counted in
`gateway_config_reloads_total{result}`: applied, unchanged (nothing to change), refused.

One task does all reloads, one after another. A file seen changing between two reads a
moment apart is being written: it is read again at the next poll rather than refused.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Literal, Protocol

from gateway.config import ConfigError, GatewayConfig
from gateway.config_diff import ConfigChange
from gateway.config_file import ConfigFile
from gateway.metrics import GatewayMetrics
from gateway.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Outcome = Literal["applied", "unchanged", "refused"]
# Between the two reads that tell a file being written from a written one.
SETTLE_S = 0.05


class Reconfigurable(Protocol):
    async def reconfigure(self, config: GatewayConfig) -> ConfigChange: ...


class ConfigReloader:
    def __init__(
        self,
        file: ConfigFile,
        target: Reconfigurable,
        metrics: GatewayMetrics,
        *,
        digest: str,
        poll_interval_s: Callable[[], float],
    ) -> None:
        """`digest`: of the text the running configuration was read from (ConfigFile.read).
        `poll_interval_s`: read before each wait, so that a reload can change it."""
        self._file = file
        self._target = target
        self._metrics = metrics
        self._seen = digest  # the last content acted on (or an error reading it)
        self._poll_interval_s = poll_interval_s
        self._hangup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listening = False
        self._previous_handler: Any = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="config-reload")
        # Signal handlers belong to the main thread (a gateway run by tests in another has none).
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.getsignal(signal.SIGHUP)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request_reload)
            self._listening = True

    def request_reload(self) -> None:
        """SIGHUP: read the file now, changed or not."""
        logger.info("SIGHUP: reading the configuration file %s again", self._file.path)
        self._hangup.set()

    async def stop(self) -> None:
        if self._listening:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # Until the process ends (the CLI stops the engines it started), SIGHUP must not kill it.
            if self._previous_handler is not None:
                signal.signal(signal.SIGHUP, self._previous_handler)
            self._listening = False
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _run(self) -> None:
        # First, a change since the running configuration was read (a worker uvicorn
        # restarted starts from the configuration the gateway started with).
        trigger = "start-up"
        while True:
            try:
                await self.reload(trigger, force=trigger == "SIGHUP")
            except Exception:  # reloading must outlive any bug
                logger.exception("configuration reload (%s) failed", trigger)
            interval_s = self._poll_interval_s()
            try:
                await asyncio.wait_for(self._hangup.wait(), timeout=interval_s if interval_s > 0 else None)
            except asyncio.TimeoutError:
                trigger = "file changed"
            else:
                self._hangup.clear()
                trigger = "SIGHUP"

    async def reload(self, trigger: str, *, force: bool) -> Outcome | None:
        """Read the file and run what it says. Unless `force`, only when its content changed
        since last acted on; None: nothing was done."""
        try:
            text = await asyncio.to_thread(self._file.read_text)
        except ConfigError as exc:
            # Polling, a file that stays unreadable is refused once, not at every poll.
            if str(exc) == self._seen and not force:
                return None
            self._seen = str(exc)
            return self._refused(trigger, exc)
        digest = ConfigFile.digest(text)
        if not force and (digest == self._seen or not await self._settled(text)):
            return None
        self._seen = digest
        try:
            change = await self._target.reconfigure(self._file.parse(text))
        except ConfigError as exc:
            return self._refused(trigger, exc)
        except Exception as exc:  # a bug must not end reloading, nor leave it unsaid
            logger.exception("configuration reload (%s) failed", trigger)
            return self._refused(trigger, exc)
        if change.empty:
            logger.info("configuration reload (%s): nothing to change", trigger)
            return self._count("unchanged")
        what = ", ".join(change.sections)
        if change.engines:
            what += f" (engines {change.engines.describe()})"
        logger.info("configuration reload (%s) applied: %s", trigger, what)
        return self._count("applied")

    async def _settled(self, text: str) -> bool:
        await asyncio.sleep(SETTLE_S)
        try:
            return await asyncio.to_thread(self._file.read_text) == text
        except ConfigError:
            return False

    def _refused(self, trigger: str, exc: Exception) -> Outcome:
        # One line, as the field-by-field message of a ConfigError has one per field.
        reason = " ".join(line.strip() for line in str(exc).splitlines())
        if not isinstance(exc, ConfigError):
            reason = f"{type(exc).__name__}: {reason}"
        logger.error("configuration reload (%s) refused, the running configuration stays: %s", trigger, reason)
        return self._count("refused")

    def _count(self, outcome: Outcome) -> Outcome:
        self._metrics.config_reloads.labels(outcome).inc()
        return outcome


def ignore_hangup_until_serving(signum: int, frame: FrameType | None) -> None:
    """SIGHUP before the gateway serves (local engines starting) or after: nothing to reload
    yet, and the file is read again once serving (`ConfigReloader` compares its content)."""
    logger.info("SIGHUP: the configuration is read again once the gateway serves")
