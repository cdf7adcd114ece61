"""The systemd watchdog: ``WATCHDOG=1`` pings only while the agent is really alive.

A thread sends ``WATCHDOG=1`` every half of systemd's ``WatchdogSec`` (``$WATCHDOG_USEC``), but
only while every liveness check passes. A check is a function that returns ``None`` when its
part is healthy and a one-line problem otherwise (the main loop has not ticked for a minute; the
inference worker is dead, or one model run has lasted too long). When a check fails the pings
stop, ``STATUS=`` says why, and systemd kills and restarts the service once ``WatchdogSec``
passes without a ping. A thread that only pinged on a timer would keep a hung agent "alive"
for months.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from edge_agent.sdnotify import Notifier

log = logging.getLogger(__name__)

Check = Callable[[], "str | None"]
"""``check() -> None`` when healthy, else a one-line problem."""

STATUS_ONLY_INTERVAL_S = 5.0
"""How often STATUS is refreshed when systemd asked for no watchdog."""


class Heartbeat:
    """A timestamp a loop refreshes on every turn; :meth:`check` fails when it grows stale."""

    def __init__(self, name: str, *, max_age_s: float) -> None:
        self.name = name
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def check(self) -> str | None:
        age = time.monotonic() - self._last
        return f"{self.name} has not ticked for {age:.0f}s" if age > self.max_age_s else None


class Watchdog:
    """Pings systemd's watchdog while ``checks`` pass, and keeps ``STATUS=`` current.

    Args:
        notifier: the sd_notify channel; without a socket the watchdog does nothing.
        checks: liveness checks by name.
        status: the one-line status to show while healthy (``systemctl status``).
    """

    def __init__(
        self, *, notifier: Notifier, checks: Mapping[str, Check], status: Callable[[], str] = lambda: ""
    ) -> None:
        self._notifier = notifier
        self._checks = dict(checks)
        self._status = status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        timeout = notifier.watchdog_s
        self.interval_s = timeout / 2 if timeout is not None else STATUS_ONLY_INTERVAL_S
        self._last_status = ""
        self._failing: str | None = None

    def start(self) -> None:
        if self._notifier.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def problems(self) -> list[str]:
        """The failing checks' problems, empty when all pass (a check that raises fails)."""
        found = []
        for name, check in self._checks.items():
            try:
                problem = check()
            except Exception as exc:  # noqa: BLE001 - a broken check must withhold the ping, not kill the thread
                problem = f"{name} check failed: {exc}"
            if problem:
                found.append(problem)
        return found

    def tick(self) -> bool:
        """One round: ping if healthy (``True``), else withhold the ping and report why."""
        problems = self.problems()
        if problems:
            reason = "; ".join(problems)
            if reason != self._failing:
                log.error("withholding the systemd watchdog ping: %s", reason)
                self._failing = reason
            self._send_status(f"unhealthy, watchdog ping withheld: {reason}")
            return False
        if self._failing is not None:
            log.warning("healthy again; watchdog pings resume")
            self._failing = None
        fields: dict[str, str | int] = {}
        if self._notifier.watchdog_s is not None:
            fields["WATCHDOG"] = 1
        status = self._status()
        if status and status != self._last_status:
            fields["STATUS"] = status
            self._last_status = status
        if fields:
            self._notifier.send(**fields)
        return True

    def _send_status(self, status: str) -> None:
        if status != self._last_status:
            self._notifier.send(STATUS=status)
            self._last_status = status

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self.interval_s):
                return
