"""Ports for tests, without the race of "pick a free port, bind it later".

A port found free can be taken by another process (a parallel test run, the benchmarks) before the
process meant to use it binds it. So:

- a server the test starts binds it itself: port 0, read back (agents: ``[http] port = 0``, the
  port read from its log by ``tests.conftest.AgentProcess``);
- a broker, which cannot bind port 0 and say which it got, is started on a free port and started
  again on another if that one was taken meanwhile (:func:`retry_on_port_clash`);
- a test that needs a port where nothing listens holds one bound, unlistened, for as long as it
  needs it (:func:`refused_port`): connections are refused and no one else can take it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from cloud_trainer.demo.localbroker import LocalBroker, free_port, start_local_broker
from cloud_trainer.errors import BrokerError

T = TypeVar("T")

PORT_TAKEN = "address already in use"  # EADDRINUSE, as mosquitto and asyncio (amqtt) log it


def retry_on_port_clash(start: Callable[[int], T], *, attempts: int = 5) -> T:
    """``start(port)`` on a free port; again on another if the port was taken before it bound it."""
    for attempt in range(1, attempts + 1):
        try:
            return start(free_port())
        except BrokerError as exc:
            if PORT_TAKEN not in str(exc).lower() or attempt == attempts:
                raise
    raise AssertionError("unreachable")


def start_mosquitto(*, workdir: Path, persistence: bool = False, prefer: str = "mosquitto") -> LocalBroker:
    """``start_local_broker`` (which picks a free port itself) with the retry above."""
    return retry_on_port_clash(
        lambda _port: start_local_broker(prefer=prefer, persistence=persistence, workdir=workdir)
    )


@contextmanager
def refused_port() -> Iterator[int]:
    """A localhost port this process holds bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
