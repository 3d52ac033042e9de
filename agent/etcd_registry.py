"""EtcdRegistry: the Registry over etcd's v3 API, through etcd3aio (asyncio over grpc.aio).

Layout is flanneld's: `<prefix>/config` and `<prefix>/subnets/<key>`, each subnet key
attached to its own etcd lease. Every unary call has a deadline and is tried once; the
caller owns retries and backoff, so an outage is reported once per state change by the
caller instead of once per attempt here. The watch is our own loop over the Watch stub so
that we decide the resume revision (the last event seen + 1) and see compaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub

from agent.registry import Compacted, Event, Record, RegistryUnavailable, Snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Deadline of every unary RPC, in seconds.
RPC_TIMEOUT = 5.0


class EtcdSetupError(ValueError):
    """The etcd settings cannot work (bad endpoint URL, unreadable certificate)."""


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd: flanneld's --etcd-* flags."""

    endpoints: tuple[str, ...]
    prefix: str = "/coreos.com/network"
    keyfile: str = ""
    certfile: str = ""
    cafile: str = ""
    username: str = ""
    password: str = ""


def parse_endpoints(urls: tuple[str, ...]) -> tuple[list[str], bool, str | None]:
    """Turn `http(s)://host:port` URLs into `ip:port` targets, TLS flag and TLS name.

    grpc's `ipv4:` target wants addresses, so names are resolved here, once; the first
    name seen is kept for TLS verification.
    """
    targets: list[str] = []
    schemes = set()
    server_name: str | None = None
    for url in urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EtcdSetupError(f"--etcd-endpoints: {url!r} is not http(s)://host:port")
        schemes.add(parts.scheme)
        try:
            port = parts.port or 2379
        except ValueError:
            raise EtcdSetupError(f"--etcd-endpoints: {url!r} has a bad port") from None
        host = parts.hostname
        try:
            ipaddress.IPv4Address(host)
            addrs = [host]
        except ValueError:
            if server_name is None:
                server_name = host
            try:
                infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                raise EtcdSetupError(f"--etcd-endpoints: cannot resolve {host!r}: {exc}") from None
            addrs = sorted({info[4][0] for info in infos})
        targets.extend(f"{a}:{port}" for a in addrs)
    if len(schemes) > 1:
        raise EtcdSetupError("--etcd-endpoints: mixes http and https endpoints")
    return targets, schemes == {"https"}, server_name


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

    def __init__(self, settings: EtcdSettings) -> None:
        targets, tls, server_name = parse_endpoints(settings.endpoints)
        ca = _read(settings.cafile, "--etcd-cafile")
        key = _read(settings.keyfile, "--etcd-keyfile")
        cert = _read(settings.certfile, "--etcd-certfile")
        conn: dict[str, bytes | None] = {}
        if tls or ca is not None:
            if ca is None:
                # No CA given: trust the system store, as flanneld does.
                ca = _system_ca()
            conn = {"ca_cert": ca, "cert_key": key, "cert_chain": cert}
        self._client = Etcd3Client(
            targets, rpc_max_attempts=1, tls_server_name=server_name, **conn
        )
        self._settings = settings
        prefix = settings.prefix.rstrip("/")
        self._config_key = f"{prefix}/config".encode()
        self._subnets = f"{prefix}/subnets/".encode()
        self._connected = False
        self._auth_lock = asyncio.Lock()

    # -- plumbing ------------------------------------------------------------------
    async def _ensure(self) -> Etcd3Client:
        if not self._connected:
            await self._client.connect()
            self._connected = True
            if self._settings.username:
                await self._authenticate()
        return self._client

    async def _authenticate(self) -> None:
        async with self._auth_lock:
            assert self._client.auth is not None
            resp = await self._client.auth.authenticate(
                self._settings.username, self._settings.password, timeout=RPC_TIMEOUT
            )
            self._client.set_token(resp.token)

    async def _call(self, what: str, fn: Callable[[Etcd3Client], Awaitable[T]]) -> T:
        """Run one RPC; map every transport failure to RegistryUnavailable."""
        for attempt in (1, 2):
            try:
                client = await self._ensure()
                return await fn(client)
            except EtcdUnauthenticatedError as exc:
                # Tokens expire (etcd's default is 5 minutes): log in again once.
                if attempt == 2 or not self._settings.username:
                    raise RegistryUnavailable(f"etcd {what}: {exc}") from None
                try:
                    await self._authenticate()
                except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc2:
                    raise RegistryUnavailable(f"etcd {what}: login failed: {exc2}") from None
            except (EtcdConnectionError, EtcdTransientError) as exc:
                raise RegistryUnavailable(f"etcd {what}: {exc}") from None
            except TimeoutError:
                raise RegistryUnavailable(f"etcd {what}: no answer in {RPC_TIMEOUT:g} s") from None
            except grpc.aio.AioRpcError as exc:
                detail = f"{exc.code().name} {exc.details()}"
                raise RegistryUnavailable(f"etcd {what}: {detail}") from None
            except EtcdError as exc:
                raise RegistryUnavailable(f"etcd {what}: {exc}") from None
        raise AssertionError("unreachable")

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
    ) -> AsyncIterator[tuple[bytes | None, int]]:
        async with contextlib.aclosing(
            self._watch(self._config_key, b"", start_revision)
        ) as stream:
            async for batch in stream:
                if batch:
                    last = batch[-1]
                    yield (last.value if last.kind == "put" else None), last.revision

    async def list_subnets(self) -> Snapshot:
        async def op(c: Etcd3Client) -> Any:
            assert c.kv is not None
            return await c.kv.get(
                self._subnets, prefix_range_end(self._subnets), timeout=RPC_TIMEOUT
            )

        resp = await self._call("list subnets", op)
        records = [
            Record(self._name(kv.key), kv.value, kv.lease, kv.mod_revision) for kv in resp.kvs
        ]
        return Snapshot(records, resp.header.revision)

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

    def watch_subnets(self, start_revision: int) -> AsyncIterator[list[Event]]:
        return self._watch(self._subnets, prefix_range_end(self._subnets), start_revision)

    async def _watch(
        self, key: bytes, range_end: bytes, start_revision: int
    ) -> AsyncIterator[list[Event]]:
        """One watch stream; ends by raising (Compacted / RegistryUnavailable), never silently."""
        client = await self._call("watch", lambda c: _noop(c))
        assert client._channel is not None
        stub = WatchStub(client._channel)
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield WatchRequest(
                create_request=WatchCreateRequest(
                    key=key, range_end=range_end, start_revision=start_revision,
                    progress_notify=True,
                )
            )
            await stop.wait()

        metadata = client.kv._metadata if client.kv is not None else ()
        stream = stub.Watch(requests(), metadata=metadata or None)
        try:
            async for resp in stream:
                if resp.compact_revision > 0:
                    raise Compacted(int(resp.compact_revision))
                if resp.canceled:
                    raise RegistryUnavailable(f"etcd watch canceled: {resp.cancel_reason}")
                if not resp.events:
                    if resp.created:
                        yield []  # tells the caller the stream is up again
                    continue
                batch = []
                for ev in resp.events:
                    kind = "delete" if ev.type == 1 else "put"
                    name = self._name(ev.kv.key) if key == self._subnets else ev.kv.key.decode()
                    batch.append(Event(kind, name, ev.kv.value, ev.kv.lease, ev.kv.mod_revision))
                yield batch
            raise RegistryUnavailable("etcd watch stream ended")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self._settings.username:
                try:
                    await self._authenticate()
                except Exception as exc2:  # noqa: BLE001 - any failure means "retry later"
                    log.debug("etcd re-login failed: %s", exc2)
            raise RegistryUnavailable(
                f"etcd watch: {exc.code().name} {exc.details()}"
            ) from None
        finally:
            stop.set()
            stream.cancel()

    async def close(self) -> None:
        if self._connected:
            await self._client.close()
            self._connected = False


async def _noop(client: Etcd3Client) -> Etcd3Client:
    return client


def _system_ca() -> bytes | None:
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            continue
    return None
