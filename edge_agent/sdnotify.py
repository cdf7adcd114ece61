"""The systemd notification protocol (``sd_notify``), in the standard library.

systemd passes a datagram socket in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket) to a ``Type=notify`` service; the service sends newline-separated ``KEY=VALUE``
assignments to it: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``,
``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when ``WatchdogSec=`` is set, and
``STOPPING=1`` when it begins to shut down. Without ``$NOTIFY_SOCKET`` (not under systemd)
every call is a no-op, so the agent runs the same in a terminal.

See sd_notify(3); this is the whole protocol the agent needs, without libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket named in the environment, if any.

    Args:
        environ: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
            (``os.environ`` by default).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_s = _watchdog_interval(env)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given (we run under systemd, or a test stands in)."""
        return self._sock is not None

    @property
    def watchdog_s(self) -> float | None:
        """systemd's watchdog timeout in seconds, or ``None`` when the watchdog is off for us."""
        return self._watchdog_s

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``send(READY=1, STATUS="serving v2")``); ``False`` if not delivered."""
        if self._sock is None or self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"sd_notify value for {key} must be one line, got {text!r}")
            lines.append(f"{key}={text}")
        try:
            with self._lock:
                self._sock.sendto("\n".join(lines).encode("utf-8"), self._address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self._address, exc)
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an @abstract name", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we are a child of the service's main process)
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1_000_000 if value > 0 else None
