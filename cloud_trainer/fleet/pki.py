"""A small X.509 certificate authority for a fleet's broker: client and server certificates, and a CRL.

Keys are ECDSA P-256 (small, fast on devices, accepted by every TLS stack Mosquitto and Python
use). The CA's private key never leaves the cloud-side PKI directory (mode 0600); devices get
their own key and certificate, and the CA certificate to verify the broker with.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_trainer.errors import CloudTrainError

CA_DAYS = 3650
CERT_DAYS = 825
CRL_DAYS = 3650  # a CRL past its next-update makes OpenSSL refuse every client: keep it long, re-sign on revoke


class PkiError(CloudTrainError):
    """The PKI directory is missing, incomplete or unreadable."""


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 before a byte lands in it, replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM."""

    cert: x509.Certificate
    key_pem: bytes

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def serial(self) -> int:
        return self.cert.serial_number


class CertificateAuthority:
    """The CA in ``directory`` (``ca.crt``, ``ca.key``); :meth:`create` makes one, the constructor loads it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            self.cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        except OSError as exc:
            raise PkiError(
                f"no certificate authority in {directory}: {exc.strerror} (run `cloud-train pki init`)"
            ) from None
        except ValueError as exc:
            raise PkiError(f"the certificate authority in {directory} is unreadable: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / 'ca.key'} is not an EC private key")
        self._key = key

    @classmethod
    def create(cls, directory: Path, *, name: str) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "ca.key").exists():
            raise PkiError(f"a certificate authority already exists in {directory}")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(directory / "ca.key", _key_pem(key))
        write_public(directory / "ca.crt", cert_pem(cert))
        return cls(directory)

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(self, common_name: str, *, server_names: list[str] | None = None, days: int = CERT_DAYS) -> Issued:
        """A certificate for ``common_name``: a client certificate, or with ``server_names`` a server's."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if server_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(server_names)), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert=cert, key_pem=_key_pem(key))

    def crl_pem(self, revoked_serials: list[int]) -> bytes:
        """A CRL signed now, listing ``revoked_serials`` (an empty one is valid and needed too)."""
        now = datetime.now(timezone.utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - timedelta(minutes=5))
            .next_update(now + timedelta(days=CRL_DAYS))
        )
        for serial in sorted(revoked_serials):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _san(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries
