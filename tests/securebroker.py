"""A real Mosquitto started with the project's own secure configuration (deploy/mosquitto/edgeloop.conf).

Only the ports and the two directories are replaced (and ``user root`` added when the tests run
as root, as for the plain test broker), so what the tests prove holds for the file we ship.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.fleet.provision import Pki

TEMPLATE = Path(__file__).parents[1] / "deploy" / "mosquitto" / "edgeloop.conf"


def render_broker_config(text: str, *, conf_dir: Path, data_dir: Path, cert_port: int, password_port: int) -> str:
    replacements = {
        "/etc/mosquitto/edgeloop/": f"{conf_dir}/",
        "/var/lib/mosquitto/": f"{data_dir}/",
        "listener 8883\n": f"listener {cert_port} 127.0.0.1\n",
        "listener 8884\n": f"listener {password_port} 127.0.0.1\n",
    }
    for old, new in replacements.items():
        assert old in text, f"{TEMPLATE} no longer contains {old!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text += "user root\n"  # else mosquitto drops to its own user and cannot read our 0700 temp dirs
    return text


@dataclass
class SecureBroker:
    """The broker process, the PKI whose files it reads, and its two listeners."""

    broker: LocalBroker
    pki: Pki
    conf_dir: Path
    password_port: int

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    def sync(self) -> None:
        """Copy the PKI's broker files (acl, passwd, crl.pem) into place and reload, as an operator would."""
        for name in ("acl", "passwd", "crl.pem"):
            shutil.copy2(self.pki.root / "broker" / name, self.conf_dir / name)
        assert self.broker.process is not None
        reloads = self.log().count("Reloading config.")
        self.broker.process.send_signal(signal.SIGHUP)
        # Mosquitto logs the line, then reloads before it serves the next packet.
        deadline = time.monotonic() + 30  # a loaded CI runner can take a while to schedule it
        while self.log().count("Reloading config.") == reloads:
            assert time.monotonic() < deadline, f"mosquitto did not reload:\n{self.log()[-2000:]}"
            time.sleep(0.05)

    def log(self) -> str:
        assert self.broker.log_file is not None
        return self.broker.log_file.read_text(errors="replace")

    def stop(self) -> None:
        self.broker.stop()


def start_secure_broker(pki: Pki, workdir: Path) -> SecureBroker:
    """Mosquitto on the ports the PKI was made for (``Pki.init(cert_port=free_port(), ...)``)."""
    conf_dir = workdir / "etc"
    shutil.copytree(pki.root / "broker", conf_dir)
    (workdir / "data").mkdir()
    cert_port, password_port = pki.settings["cert_port"], pki.settings["password_port"]
    config = workdir / "mosquitto.conf"
    config.write_text(
        render_broker_config(
            TEMPLATE.read_text(), conf_dir=conf_dir, data_dir=workdir / "data", cert_port=cert_port,
            password_port=password_port,
        )
    )  # fmt: skip
    broker = LocalBroker(
        host="127.0.0.1", port=cert_port, kind="mosquitto", workdir=workdir, log_file=workdir / "broker.log",
        config_file=config,
    )  # fmt: skip
    broker.restart()  # starts it (nothing to stop yet) and waits until it listens
    return SecureBroker(broker=broker, pki=pki, conf_dir=conf_dir, password_port=password_port)
