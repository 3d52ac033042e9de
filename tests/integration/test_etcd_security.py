"""etcd with TLS and client certificates, and with username/password auth: the registry and
the lease manager against a real etcd (Debian's etcd-server) set up that way.

Certificates are made per test (tests/support/certs.py). Each refusal must come as one
RegistryUnavailable whose message names the setting that fixes it, and a retry loop must
log it once, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.etcd_registry import EtcdRegistry, EtcdSettings
from agent.lease_codec import LeaseAttrs, encode_lease
from agent.lease_manager import LeaseManager
from agent.registry import RegistryUnavailable
from tests.support.aio import background, until
from tests.support.certs import Pki
from tests.support.etcd import ClientTls, Etcdctl, EtcdServer, ServerTls

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}})
USER, PASSWORD = "tweed", "s3cret-pw"


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(ipaddress.IPv4Address(f"192.168.100.{n}"), None, "host-gw", None)


def lease_json(n: int) -> str:
    return encode_lease(attrs(n)).decode()


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    return f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"


# -- servers --------------------------------------------------------------------------------
StartEtcd = Callable[..., EtcdServer]


@pytest.fixture
def start_etcd() -> Iterator[StartEtcd]:
    """Factory: start_etcd(**EtcdServer kwargs) -> a started etcd, closed after the test."""
    with contextlib.ExitStack() as stack:
        def start(**kw: object) -> EtcdServer:
            server = EtcdServer(**kw)  # type: ignore[arg-type]
            stack.callback(server.close)
            return server.start()

        yield start


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def mtls_server(start_etcd: StartEtcd, pki: Pki) -> EtcdServer:
    """etcd over https that only lets in clients with a certificate from pki.ca."""
    server = start_etcd(
        tls=ServerTls(pki.cert("server"), pki.key("server"), trusted_ca=pki.ca),
        ctl_tls=ClientTls(pki.ca, pki.cert("client"), pki.key("client")),
    )
    server.put(f"{PREFIX}/config", CONFIG)
    return server


def enable_auth(server: EtcdServer) -> None:
    """root, and user tweed whose role may read and write the flannel prefix only."""
    server.etcdctl("user", "add", "root:root-pw")
    server.etcdctl("role", "add", "flannel")
    server.etcdctl("role", "grant-permission", "flannel", "--prefix=true", "readwrite",
                   f"{PREFIX}/")
    server.etcdctl("user", "add", f"{USER}:{PASSWORD}")
    server.etcdctl("user", "grant-role", USER, "flannel")
    server.etcdctl("auth", "enable")
    server.user = "root:root-pw"


def tls_files(pki: Pki, client: str | None = "client", ca: Path | None = None) -> dict[str, str]:
    files = {"cafile": str(ca or pki.ca)}
    if client is not None:
        files |= {"certfile": str(pki.cert(client)), "keyfile": str(pki.key(client))}
    return files


@contextlib.asynccontextmanager
async def registry(*urls: str, **kw: str):
    reg = EtcdRegistry(EtcdSettings(urls, PREFIX, **kw))
    try:
        yield reg
    finally:
        await reg.close()


def manager_for(reg: EtcdRegistry, n: int = 1, **kw: object) -> LeaseManager:
    return LeaseManager(reg, parse_config(CONFIG), attrs(n), rng=random.Random(n),
                        backoff_cap=0.3, **kw)  # type: ignore[arg-type]


def answers_from(reg: EtcdRegistry, value: bytes) -> Callable[[], Awaitable[bool]]:
    async def pred() -> bool:
        try:
            return (await reg.get_config())[0] == value
        except RegistryUnavailable:
            return False

    return pred


async def refused_once(reg: EtcdRegistry, caplog: pytest.LogCaptureFixture) -> str:
    """Run acquire() until it has failed several times; the one line it logged."""
    calls = 0
    real = reg.list_subnets

    async def counting():
        nonlocal calls
        calls += 1
        return await real()

    reg.list_subnets = counting  # type: ignore[method-assign]
    m = manager_for(reg)
    with caplog.at_level(logging.INFO):
        async with background(m.acquire()) as (task,):
            await until(lambda: calls >= 5 or task.done(), limit=60)
            assert not task.done(), "acquire() must keep retrying, not give up"
    lines = [r for r in caplog.records if r.name.startswith("agent")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert m.lease is None and not m.etcd_reachable
    return lines[0].getMessage()


# -- TLS ------------------------------------------------------------------------------------
async def test_mtls_lease_acquired_watched_and_readable_over_tls(start_etcd, pki):
    etcd = mtls_server(start_etcd, pki)
    assert etcd.client_url.startswith("https://127.0.0.1:")
    seen = []

    async def on_batch(batch):
        seen.extend(batch)

    async with registry(etcd.client_url, **tls_files(pki)) as reg:
        m = manager_for(reg)
        lease = await asyncio.wait_for(m.acquire(), 30)
        async with background(m.watch(on_batch)):
            etcd.put(f"{PREFIX}/subnets/10.5.99.0-24", lease_json(9))
            await until(lambda: any(ev.lease.attrs.public_ip.packed[-1] == 9 for ev in seen),
                        limit=30)
    # etcdctl over TLS, with its own client certificate, reads flanneld's lease JSON.
    assert etcd.get(subnet_key(lease.subnet)) == lease_json(1)

    # The server really demands TLS and a client certificate from its CA: the same read
    # without a client certificate, with a rogue one, or in plain http fails.
    key = subnet_key(lease.subnet)
    for tls in (ClientTls(pki.ca), ClientTls(pki.ca, pki.cert("rogue"), pki.key("rogue"))):
        with pytest.raises(RuntimeError):
            Etcdctl(etcd.client_url, tls=tls).etcdctl("get", key, command_timeout=3)
    with pytest.raises(RuntimeError):
        Etcdctl(f"http://127.0.0.1:{etcd.port}").etcdctl("get", key, command_timeout=3)


@pytest.mark.parametrize(("client", "expected"), [
    ("rogue", "TLS: etcd refused the client certificate --etcd-certfile {cert}: not signed "
              "by a CA that etcd trusts (its --trusted-ca-file), or expired"),
    ("expired", "TLS: etcd refused the client certificate --etcd-certfile {cert}: not signed "
                "by a CA that etcd trusts (its --trusted-ca-file), or expired"),
    (None, "TLS: etcd demands a client certificate: set --etcd-certfile and --etcd-keyfile"),
])
async def test_client_certificate_refused_by_etcd(start_etcd, pki, caplog, client, expected):
    etcd = mtls_server(start_etcd, pki)
    want = expected.format(cert=pki.cert(client) if client else "")
    async with registry(etcd.client_url, **tls_files(pki, client)) as reg:
        with pytest.raises(RegistryUnavailable) as info:
            await reg.get_config()
        assert str(info.value) == f"etcd get config: {want}"
        line = await refused_once(reg, caplog)
    assert line == f"acquiring a subnet lease: etcd list subnets: {want} (retrying with backoff)"
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}


async def test_server_certificate_not_from_our_cafile(start_etcd, pki, caplog):
    etcd = mtls_server(start_etcd, pki)
    async with registry(etcd.client_url, **tls_files(pki, ca=pki.other_ca)) as reg:
        with pytest.raises(RegistryUnavailable) as info:
            await reg.get_config()
        assert str(info.value) == (
            f"etcd get config: TLS: etcd's server certificate is not trusted by --etcd-cafile "
            f"{pki.other_ca} (unable to get local issuer certificate)")
        line = await refused_once(reg, caplog)
    assert "not trusted by --etcd-cafile" in line
    # No --etcd-cafile at all: the system's CAs are used, and they do not know our test CA.
    async with registry(etcd.client_url, **tls_files(pki) | {"cafile": ""}) as reg:
        with pytest.raises(RegistryUnavailable, match=r"not trusted by the system's CAs "
                           r"\(no --etcd-cafile given\)"):
            await reg.get_config()


async def test_server_certificate_for_another_name(start_etcd, tmp_path):
    # The server's certificate names 127.0.0.1 only: reaching it as "localhost" (the same
    # address) is refused, since the name in the URL is what gets verified.
    pki = Pki(tmp_path / "pki", server_ips=("127.0.0.1",), server_names=())
    etcd = start_etcd(
        tls=ServerTls(pki.cert("server"), pki.key("server"), trusted_ca=pki.ca),
        ctl_tls=ClientTls(pki.ca, pki.cert("client"), pki.key("client")),
    )
    async with registry(f"https://localhost:{etcd.port}", **tls_files(pki)) as reg:
        with pytest.raises(RegistryUnavailable) as info:
            await reg.get_config()
    assert str(info.value) == (
        "etcd get config: TLS: etcd's server certificate does not hold 'localhost', the name "
        "tweed verifies (the first host name, else the first address, in --etcd-endpoints: "
        "every member's certificate must hold it)")
    # The same server by the address the certificate holds works.
    async with registry(etcd.client_url, **tls_files(pki)) as reg:
        value, _ = await reg.get_config()
    assert value is None


async def test_several_https_endpoints_by_address(start_etcd, pki):
    """Two TLS etcds on two loopback addresses, given as IPs. grpc verifies one name per
    channel (the first address): before, it checked the whole address list, and no call
    ever went through. A member whose certificate also holds the first address is used
    too, and carries on alone when the first one stops; one whose certificate does not is
    refused with the name it lacks."""
    pki.issue_server("both", ("127.0.0.2", "127.0.0.1"))
    pki.issue_server("own", ("127.0.0.2",))
    ctl = ClientTls(pki.ca, pki.cert("client"), pki.key("client"))
    first = start_etcd(tls=ServerTls(pki.cert("server"), pki.key("server"), pki.ca),
                       ctl_tls=ctl)
    second = start_etcd(host="127.0.0.2", tls=ServerTls(pki.cert("both"), pki.key("both"),
                                                        pki.ca), ctl_tls=ctl)
    first.put(f"{PREFIX}/config", "first")
    second.put(f"{PREFIX}/config", "second")
    urls = (first.client_url, second.client_url)
    # Calls go to one member at a time, a random one at start: try each start.
    for start, value in ((0, b"first"), (1, b"second")):
        async with registry(*urls, **tls_files(pki)) as reg:
            reg._current = start
            assert (await reg.get_config())[0] == value
    async with registry(*urls, **tls_files(pki)) as reg:
        reg._current = 0
        assert (await reg.get_config())[0] == b"first"
        first.stop()
        # The first member refuses the connection: the same call goes to the second.
        for _ in range(5):
            assert (await reg.get_config())[0] == b"second"
        assert reg.member_switches == {"unreachable": 1}

    # The second member with a certificate for its own address only.
    second.stop()
    second.server_tls = ServerTls(pki.cert("own"), pki.key("own"), pki.ca)
    second.start()
    async with registry(*urls, **tls_files(pki)) as reg:
        reg._current = 1
        with pytest.raises(RegistryUnavailable) as info:
            await reg.get_config()
    assert "does not hold '127.0.0.1', the name tweed verifies" in str(info.value)


async def test_tls_client_against_a_plain_etcd(start_etcd, pki):
    etcd = start_etcd()
    async with registry(f"https://127.0.0.1:{etcd.port}", **tls_files(pki)) as reg:
        with pytest.raises(RegistryUnavailable, match=r"TLS: the server closed the connection "
                           r"during the TLS handshake \(does it serve TLS\? a plain etcd "
                           r"needs http:// in --etcd-endpoints\)"):
            await reg.get_config()


# -- username and password -------------------------------------------------------------------
async def test_login_with_username_and_password(start_etcd):
    etcd = start_etcd()
    etcd.put(f"{PREFIX}/config", CONFIG)
    enable_auth(etcd)
    # Auth is really on: without a user etcdctl is turned away.
    with pytest.raises(RuntimeError, match="user name is empty"):
        Etcdctl(etcd.client_url).etcdctl("get", f"{PREFIX}/config")
    async with registry(etcd.client_url, username=USER, password=PASSWORD) as reg:
        assert (await reg.get_config())[0] == CONFIG.encode()
        lease = await asyncio.wait_for(manager_for(reg).acquire(), 30)
        assert reg.logins == 1
    assert etcd.get(subnet_key(lease.subnet)) == lease_json(1)


@pytest.mark.parametrize(("creds", "expected"), [
    ({"username": USER, "password": "wrong"},
     f"etcd login as {USER!r} refused: wrong --etcd-username or --etcd-password "
     "(INVALID_ARGUMENT etcdserver: authentication failed, invalid user ID or password)"),
    ({"username": "nobody", "password": PASSWORD},
     "etcd login as 'nobody' refused: wrong --etcd-username or --etcd-password "
     "(INVALID_ARGUMENT etcdserver: authentication failed, invalid user ID or password)"),
    ({}, "etcd get config: etcd has authentication enabled: set --etcd-username and "
         "--etcd-password (INVALID_ARGUMENT etcdserver: user name is empty)"),
])
async def test_login_refused_names_the_setting(start_etcd, caplog, creds, expected):
    etcd = start_etcd()
    etcd.put(f"{PREFIX}/config", CONFIG)
    enable_auth(etcd)
    async with registry(etcd.client_url, **creds) as reg:
        with pytest.raises(RegistryUnavailable) as info:
            await reg.get_config()
        assert str(info.value) == expected
        line = await refused_once(reg, caplog)
    assert expected.split(" (")[0].split(": ", 1)[-1] in line


async def test_user_without_permission_on_the_prefix(start_etcd):
    etcd = start_etcd()
    enable_auth(etcd)
    etcd.etcdctl("user", "add", "outsider:pw")
    async with registry(etcd.client_url, username="outsider", password="pw") as reg:
        with pytest.raises(RegistryUnavailable) as info:
            await reg.get_config()
    assert str(info.value) == (
        f"etcd get config: etcd user 'outsider' may not use {PREFIX!r}: grant its role "
        "readwrite on that prefix (KV.Range failed: etcdserver: permission denied)")


async def test_expired_token_means_a_new_login_for_calls_and_watches(start_etcd, caplog):
    """etcd forgets a simple token after --auth-token-ttl seconds unused: renewals and
    watches made after that log in again, silently, and keep working."""
    etcd = start_etcd(extra_args=("--auth-token-ttl", "1"))
    etcd.put(f"{PREFIX}/config", CONFIG)
    enable_auth(etcd)
    async with registry(etcd.client_url, username=USER, password=PASSWORD) as reg:
        # Renewal every 6 s (TTL 60, margin capped at 90%): the token is gone in between.
        m = manager_for(reg, ttl=60, renew_margin=54)
        with caplog.at_level(logging.INFO):
            lease = await asyncio.wait_for(m.acquire(), 30)
            assert reg.logins == 1
            async with background(m.hold(lambda lease: asyncio.sleep(0))):
                await until(lambda: m.counters.renewals >= 2, limit=60)
            assert reg.logins >= 2  # each renewal after an expiry logged in again
            assert m.lease is not None and m.lease.subnet == lease.subnet
            assert m.counters.reacquisitions == 0
            # A watch created after the token expired: etcd cancels it at once ("invalid
            # auth token"); the registry logs in and creates it again, the caller sees
            # nothing. Poll until a watch did need that new login.
            before = reg.logins
            got = None
            for _ in range(30):
                await asyncio.sleep(1.5)
                rev = etcd.revision()  # asked by etcdctl: our token stays untouched
                n = reg.logins
                async with contextlib.aclosing(reg.watch_subnets(rev + 1)) as stream:
                    assert await asyncio.wait_for(anext(stream), 10) == []  # created
                    if reg.logins > n:
                        etcd.put(f"{PREFIX}/subnets/10.5.99.0-24", lease_json(9))
                        got = await asyncio.wait_for(anext(stream), 10)
                        break
            assert got is not None and reg.logins > before, "no watch after an expiry seen"
            assert [(e.kind, e.name, e.value) for e in got] == [
                ("put", "10.5.99.0-24", lease_json(9).encode())]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert json.loads(etcd.get(subnet_key(lease.subnet)))["PublicIP"] == "192.168.100.1"


async def test_username_against_etcd_without_auth_is_not_an_error(start_etcd):
    etcd = start_etcd()
    etcd.put(f"{PREFIX}/config", CONFIG)
    async with registry(etcd.client_url, username=USER, password="any") as reg:
        assert (await reg.get_config())[0] == CONFIG.encode()
        assert (await reg.list_subnets()).records == []
        assert reg.logins == 1  # asked once, told auth is off, not asked again


async def test_tls_and_auth_together(start_etcd, pki):
    """mTLS and a user: the token decides who we are. Without a username etcd takes the
    user from the client certificate's common name ("tweed" here), its own feature."""
    etcd = mtls_server(start_etcd, pki)
    enable_auth(etcd)
    async with registry(etcd.client_url, **tls_files(pki), username=USER,
                        password=PASSWORD) as reg:
        lease = await asyncio.wait_for(manager_for(reg).acquire(), 30)
        assert reg.logins == 1
    assert etcd.get(subnet_key(lease.subnet)) == lease_json(1)
    async with registry(etcd.client_url, **tls_files(pki)) as reg:
        assert (await reg.get_config())[0] == CONFIG.encode()
        assert reg.logins == 0
    # A wrong password is refused even though the certificate would do.
    async with registry(etcd.client_url, **tls_files(pki), username=USER,
                        password="wrong") as reg:
        with pytest.raises(RegistryUnavailable, match="wrong --etcd-username or "
                           "--etcd-password"):
            await reg.get_config()
