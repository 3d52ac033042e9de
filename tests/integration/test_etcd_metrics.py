"""EtcdRegistry's request counters (tweed_etcd_requests_total) against a real etcd: each
call counted once under its operation, ok or error, watches when etcd confirms the stream
and when it breaks."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from agent.etcd_registry import EtcdRegistry, EtcdSettings
from agent.registry import RegistryUnavailable
from tests.support.aio import until

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
VALUE = b'{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"host-gw"}'


async def test_requests_are_counted_by_operation_and_result(etcd, tcp_proxy):
    host, port = etcd.client_url.removeprefix("http://").split(":")
    proxy = tcp_proxy(host, int(port))
    reg = EtcdRegistry(EtcdSettings((f"http://{proxy.address}",), PREFIX))
    batches: list[int] = []

    async def watch() -> None:
        async for batch in reg.watch_subnets(1):
            batches.append(len(batch))

    try:
        await reg.get_config()
        snap = await reg.list_subnets()
        assert await reg.create_subnet("10.5.1.0-24", VALUE, 60) is not None
        assert await reg.create_subnet("10.5.1.0-24", VALUE, 60) is None  # a lost race
        assert reg.requests == {
            ("get_config", "ok"): 1, ("list_subnets", "ok"): 1,
            # Each create grants a TTL lease first; the losing one revokes its lease.
            ("grant_lease", "ok"): 2, ("create_subnet", "ok"): 2, ("revoke_lease", "ok"): 1,
        }
        task = asyncio.create_task(watch())
        await until(lambda: reg.requests.get(("watch_subnets", "ok")) == 1)
        assert snap.revision >= 1
        proxy.cut()
        with pytest.raises(RegistryUnavailable):
            await task  # the stream breaks: an error
        assert reg.requests[("watch_subnets", "error")] == 1
        with pytest.raises(RegistryUnavailable):
            await reg.list_subnets()
        assert reg.requests[("list_subnets", "error")] == 1
        assert reg.requests[("list_subnets", "ok")] == 1
        proxy.restore()
        for _ in range(60):  # grpc reconnects on its own (capped) backoff
            try:
                await reg.list_subnets()
                break
            except RegistryUnavailable:
                await asyncio.sleep(0.25)
        assert reg.requests[("list_subnets", "ok")] == 2
        # Every failed try was counted, each once.
        failed = reg.requests[("list_subnets", "error")]
        assert sum(reg.requests.values()) == 10 + failed
    finally:
        with contextlib.suppress(Exception):
            await reg.close()
