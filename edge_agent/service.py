"""Running the agent as a systemd service: readiness, status, the watchdog, and journald logs.

:func:`serve_until` is the agent's main loop. After the agent started it sends ``READY=1``; it
ticks a heartbeat every second until asked to stop, while a :class:`~edge_agent.watchdog.Watchdog`
pings ``WATCHDOG=1`` only as long as the main loop ticks and the inference worker makes progress;
on the way out it sends ``STOPPING=1`` before the agent stops. Outside systemd (no
``$NOTIFY_SOCKET``) the notifications are no-ops and the loop is the same.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from edge_agent.app import Agent
from edge_agent.sdnotify import Notifier
from edge_agent.serving.batcher import Batcher
from edge_agent.watchdog import Check, Heartbeat, Watchdog

log = logging.getLogger(__name__)

_SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """``<priority>level logger: message`` lines: journald reads the ``<N>`` prefix as the priority
    (``SyslogLevelPrefix=``, on by default) and adds its own timestamps; tracebacks stay in one entry."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record).replace("\n", "\n    ")  # continuation lines stay readable
        return f"<{priority}>{text}"


def inference_check(batcher: Batcher, *, max_stall_s: float) -> Check:
    """Fails when the inference worker died, or stopped turning, or one model run (worker or
    inline) has lasted longer than ``max_stall_s``."""

    def check() -> str | None:
        if not batcher.worker_alive:
            return "the inference worker thread has died"
        run_s = batcher.longest_run_s()
        if run_s > max_stall_s:
            return f"a model run has lasted {run_s:.0f}s (inference hung; limit watchdog.max_stall_s={max_stall_s:g})"
        idle_s = time.monotonic() - batcher.heartbeat
        if idle_s > max_stall_s:
            return f"the inference worker has not turned for {idle_s:.0f}s"
        return None

    return check


def status_line(agent: Agent) -> str:
    """What ``systemctl status`` shows: the version served, an update in progress, the broker link."""
    state = agent.state()
    serving = f"serving {state.model} v{state.active_version}" if state.active_version else "no model yet"
    parts = [serving]
    if state.update_state not in (None, "idle", "active"):
        parts.append(f"update v{state.update_version}: {state.update_state}")
    parts.append("MQTT connected" if agent.transport.connected.is_set() else "MQTT not connected")
    return "; ".join(parts)


def serve_until(agent: Agent, stop: threading.Event, *, notifier: Notifier | None = None, tick_s: float = 1.0) -> None:
    """Run the started ``agent`` until ``stop`` is set, then stop it; systemd is told each step."""
    notifier = notifier or Notifier()
    max_stall_s = agent.config.watchdog.max_stall_s
    main_loop = Heartbeat("the main loop", max_age_s=max_stall_s)
    watchdog = Watchdog(
        notifier=notifier,
        checks={
            "main loop": main_loop.check,
            "inference": inference_check(agent.server.batcher, max_stall_s=max_stall_s),
            "HTTP loop": lambda: agent.server.loop_problem(max_stall_s=max_stall_s),
        },
        status=lambda: status_line(agent),
    )
    notifier.send(READY=1, MAINPID=os.getpid(), STATUS=status_line(agent))
    if notifier.watchdog_s is not None:
        log.info("systemd watchdog: %gs, pinging every %gs while healthy", notifier.watchdog_s, watchdog.interval_s)
    watchdog.start()
    try:
        while not stop.wait(tick_s):
            main_loop.beat()
    finally:
        notifier.send(STOPPING=1, STATUS="stopping")
        watchdog.stop()
        agent.stop()
        notifier.close()
