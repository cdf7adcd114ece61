"""A broker on localhost for the demo and the tests: Mosquitto when installed, else embedded amqtt.

amqtt speaks MQTT 3.1.1 only, so clients of an amqtt broker use that protocol
(:attr:`LocalBroker.protocol`); Mosquitto gets MQTT 5.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloud_trainer.errors import BrokerError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def broker_reachable(host: str, port: int, *, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class LocalBroker:
    """A broker child process. Use :func:`start_local_broker`; stop with :meth:`stop`."""

    host: str
    port: int
    kind: str
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    log_file: Path | None = None
    config_file: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return "3.1.1" if self.kind == "amqtt" else "5"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port, with the same config (and persistence, if any)."""
        self.stop()
        self.process = _spawn(self)
        _wait_listening(self)


def mosquitto_config(port: int, *, persistence_dir: Path | None = None) -> str:
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "max_packet_size 1048576",
        # Past this many QoS 1 messages queued for one client Mosquitto drops new ones (default
        # 1000): a collector that falls behind a burst of sample batches would lose them.
        "max_queued_messages 100000",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # else mosquitto drops to its own user and cannot write our temp dirs
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {persistence_dir}/", "autosave_interval 1"]
    else:
        lines.append("persistence false")
    return "\n".join(lines) + "\n"


def start_local_broker(*, prefer: str = "auto", persistence: bool = False, workdir: Path | None = None) -> LocalBroker:
    """Start a broker on a free localhost port and wait until it accepts connections.

    Args:
        prefer: ``mosquitto``, ``amqtt`` or ``auto`` (Mosquitto when its binary is on PATH).
        persistence: keep retained messages and sessions on disk across :meth:`LocalBroker.restart`.
        workdir: where its config, log and data go (a temporary directory by default).
    """
    kind = prefer
    if kind == "auto":
        kind = "mosquitto" if _mosquitto_binary() else "amqtt"
    if kind == "mosquitto" and not _mosquitto_binary():
        raise BrokerError("mosquitto is not installed (apt-get install mosquitto), and it was asked for")
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"edgeloop-{kind}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    broker = LocalBroker(
        host="127.0.0.1", port=free_port(), kind=kind, workdir=workdir, log_file=workdir / "broker.log"
    )
    if kind == "mosquitto":
        broker.config_file = workdir / "mosquitto.conf"
        broker.config_file.write_text(
            mosquitto_config(broker.port, persistence_dir=workdir / "data" if persistence else None)
        )
        (workdir / "data").mkdir(exist_ok=True)
    broker.process = _spawn(broker)
    _wait_listening(broker)
    return broker


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


_AMQTT_MAIN = textwrap.dedent(
    """
    import asyncio, sys
    from amqtt.broker import Broker

    async def main(port):
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        broker = Broker(config)
        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(main(int(sys.argv[1])))
    """
)


def _spawn(broker: LocalBroker) -> subprocess.Popen[bytes]:
    assert broker.log_file is not None
    log = broker.log_file.open("ab")
    if broker.kind == "mosquitto":
        binary = _mosquitto_binary()
        assert binary is not None
        assert broker.config_file is not None
        cmd = [binary, "-c", str(broker.config_file)]
    else:
        cmd = [sys.executable, "-c", _AMQTT_MAIN, str(broker.port)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_listening(broker: LocalBroker, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if broker.process and broker.process.poll() is not None:
            tail = ""
            if broker.log_file:
                with contextlib.suppress(OSError):
                    tail = broker.log_file.read_text()[-500:]
            raise BrokerError(f"{broker.kind} exited at start with code {broker.process.returncode}: {tail}")
        if broker_reachable(broker.host, broker.port, timeout_s=0.2):
            return
        time.sleep(0.05)
    broker.kill()
    raise BrokerError(f"{broker.kind} did not listen on {broker.host}:{broker.port} within {timeout_s:g}s")
