"""EtcdRegistry: the Registry over etcd's v3 API, through etcd3aio (asyncio over grpc.aio).

Layout is flanneld's: `<prefix>/config` and `<prefix>/subnets/<key>`, each subnet key
attached to its own etcd lease. Every unary call has a deadline and is tried once; the
caller owns retries and backoff, so an outage is reported once per state change by the
caller instead of once per attempt here. The watch is our own loop over the Watch stub so
that we decide the resume revision (the last event seen + 1) and see compaction.

Members: each address in --etcd-endpoints gets its own channel, and all calls go to one
member at a time (a random one at start). Every call and watch carries etcd's
require-leader metadata, so a member cut off from the quorum says "no leader" instead of
holding a silent watch; a member that says so, cannot be reached or does not answer in
time is left for the next one. A call refused before the member did anything with it
(no leader, no connection) is sent again at once through the next member; the caller's
retry of anything else, and the watch resumed from its last revision, go there too.

Security: `https://` endpoints speak TLS (the scheme decides, as in flanneld); the
certificate files are checked when the registry is made, so an unusable one is a startup
error naming its flag. A handshake that fails later (etcd rejects our certificate, or we
reject etcd's) is reported in terms of the flag that fixes it. With a username, tweed logs
in before the first call and again whenever etcd says the token is no longer valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import (
    Etcd3Client,
    EtcdError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub

from agent.options import EtcdSettings
from agent.registry import Compacted, Event, Record, RegistryUnavailable, Snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Deadline of every unary RPC, in seconds.
RPC_TIMEOUT = 5.0

#: grpc's channel has its own reconnect backoff (1 s growing to 120 s) and fails RPCs at
#: once while it waits, so after a long etcd outage the agent stayed cut off for up to two
#: minutes after etcd was back (measured: 40 s after a 150 s outage), whatever our own
#: capped backoff said. Capped well below ours, our retries decide when we are back.
GRPC_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

#: etcd's require-leader metadata (clientv3's WithRequireLeader): a member that has no
#: leader refuses the call with "no leader", and ends a watch it holds after three election
#: timeouts without one, instead of serving stale reads and silent watches.
REQUIRE_LEADER = (("hasleader", "true"),)

#: Keys per range request when listing the leases (a lease is ~100-150 bytes of value).
LIST_PAGE_SIZE = 1000


class EtcdSetupError(ValueError):
    """The etcd settings cannot work (bad endpoint URL, unreadable certificate)."""


def parse_endpoints(urls: tuple[str, ...]) -> tuple[list[str], bool, str | None]:
    """Turn `http(s)://host:port` URLs into grpc targets, TLS flag and TLS name.

    One target per member address: `ipv4:10.0.0.1:2379` or `ipv6:[fd00::1]:2379` (grpc's
    own resolver for a bracketed IPv6 literal gives "Address family for hostname not
    supported"). Names are resolved here, once, to their IPv4 addresses (their IPv6 ones
    if they have none). grpc verifies one name per channel: the first name seen, else the
    first address (left to grpc, it would check every server against the whole address
    list, which no certificate holds, so several https:// IP endpoints never worked).
    """
    if not urls:
        # etcd3aio would fall back to localhost:2379 without a word.
        raise EtcdSetupError("--etcd-endpoints is empty: give at least one etcd client URL, "
                             "e.g. --etcd-endpoints=http://127.0.0.1:2379")
    targets: list[str] = []
    schemes = set()
    server_name: str | None = None
    first_host: str | None = None
    for url in urls:
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            host = parts.hostname
            port = parts.port or 2379
        except ValueError:
            hint = (" (an IPv6 address goes in brackets: http://[fd00::1]:2379)"
                    if url.count(":") > 2 else "")
            raise EtcdSetupError(f"--etcd-endpoints: {url!r} is not http(s)://host:port"
                                 f"{hint}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise EtcdSetupError(f"--etcd-endpoints: {url!r} is not http(s)://host:port")
        schemes.add(parts.scheme)
        first_host = first_host or host
        try:
            addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
                ipaddress.ip_address(host)]
        except ValueError:
            if server_name is None:
                server_name = host
            addrs = _resolve(host, port)
        for addr in addrs:
            target = (f"ipv4:{addr}:{port}" if addr.version == 4 else f"ipv6:[{addr}]:{port}")
            if target not in targets:
                targets.append(target)
    if len(schemes) > 1:
        raise EtcdSetupError("--etcd-endpoints: mixes http and https endpoints")
    if server_name is None:
        server_name = first_host
    return targets, schemes == {"https"}, server_name


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IPv4 addresses of `host`, else its IPv6 ones; EtcdSetupError if it has none."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        raise EtcdSetupError(f"--etcd-endpoints: cannot resolve {host!r}: {exc}") from None
    # info[4][0] is the address; an IPv6 one may carry a %scope, which grpc cannot take.
    found = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    v4: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = sorted(
        (a for a in found if a.version == 4), key=int)
    return v4 or sorted(found, key=int)


def member_label(target: str) -> str:
    """`ipv4:10.0.0.1:2379` -> `10.0.0.1:2379`, `ipv6:[fd00::1]:2379` -> `[fd00::1]:2379`."""
    return target.split(":", 1)[1]


def check_tls_files(settings: EtcdSettings) -> None:
    """EtcdSetupError naming the flag if a TLS file is missing, unreadable or unusable.

    grpc would only fail at the first handshake, with words like "Failed to create security
    handshaker"; Python's ssl module parses the same PEM files up front.
    """
    s = settings
    if bool(s.certfile) != bool(s.keyfile):
        given, missing = (
            ("--etcd-certfile", "--etcd-keyfile") if s.certfile
            else ("--etcd-keyfile", "--etcd-certfile"))
        raise EtcdSetupError(f"{given} is set but {missing} is not: a client certificate "
                             "needs both")
    for flag, path in (("--etcd-cafile", s.cafile), ("--etcd-certfile", s.certfile)):
        if not path:
            continue
        _read(path, flag)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        except ssl.SSLError:
            raise EtcdSetupError(f"{flag}: {path} holds no PEM certificate") from None
    if s.keyfile:
        _read(s.keyfile, "--etcd-keyfile")
        try:
            # The password callback keeps OpenSSL from prompting on a terminal for an
            # encrypted key (grpc cannot use one anyway).
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                s.certfile, s.keyfile, password=lambda: b"")
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise EtcdSetupError(f"--etcd-keyfile: {s.keyfile} is not the key of the "
                                     f"certificate in --etcd-certfile {s.certfile}") from None
            raise EtcdSetupError(f"--etcd-keyfile: {s.keyfile} holds no usable private key "
                                 "(PEM, not encrypted)") from None


def _read(path: str, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise EtcdSetupError(f"{flag}: cannot read {path}: {exc.strerror}") from None


class EtcdRegistry:
    """Registry over a real etcd cluster."""

    def __init__(self, settings: EtcdSettings, page_size: int = LIST_PAGE_SIZE) -> None:
        targets, tls, server_name = parse_endpoints(settings.endpoints)
        check_tls_files(settings)
        # All None: a plain channel (etcd3aio's defaults).
        ca: bytes | None = None
        cert_key: bytes | None = None
        cert_chain: bytes | None = None
        if tls:
            ca = _read(settings.cafile, "--etcd-cafile")
            if ca is None:
                # No CA given: trust the system store, as flanneld does.
                ca = _system_ca()
            cert_key = _read(settings.keyfile, "--etcd-keyfile")
            cert_chain = _read(settings.certfile, "--etcd-certfile")
        elif settings.cafile or settings.certfile:
            # flanneld does the same (the scheme decides); say so, as it is easy to miss.
            log.warning("--etcd-endpoints are http://, so --etcd-cafile/--etcd-certfile/"
                        "--etcd-keyfile are not used; write https:// to talk TLS to etcd")
        self._tls = tls
        self._server_name = server_name
        self._members: list[_Member] = []
        for target in targets:
            client = Etcd3Client(
                ["unused"], rpc_max_attempts=1, tls_server_name=server_name, ca_cert=ca,
                cert_key=cert_key, cert_chain=cert_chain,
            )
            # etcd3aio builds an `ipv4:` target from its endpoint list; ours is one member's
            # address, IPv6 included. It takes no channel options either: both are read
            # when the channel is made.
            client._manager.target = target
            client._manager.grpc_options.extend(GRPC_RECONNECT_OPTIONS)
            self._members.append(_Member(target, client))
        # Agents given the same list spread over the members, as etcd's v2 client did.
        self._current = random.randrange(len(self._members))
        self._token: str | None = None
        # Whether a call worked since the last switch (a switch away from a member that
        # worked is news; cycling through members that all fail is the caller's outage).
        self._current_ok = False
        self._switched = False
        # Watched key -> the member of its last stream, to say when a watch moved.
        self._watch_member: dict[bytes, int] = {}
        #: why -> how many times tweed moved to another member, for
        #: tweed_etcd_member_switches_total.
        self.member_switches: dict[str, int] = {}
        self._settings = settings
        #: Keys per range request of list_subnets.
        self.page_size = page_size
        prefix = settings.prefix.rstrip("/")
        self._config_key = f"{prefix}/config".encode()
        self._subnets = f"{prefix}/subnets/".encode()
        self._auth_lock = asyncio.Lock()
        # Counts logins: a call refused for its token marks the login stale only if it was
        # made with the current one, so concurrent refusals cause a single new login.
        self._login = 0
        self._logged_in = False
        #: (operation, "ok" | "error") -> count, for tweed_etcd_requests_total.
        self.requests: dict[tuple[str, str], int] = {}

    @property
    def logins(self) -> int:
        """How many times tweed has logged in to etcd (or found auth disabled)."""
        return self._login

    # -- plumbing ------------------------------------------------------------------
    @property
    def member(self) -> str:
        """The member (`address:port`) that calls and new watches go to."""
        return self._members[self._current].label

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = (("token", self._token),) if self._token else ()
        return token + REQUIRE_LEADER

    def _set_metadata(self, client: Etcd3Client) -> None:
        """Token (if any) and require-leader on every call of `client`'s services."""
        meta = self._metadata()
        for svc in (client.auth, client.cluster, client.kv, client.lease, client.maintenance,
                    client.watch):
            if svc is not None:
                svc._metadata = meta

    def _set_token(self, token: str | None) -> None:
        self._token = token
        for m in self._members:
            if m.connected:
                self._set_metadata(m.client)

    async def _ensure(self) -> Etcd3Client:
        m = self._members[self._current]
        if not m.connected:
            await m.client.connect()
            m.connected = True
            self._set_metadata(m.client)
            if len(self._members) > 1 and not self._switched:
                log.info("etcd: talking to member %s (of %d in --etcd-endpoints)", m.label,
                         len(self._members))
        # Not only after connecting: a first login that failed (etcd away, wrong password)
        # must be tried again, or every later call would go without a token.
        if self._settings.username and not self._logged_in:
            await self._authenticate(m.client)
        return m.client

    async def _authenticate(self, client: Etcd3Client) -> None:
        """Log in, unless another call did so while this one waited for the lock."""
        async with self._auth_lock:
            if self._logged_in:
                return
            assert client.auth is not None
            # Without this the stale token rides along on the Authenticate call itself and
            # etcd refuses it with "invalid auth token": after the first expiry tweed could
            # never log in again.
            self._set_token(None)
            self._logged_in = False
            user = self._settings.username
            try:
                resp = await client.auth.authenticate(
                    user, self._settings.password, timeout=RPC_TIMEOUT
                )
            except (EtcdError, grpc.aio.AioRpcError) as exc:
                detail = _detail(exc)
                if "authentication is not enabled" in detail:
                    # As etcd's own client does: no auth on the server, no token needed.
                    log.debug("etcd has authentication disabled; not logging in as %r", user)
                    self._logged_in = True
                    self._login += 1
                    return
                if "authentication failed" in detail:
                    raise RegistryUnavailable(
                        f"etcd login as {user!r} refused: wrong --etcd-username or "
                        f"--etcd-password ({detail})") from None
                raise
            # A token is good on every member: etcd hands it out through its raft log.
            self._set_token(resp.token)
            self._logged_in = True
            self._login += 1

    def _worked(self) -> None:
        """A call through the current member worked."""
        if self._switched and not self._current_ok:
            log.info("etcd: now talking to member %s", self.member)
        self._current_ok = True

    def _leave(self, index: int, what: str, detail: str) -> None:
        """A call through member `index` failed in a way another member may not: move on.

        Only if that member is still the current one (concurrent calls fail together) and
        there is another. Logged when leaving a member that worked; cycling through
        members that all fail is an outage, which the caller logs once.
        """
        if index != self._current or len(self._members) < 2:
            return
        old = self._members[index].label
        self._current = (index + 1) % len(self._members)
        self._switched = True
        why = "no_leader" if "no leader" in detail else "unreachable"
        self.member_switches[why] = self.member_switches.get(why, 0) + 1
        level = logging.WARNING if self._current_ok else logging.DEBUG
        self._current_ok = False
        if why == "no_leader":
            reason = ("it has no leader: cut off from the other members, or the cluster "
                      "lost its quorum")
        else:
            reason = detail
        log.log(level, "etcd member %s: %s failed (%s); switching to member %s", old, what,
                reason, self.member)

    def _count(self, what: str, result: str) -> None:
        key = (what.replace(" ", "_"), result)
        self.requests[key] = self.requests.get(key, 0) + 1

    async def _call(
        self, what: str, fn: Callable[[Etcd3Client], Awaitable[T]], count: bool = True
    ) -> T:
        """Run one RPC; map every failure to RegistryUnavailable with a clear message.

        Counted once per call under `what`, whatever the retries inside (a new login).
        """
        try:
            result = await self._rpc(what, fn)
        except RegistryUnavailable:
            if count:
                self._count(what, "error")
            raise
        if count:
            self._count(what, "ok")
        return result

    async def _rpc(self, what: str, fn: Callable[[Etcd3Client], Awaitable[T]]) -> T:
        relogged = False
        hops = 0
        first: str | None = None  # the first member's failure, reported if all fail
        while True:
            login = self._login
            index = self._current
            try:
                client = await self._ensure()
                result = await fn(client)
            except RegistryUnavailable:
                raise
            except (EtcdUnauthenticatedError, grpc.aio.AioRpcError, EtcdError,
                    TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    detail = f"no answer in {RPC_TIMEOUT:g} s"
                else:
                    detail = _detail(exc)
                if self._settings.username and _token_refused(detail) and not relogged:
                    # Tokens expire (etcd's default TTL is 5 minutes): log in again, once.
                    relogged = True
                    self._token_stale(login)
                    continue
                if _member_trouble(exc):
                    self._leave(index, f"etcd {what}", detail)
                    if _not_sent(detail) and hops < len(self._members) - 1:
                        # Refused before etcd did anything (no leader, no connection):
                        # safe to send again at once, through the next member.
                        first = first or detail
                        hops += 1
                        continue
                also = f" (and {hops} other members)" if hops else ""
                raise RegistryUnavailable(
                    f"etcd {what}: {self._explain(first or detail)}{also}") from None
            if index == self._current:
                self._worked()
            return result

    def _token_stale(self, login: int) -> None:
        """etcd refused the token of login number `login`: log in again if still current."""
        if login == self._login:
            self._logged_in = False

    def _explain(self, detail: str) -> str:
        """grpc's words for a failure, turned into the setting that fixes it if we can."""
        s = self._settings
        if "user name is empty" in detail:
            return (f"etcd has authentication enabled: set --etcd-username and "
                    f"--etcd-password ({detail})")
        if "permission denied" in detail and s.username:
            return (f"etcd user {s.username!r} may not use {s.prefix!r}: grant its role "
                    f"readwrite on that prefix ({detail})")
        if not self._tls:
            return detail
        if "CERTIFICATE_VERIFY_FAILED" in detail:
            why = detail.split("CERTIFICATE_VERIFY_FAILED:", 1)[1].split(":")[0].strip()
            ca = (f"--etcd-cafile {s.cafile}" if s.cafile
                  else "the system's CAs (no --etcd-cafile given)")
            return f"TLS: etcd's server certificate is not trusted by {ca} ({why})"
        if "Hostname Verification" in detail or "not in peer certificate" in detail:
            return (f"TLS: etcd's server certificate does not hold {self._server_name!r}, "
                    "the name tweed verifies (the first host name, else the first address, "
                    "in --etcd-endpoints: every member's certificate must hold it)")
        if any(alert in detail for alert in _CLIENT_CERT_REFUSED):
            # With TLS 1.3 the server's verdict on our certificate comes after the handshake,
            # so grpc only sees the alert as a record it cannot decrypt.
            if s.certfile:
                return (f"TLS: etcd refused the client certificate --etcd-certfile "
                        f"{s.certfile}: not signed by a CA that etcd trusts "
                        f"(its --trusted-ca-file), or expired")
            return ("TLS: etcd demands a client certificate: set --etcd-certfile and "
                    "--etcd-keyfile")
        if "Handshake read failed" in detail:
            return ("TLS: the server closed the connection during the TLS handshake (does it "
                    f"serve TLS? a plain etcd needs http:// in --etcd-endpoints) ({detail})")
        return detail

    def _name(self, key: bytes) -> str:
        return key[len(self._subnets) :].decode(errors="replace")

    # -- Registry ------------------------------------------------------------------
    async def get_config(self) -> tuple[bytes | None, int]:
        async def op(c: Etcd3Client) -> Any:
            assert c.kv is not None
            return await c.kv.get(self._config_key, timeout=RPC_TIMEOUT)

        resp = await self._call("get config", op)
        value = resp.kvs[0].value if resp.kvs else None
        return value, resp.header.revision

    async def watch_config(
        self, start_revision: int
    ) -> AsyncGenerator[tuple[bytes | None, int], None]:
        async with contextlib.aclosing(
            self._watch(self._config_key, b"", start_revision)
        ) as stream:
            async for batch in stream:
                if batch:
                    last = batch[-1]
                    yield (last.value if last.kind == "put" else None), last.revision

    async def list_subnets(self) -> Snapshot:
        """The leases in pages of `page_size` keys, all read at the first page's revision.

        One range request for 20,000 leases is one response of several MB that etcd builds,
        and we decode, all at once. Each following page continues after the last key and
        is read at the revision of the first (a serializable read: the member already has
        that revision), so the snapshot is one consistent revision and a change made
        meanwhile arrives through the watch from revision + 1. If that revision is
        compacted away between pages, the listing starts again at a newer one.
        """
        for attempt in range(3):
            try:
                return await self._list_pages()
            except _RevisionCompacted:
                log.info("the lease listing's revision was compacted while paging; "
                         "listing again (attempt %d)", attempt + 2)
        return await self._list_pages()

    async def _list_pages(self) -> Snapshot:
        end = prefix_range_end(self._subnets)
        start = self._subnets
        revision = 0
        records: list[Record] = []
        while True:
            async def op(c: Etcd3Client, start: bytes = start, revision: int = revision) -> Any:
                assert c.kv is not None
                return await c.kv.get(start, end, limit=self.page_size, revision=revision,
                                      serializable=revision != 0, timeout=RPC_TIMEOUT)

            try:
                resp = await self._call("list subnets", op)
            except RegistryUnavailable as exc:
                if revision and "compacted" in str(exc):
                    raise _RevisionCompacted from None
                raise
            if not revision:
                revision = resp.header.revision
            records += [Record(self._name(kv.key), kv.value, kv.lease, kv.mod_revision)
                        for kv in resp.kvs]
            if not resp.more or not resp.kvs:
                return Snapshot(records, revision)
            # The smallest key after the last one read.
            start = resp.kvs[-1].key + b"\0"

    async def _grant(self, ttl: int) -> int:
        if ttl <= 0:
            return 0

        async def op(c: Etcd3Client) -> Any:
            assert c.lease is not None
            return await c.lease.grant(ttl=ttl, timeout=RPC_TIMEOUT)

        return int((await self._call("grant lease", op)).ID)

    async def _revoke(self, lease_id: int) -> None:
        if not lease_id:
            return

        async def op(c: Etcd3Client) -> Any:
            assert c.lease is not None
            return await c.lease.revoke(lease_id, timeout=RPC_TIMEOUT)

        try:
            await self._call("revoke lease", op)
        except RegistryUnavailable as exc:
            # Harmless: an unused lease expires by itself.
            log.debug("could not revoke unused lease %x: %s", lease_id, exc)

    async def _txn_put(
        self, what: str, name: str, value: bytes, ttl: int, compare: Any
    ) -> int | None:
        lease = await self._grant(ttl)
        key = self._subnets + name.encode()

        async def op(c: Etcd3Client) -> Any:
            assert c.kv is not None
            return await c.kv.txn(
                [compare(c.kv, key)],
                [c.kv.txn_op_put(key, value, lease=lease)],
                timeout=RPC_TIMEOUT,
            )

        try:
            resp = await self._call(what, op)
        except RegistryUnavailable:
            await self._revoke(lease)
            raise
        if not resp.succeeded:
            await self._revoke(lease)
            return None
        return int(resp.header.revision)

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> int | None:
        return await self._txn_put(
            "create subnet", name, value, ttl, lambda kv, key: kv.txn_compare_version(key, 0)
        )

    async def update_subnet(
        self, name: str, value: bytes, ttl: int, if_mod_revision: int
    ) -> int | None:
        from etcd3aio._protobuf import Compare

        def compare(kv: Any, key: bytes) -> Any:
            return Compare(
                result=Compare.EQUAL, target=Compare.MOD, key=key, mod_revision=if_mod_revision
            )

        return await self._txn_put("update subnet", name, value, ttl, compare)

    async def delete_subnet(self, name: str) -> None:
        async def op(c: Etcd3Client) -> Any:
            assert c.kv is not None
            return await c.kv.delete(self._subnets + name.encode(), timeout=RPC_TIMEOUT)

        await self._call("delete subnet", op)

    def watch_subnets(self, start_revision: int) -> AsyncGenerator[list[Event], None]:
        return self._watch(self._subnets, prefix_range_end(self._subnets), start_revision)

    async def _watch(
        self, key: bytes, range_end: bytes, start_revision: int
    ) -> AsyncGenerator[list[Event], None]:
        """One watch stream; ends by raising (Compacted / RegistryUnavailable), never silently.

        etcd checks the token only when a watch is created, so a watch made after the token
        expired (or after etcd restarted, which forgets simple tokens) is cancelled at once:
        log in again and create it once more, instead of a retry round and its log lines.
        """
        # Counted as watch_subnets/watch_config requests: ok when etcd confirms a stream,
        # error when one cannot be made or breaks (a compaction is neither).
        op = "watch_subnets" if key == self._subnets else "watch_config"
        for attempt in (1, 2):
            try:
                async with contextlib.aclosing(
                    self._watch_stream(key, range_end, start_revision)
                ) as stream:
                    async for batch in stream:
                        yield batch
            except _StaleToken as exc:
                self._count(op, "error")
                if attempt == 2:
                    raise RegistryUnavailable(str(exc)) from None
            except RegistryUnavailable:
                self._count(op, "error")
                raise
        raise AssertionError("unreachable")

    async def _watch_stream(
        self, key: bytes, range_end: bytes, start_revision: int
    ) -> AsyncGenerator[list[Event], None]:
        client = await self._call("watch", lambda c: _noop(c), count=False)
        login = self._login  # the token this watch is created with
        index = self._current
        member = self._members[index].label
        assert client._channel is not None
        stub = WatchStub(client._channel)
        stop = asyncio.Event()
        resume = start_revision  # where a watch through another member would start

        async def requests() -> AsyncIterator[Any]:
            yield WatchRequest(
                create_request=WatchCreateRequest(
                    key=key, range_end=range_end, start_revision=start_revision,
                    progress_notify=True,
                )
            )
            await stop.wait()

        # With require-leader, a member that loses its leader (cut off from the quorum)
        # ends the stream with "no leader" instead of keeping it open and silent.
        stream = stub.Watch(requests(), metadata=self._metadata())
        what = "watch of " + ("the leases" if key == self._subnets else "the config")
        try:
            async for resp in stream:
                if resp.compact_revision > 0:
                    raise Compacted(int(resp.compact_revision))
                if resp.canceled:
                    reason = f"etcd watch canceled: {self._explain(resp.cancel_reason)}"
                    if self._settings.username and _token_refused(resp.cancel_reason):
                        self._token_stale(login)
                        raise _StaleToken(reason)
                    raise RegistryUnavailable(reason)
                if resp.created:
                    self._count("watch_subnets" if key == self._subnets else "watch_config",
                                "ok")
                    before = self._watch_member.get(key)
                    self._watch_member[key] = index
                    if before is not None and before != index:
                        log.info("etcd: %s resumed from revision %d through member %s",
                                 what, start_revision, member)
                    if index == self._current:
                        self._worked()
                if not resp.events:
                    if resp.created:
                        yield []  # tells the caller the stream is up again
                    continue
                batch = []
                for ev in resp.events:
                    kind = "delete" if ev.type == 1 else "put"
                    name = self._name(ev.kv.key) if key == self._subnets else ev.kv.key.decode()
                    batch.append(Event(kind, name, ev.kv.value, ev.kv.lease, ev.kv.mod_revision))
                resume = batch[-1].revision + 1
                yield batch
            self._leave(index, f"{what} (resuming from revision {resume})", "stream ended")
            raise RegistryUnavailable("etcd watch stream ended")
        except grpc.aio.AioRpcError as exc:
            detail = _detail(exc)
            if self._settings.username and _token_refused(detail):
                self._token_stale(login)  # the next call (the caller's retry) logs in again
            elif _member_trouble(exc):
                self._leave(index, f"{what} (resuming from revision {resume})", detail)
            raise RegistryUnavailable(f"etcd watch: {self._explain(detail)}") from None
        finally:
            stop.set()
            stream.cancel()

    async def close(self) -> None:
        for m in self._members:
            if m.connected:
                m.connected = False
                await m.client.close()


async def _noop(client: Etcd3Client) -> Etcd3Client:
    return client


#: What grpc reports when the server rejected our client certificate (TLS alerts).
_CLIENT_CERT_REFUSED = (
    "TSI_DATA_CORRUPTED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA",
    "CERTIFICATE_EXPIRED", "UNSUPPORTED_CERTIFICATE",
)


class _RevisionCompacted(Exception):
    """The revision a paged listing reads at was compacted between two pages."""


class _StaleToken(Exception):
    """etcd refused to create a watch with our token: log in and try again."""


class _Member:
    """One etcd member address and the client (one grpc channel) that talks to it."""

    def __init__(self, target: str, client: Etcd3Client) -> None:
        self.target = target
        self.label = member_label(target)
        self.client = client
        self.connected = False  # the channel is made on first use


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    """The grpc status of a failed call, also when etcd3aio wrapped it in its own error."""
    while exc is not None:
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc.code()
        exc = exc.__cause__  # type: ignore[assignment]
    return None


def _member_trouble(exc: BaseException) -> bool:
    """Whether another member might answer where this one did not: unavailable (no
    leader, no connection, etcd's own request timeout), no answer in time, or grpc's
    INTERNAL "Internal error from Core": what a watch gets instead of "no leader" when the
    member ends the stream while grpc still writes the create request (measured: 8 of 40
    watches made on a member without leader; grpc/grpc#36066). Not moving on it, the
    watch was made again and again on the same member."""
    if isinstance(exc, TimeoutError):
        return True
    return _grpc_code(exc) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.INTERNAL)


def _not_sent(detail: str) -> bool:
    """The call failed before the member did anything with it, so sending it again cannot
    apply it twice: refused for want of a leader, or no connection to the member."""
    text = detail.lower()
    return ("no leader" in text or "failed to connect" in text
            or "connection refused" in text)


def _detail(exc: BaseException) -> str:
    """An etcd3aio or grpc error as one line: the status code's name and etcd's words."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details()}"
    return str(exc)


def _token_refused(detail: str) -> bool:
    """etcd no longer accepts our token (expired, or etcd restarted with simple tokens)."""
    return "invalid auth token" in detail


def _system_ca() -> bytes | None:
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            continue
    return None
