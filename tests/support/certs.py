"""Throw-away X.509 certificates for TLS tests, made with the `cryptography` package.

`Pki(dir, server_ips, server_names)` writes, as PEM files in `dir`:
- `ca.pem`: the CA that etcd trusts and that signed the server's and the good client's
  certificates;
- `server.pem`/`server-key.pem`: etcd's certificate (SAN: the given IPs and DNS names);
- `client.pem`/`client-key.pem`: a client certificate signed by the CA (CN `tweed`);
- `other-ca.pem`: a second, unrelated CA, and `rogue.pem`/`rogue-key.pem`, a client
  certificate signed by it: well formed, but not one etcd trusts;
- `expired.pem`/`expired-key.pem`: a client certificate from the right CA whose validity
  ended yesterday.
`issue_server(name, ips, names)` adds another server certificate from the same CA.
Keys are EC P-256: quick to make, and supported by both etcd and grpc.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_Key = ec.EllipticCurvePrivateKey


def _key() -> _Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: _Key) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class Pki:
    """A CA, a server and several client certificates (see the module docstring)."""

    def __init__(self, directory: Path, server_ips: tuple[str, ...] = ("127.0.0.1",),
                 server_names: tuple[str, ...] = ("localhost",)) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        # Back-dated an hour: a clock a little behind must not make fresh certificates invalid.
        self._valid = (now - dt.timedelta(hours=1), now + dt.timedelta(days=2))

        self._ca_key, self._ca_cert = ca_key, ca = self._ca("tweed test CA")
        other_key, other = self._ca("some other CA")
        _write_cert(self.ca, ca)
        _write_cert(self.other_ca, other)

        self.issue_server("server", server_ips, server_names)
        self._leaf("client", "tweed", ca_key, ca, [], ExtendedKeyUsageOID.CLIENT_AUTH)
        self._leaf("rogue", "tweed", other_key, other, [], ExtendedKeyUsageOID.CLIENT_AUTH)
        self._leaf("expired", "tweed", ca_key, ca, [], ExtendedKeyUsageOID.CLIENT_AUTH,
                   valid=(now - dt.timedelta(days=30), now - dt.timedelta(days=1)))

    # -- paths -------------------------------------------------------------------------
    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def other_ca(self) -> Path:
        return self.dir / "other-ca.pem"

    def cert(self, name: str) -> Path:
        """`<name>.pem`: name is server, client, rogue or expired."""
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}-key.pem"

    # -- making ------------------------------------------------------------------------
    def issue_server(self, name: str, ips: tuple[str, ...],
                     names: tuple[str, ...] = ()) -> None:
        """`<name>.pem`/`<name>-key.pem`: a server certificate from the CA for these SANs."""
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        self._leaf(name, "etcd", self._ca_key, self._ca_cert, sans,
                   ExtendedKeyUsageOID.SERVER_AUTH)

    def _ca(self, cn: str) -> tuple[_Key, x509.Certificate]:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._valid[0]).not_valid_after(self._valid[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def _leaf(self, name: str, cn: str, ca_key: _Key, ca: x509.Certificate,
              sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
              valid: tuple[dt.datetime, dt.datetime] | None = None) -> None:
        key = _key()
        start, end = valid or self._valid
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        _write_cert(self.cert(name), builder.sign(ca_key, hashes.SHA256()))
        _write_key(self.key(name), key)
