"""A fake of the small part of :class:`edge_agent.transport.MqttTransport` that the uploader uses
(:class:`edge_agent.uploader.UploadTransport`), for unit tests that need no broker.

In the spirit of httpx's ``MockTransport``: a ``handler`` decides what the "broker" answers to each
publish. It returns ``ACK`` (a PUBACK that takes the message), a refusal reason (a PUBACK that does
not: ``"No matching subscribers"``, ``"Not authorized"``), ``SILENT`` (no PUBACK: the wait for it
times out at once) or ``DROP`` (the connection goes while waiting). The fake is instant: nothing in
it sleeps, so a test waits only for the thread under test.

Everything published is kept in :attr:`FakeTransport.sent`; :meth:`FakeTransport.wait_sent` waits
(with a deadline) until a condition on it holds. Each real-broker test of the same path stays
beside the unit tests that use this.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

ACK = "ack"
SILENT = "silent"
DROP = "drop"

Handler = Callable[[str, bytes], str]
"""``handler(topic, payload) -> ACK | SILENT | DROP | refusal reason``"""


@dataclass(frozen=True)
class Sent:
    topic: str
    payload: bytes
    qos: int
    outcome: str


class FakeReceipt:
    """What paho's ``MQTTMessageInfo`` tells the uploader: the mid and whether a PUBACK came."""

    def __init__(self, mid: int, outcome: str) -> None:
        self.mid = mid
        self._outcome = outcome

    def wait_for_publish(self, timeout: float | None = None) -> None:
        if self._outcome == DROP:  # what paho raises when the message can no longer be sent
            raise RuntimeError("The client is not currently connected.")

    def is_published(self) -> bool:
        return self._outcome not in (SILENT, DROP)


class FakeTransport:
    """Connected at construction unless ``connected=False``; :meth:`connect` and :meth:`disconnect`
    change that and run the ``on_connected`` hooks as the real transport does after a connect.

    Args:
        handler: the broker's answer to each publish (default: take everything).
        connected: whether it starts connected.
        max_packet: the broker's Maximum Packet Size (None: it sets none).
    """

    def __init__(self, *, handler: Handler = lambda _t, _p: ACK, connected: bool = True,
                 max_packet: int | None = None) -> None:  # fmt: skip
        self.handler = handler
        self.connected = threading.Event()
        if connected:
            self.connected.set()
        self.max_packet = max_packet
        self.sent: list[Sent] = []
        self._hooks: list[Callable[[], None]] = []
        self._refusals: dict[int, str] = {}
        self._cond = threading.Condition()
        self._mid = 0

    # -- the UploadTransport interface ------------------------------------------------------------
    def on_connected(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)

    def max_payload(self, topic: str, default: int) -> int:
        if self.max_packet is None:
            return default
        return max(0, min(default, self.max_packet - len(topic.encode()) - 64))  # as MqttTransport does

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> FakeReceipt:
        outcome = self.handler(topic, payload)
        with self._cond:
            self._mid += 1
            if outcome not in (ACK, SILENT, DROP):
                self._refusals[self._mid] = outcome
            self.sent.append(Sent(topic, payload, qos, outcome))
            self._cond.notify_all()
            return FakeReceipt(self._mid, outcome)

    def refusal(self, mid: int) -> str | None:
        with self._cond:
            return self._refusals.pop(mid, None)

    # -- the test's side --------------------------------------------------------------------------
    def connect(self) -> None:
        self.connected.set()
        for hook in self._hooks:
            hook()

    def disconnect(self) -> None:
        self.connected.clear()

    def wait_sent(self, predicate: Callable[[list[Sent]], bool], *, timeout_s: float = 10.0) -> list[Sent]:
        """Wait until ``predicate(sent)`` holds; return a copy of what was sent."""
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.sent), timeout=timeout_s), (
                f"not reached within {timeout_s:g}s; sent {[(s.topic, s.outcome) for s in self.sent]}"
            )
            return list(self.sent)
