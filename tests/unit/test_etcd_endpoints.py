"""--etcd-endpoints as EtcdRegistry reads it, and how it moves between the members.

Nothing here talks to etcd: the endpoint parsing is pure, the failover is driven through
`EtcdRegistry._call` with operations that fail as grpc would (a member with no leader, a
deadline) and a client whose channel is made but never used. The same failover against a
real three-member cluster cut in two is tests/lab/test_etcd_partition_lab.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from etcd3aio import Etcd3Client, EtcdError

from agent.daemon import Daemon
from agent.etcd_registry import (
    REQUIRE_LEADER,
    EtcdRegistry,
    EtcdSetupError,
    _member_trouble,
    parse_endpoints,
)
from agent.metrics import etcd_families
from agent.options import EtcdSettings, Options, etcd_settings, parse_args
from agent.registry import RegistryUnavailable
from backends.kernel.fake import FakeNetlink
from tests.support.daemon_rig import ETH0, no_iptables


def targets(*urls: str) -> list[str]:
    return parse_endpoints(urls)[0]


# -- parsing ---------------------------------------------------------------------------
def test_ipv4_and_ipv6_literals_become_grpc_targets_of_their_family() -> None:
    assert targets("http://10.0.0.1:2379", "http://[fd00::1]:2379", "http://[::1]") == [
        "ipv4:10.0.0.1:2379", "ipv6:[fd00::1]:2379", "ipv6:[::1]:2379"]


def test_an_ipv6_https_endpoint_is_verified_by_its_address() -> None:
    assert parse_endpoints(("https://[fd00::1]:2379",)) == (
        ["ipv6:[fd00::1]:2379"], True, "fd00::1")


def test_a_name_resolves_to_its_ipv4_addresses_and_is_the_tls_name() -> None:
    assert parse_endpoints(("https://localhost:2379", "https://127.0.0.1:2379")) == (
        ["ipv4:127.0.0.1:2379"], True, "localhost")  # the same address once


def test_without_scheme_or_port_the_defaults_are_http_and_2379() -> None:
    assert targets("10.0.0.1") == ["ipv4:10.0.0.1:2379"]


@pytest.mark.parametrize("flag", ["--etcd-endpoints=", "--etcd-endpoints=,"])
def test_an_empty_endpoint_list_is_refused_naming_the_flag(flag: str) -> None:
    settings = etcd_settings(parse_args([flag], environ={}))
    with pytest.raises(EtcdSetupError) as info:
        EtcdRegistry(settings)
    assert str(info.value) == ("--etcd-endpoints is empty: give at least one etcd client "
                               "URL, e.g. --etcd-endpoints=http://127.0.0.1:2379")


async def test_an_empty_endpoint_list_is_one_line_and_exit_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = Daemon(Options(subnet_file=str(tmp_path / "subnet.env"), healthz_port=0,
                       etcd_endpoints=""),
               registry_factory=EtcdRegistry, netlink_factory=lambda: FakeNetlink([ETH0]),
               iptables_factory=no_iptables)
    caplog.set_level(logging.INFO)
    assert await d.main() == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "--etcd-endpoints is empty: give at least one etcd client URL, e.g. "
        "--etcd-endpoints=http://127.0.0.1:2379"]
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("url", "message"), [
    ("http://fd00::1:2379", "--etcd-endpoints: 'http://fd00::1:2379' is not "
     "http(s)://host:port (an IPv6 address goes in brackets: http://[fd00::1]:2379)"),
    ("http://[fd00::1", "--etcd-endpoints: 'http://[fd00::1' is not http(s)://host:port "
     "(an IPv6 address goes in brackets: http://[fd00::1]:2379)"),
    ("http://a:b", "--etcd-endpoints: 'http://a:b' is not http(s)://host:port"),
    ("ftp://a:2379", "--etcd-endpoints: 'ftp://a:2379' is not http(s)://host:port"),
])
def test_a_bad_url_is_one_line_naming_the_flag(url: str, message: str) -> None:
    with pytest.raises(EtcdSetupError) as info:
        parse_endpoints((url,))
    assert str(info.value) == message


# -- members ---------------------------------------------------------------------------
MEMBERS = ("http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379")


def registry(current: int = 0) -> EtcdRegistry:
    reg = EtcdRegistry(EtcdSettings(MEMBERS))
    reg._current = current  # the start is random; these tests say where it is
    return reg


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Members:
    """An operation that fails on some members: label -> the error it raises there."""

    def __init__(self, reg: EtcdRegistry, failing: dict[str, BaseException]) -> None:
        self.reg = reg
        self.failing = failing
        self.tried: list[str] = []

    async def __call__(self, client: Etcd3Client) -> str:
        label = next(m.label for m in self.reg._members if m.client is client)
        self.tried.append(label)
        if label in self.failing:
            raise self.failing[label]
        return label


async def test_a_member_without_leader_is_left_and_the_call_goes_to_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = registry()
    caplog.set_level(logging.INFO)
    try:
        assert await reg._call("get config", Members(reg, {})) == "10.0.0.1:2379"
        op = Members(reg, {"10.0.0.1:2379": rpc_error(grpc.StatusCode.UNAVAILABLE,
                                                     "etcdserver: no leader")})
        assert await reg._call("get config", op) == "10.0.0.2:2379"
        assert op.tried == ["10.0.0.1:2379", "10.0.0.2:2379"]
        assert reg.member == "10.0.0.2:2379"
        assert reg.member_switches == {"no_leader": 1}
        assert reg.requests[("get_config", "ok")] == 2
        assert ("etcd member 10.0.0.1:2379: etcd get config failed (it has no leader: cut "
                "off from the other members, or the cluster lost its quorum); switching to "
                "member 10.0.0.2:2379") in caplog.messages
        assert "etcd: now talking to member 10.0.0.2:2379" in caplog.messages
    finally:
        await reg.close()


async def test_a_call_that_may_have_been_applied_is_not_sent_again() -> None:
    # A deadline: etcd may have applied the transaction; the caller decides (and its retry
    # goes to the next member).
    reg = registry(1)
    op = Members(reg, {"10.0.0.2:2379": rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                 "Deadline Exceeded")})
    try:
        with pytest.raises(RegistryUnavailable, match="DEADLINE_EXCEEDED"):
            await reg._call("update subnet", op)
        assert op.tried == ["10.0.0.2:2379"]
        assert reg.member == "10.0.0.3:2379"
        assert reg.member_switches == {"unreachable": 1}
        assert await reg._call("update subnet", op) == "10.0.0.3:2379"
    finally:
        await reg.close()


async def test_when_every_member_has_no_leader_each_is_tried_once() -> None:
    reg = registry(2)
    no_leader = rpc_error(grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader")
    op = Members(reg, {label: no_leader for label in
                       ("10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379")})
    try:
        with pytest.raises(RegistryUnavailable, match="no leader"):
            await reg._call("list subnets", op)
        assert op.tried == ["10.0.0.3:2379", "10.0.0.1:2379", "10.0.0.2:2379"]
    finally:
        await reg.close()


async def test_an_error_of_the_request_itself_stays_with_the_member() -> None:
    reg = registry()
    op = Members(reg, {"10.0.0.1:2379": rpc_error(grpc.StatusCode.PERMISSION_DENIED,
                                                 "etcdserver: permission denied")})
    try:
        with pytest.raises(RegistryUnavailable, match="permission denied"):
            await reg._call("get config", op)
        assert reg.member == "10.0.0.1:2379"
        assert reg.member_switches == {}
    finally:
        await reg.close()


async def test_one_member_has_nowhere_to_go() -> None:
    reg = EtcdRegistry(EtcdSettings(("http://10.0.0.1:2379",)))
    op = Members(reg, {"10.0.0.1:2379": rpc_error(grpc.StatusCode.UNAVAILABLE,
                                                 "etcdserver: no leader")})
    try:
        with pytest.raises(RegistryUnavailable, match="no leader"):
            await reg._call("get config", op)
        assert op.tried == ["10.0.0.1:2379"]
        assert reg.member_switches == {}
    finally:
        await reg.close()


async def test_every_call_asks_for_a_leader_and_carries_the_token() -> None:
    reg = registry()
    try:
        client: Any = await reg._call("get config", lambda c: _same(c))
        assert client.kv._metadata == REQUIRE_LEADER == (("hasleader", "true"),)
        reg._set_token("tok")
        for svc in (client.kv, client.lease, client.watch, client.auth):
            assert svc._metadata == (("token", "tok"), ("hasleader", "true"))
        # A member connected later gets the token too.
        reg._current = 1
        other: Any = await reg._call("get config", lambda c: _same(c))
        assert other is not client
        assert other.lease._metadata == (("token", "tok"), ("hasleader", "true"))
    finally:
        await reg.close()


async def _same(client: Etcd3Client) -> Etcd3Client:
    return client


def test_member_switches_are_exported_by_reason_from_zero() -> None:
    families = {f.name: f for f in etcd_families({}, {"no_leader": 2})}
    samples = {s.labels["reason"]: s.value
               for s in families["tweed_etcd_member_switches"].samples
               if s.name.endswith("_total")}
    assert samples == {"no_leader": 2, "unreachable": 0}


@pytest.mark.parametrize(("code", "details", "moves"), [
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader", True),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
    # A watch refused for want of a leader, as grpc sometimes reports it.
    (grpc.StatusCode.INTERNAL, "Internal error from Core", True),
    (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", False),
    (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted",
     False),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty", False),
])
def test_which_failures_move_to_the_next_member(
    code: grpc.StatusCode, details: str, moves: bool
) -> None:
    exc = rpc_error(code, details)
    assert _member_trouble(exc) is moves
    wrapped = EtcdError("KV.Range failed")  # as etcd3aio raises it
    wrapped.__cause__ = exc
    assert _member_trouble(wrapped) is moves
