"""The --etcd-cafile/--etcd-certfile/--etcd-keyfile checks made before any connection.

A file that cannot be used at all is a startup error naming its flag (the daemon turns it
into one log line and exit status 1); nothing here talks to etcd.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.etcd_registry import EtcdRegistry, EtcdSettings, EtcdSetupError, check_tls_files
from tests.support.certs import Pki

URL = "https://127.0.0.1:2379"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def settings(pki: Pki, url: str = URL, **kw: str) -> EtcdSettings:
    files = {"cafile": str(pki.ca), "certfile": str(pki.cert("client")),
             "keyfile": str(pki.key("client"))}
    files.update(kw)
    return EtcdSettings((url,), **files)


def error(s: EtcdSettings) -> str:
    with pytest.raises(EtcdSetupError) as info:
        EtcdRegistry(s)
    return str(info.value)


def test_matching_files_pass(pki: Pki) -> None:
    check_tls_files(settings(pki))
    EtcdRegistry(settings(pki))  # builds its client without touching the network
    check_tls_files(settings(pki, certfile="", keyfile=""))  # server-only TLS


@pytest.mark.parametrize("flag", ["cafile", "certfile", "keyfile"])
def test_missing_file_names_its_flag(pki: Pki, tmp_path: Path, flag: str) -> None:
    missing = tmp_path / "nope.pem"
    msg = error(settings(pki, **{flag: str(missing)}))
    assert msg == f"--etcd-{flag}: cannot read {missing}: No such file or directory"


def test_unreadable_file_names_its_flag(pki: Pki, tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (who ignores permission bits).
    msg = error(settings(pki, keyfile=str(tmp_path)))
    assert msg.startswith(f"--etcd-keyfile: cannot read {tmp_path}: ")


def test_cafile_without_a_certificate(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert error(settings(pki, cafile=str(junk))) == (
        f"--etcd-cafile: {junk} holds no PEM certificate")
    # A key where the CA belongs is no better.
    assert "--etcd-cafile" in error(settings(pki, cafile=str(pki.key("client"))))


def test_certfile_and_keyfile_swapped(pki: Pki) -> None:
    msg = error(settings(pki, certfile=str(pki.key("client")), keyfile=str(pki.cert("client"))))
    assert msg == f"--etcd-certfile: {pki.key('client')} holds no PEM certificate"


def test_key_of_another_certificate(pki: Pki) -> None:
    msg = error(settings(pki, keyfile=str(pki.key("rogue"))))
    assert msg == (f"--etcd-keyfile: {pki.key('rogue')} is not the key of the certificate "
                   f"in --etcd-certfile {pki.cert('client')}")


def test_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.key("client").read_bytes(), None)
    locked = tmp_path / "locked-key.pem"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    msg = error(settings(pki, keyfile=str(locked)))
    assert msg == f"--etcd-keyfile: {locked} holds no usable private key (PEM, not encrypted)"


@pytest.mark.parametrize(("given", "missing"), [("certfile", "keyfile"), ("keyfile", "certfile")])
def test_cert_and_key_go_together(pki: Pki, given: str, missing: str) -> None:
    msg = error(settings(pki, **{missing: ""}))
    assert msg == (f"--etcd-{given} is set but --etcd-{missing} is not: a client "
                   "certificate needs both")


def test_tls_files_with_http_endpoints_are_named_in_a_warning(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.etcd_registry"):
        EtcdRegistry(settings(pki, url="http://127.0.0.1:2379"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "https://" in warnings[0] and "--etcd-cafile" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.etcd_registry"):
        EtcdRegistry(settings(pki))
    assert not caplog.records
