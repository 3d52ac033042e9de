"""Fixtures shared by all tests: a real etcd, a cuttable TCP proxy, the namespace lab.

Also owns the root check (selected tests that need root, by the `etcd`/`lab` markers or
fixtures, make the whole run fail at collection with a clear message when not run as root;
nothing is skipped) and the choice of uvloop for async tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import uvloop

from tests.support.etcd import EtcdServer
from tests.support.netns import Lab
from tests.support.proxy import TcpProxy

ROOT_MARKERS = ("etcd", "lab")
ROOT_FIXTURES = ("etcd", "lab")


def pytest_asyncio_loop_factories(config, item):
    """Async tests run on uvloop, as the daemon does."""
    return {"uvloop": uvloop.new_event_loop}


def _needs_root(item: pytest.Item) -> bool:
    if any(item.get_closest_marker(m) for m in ROOT_MARKERS):
        return True
    return any(f in getattr(item, "fixturenames", ()) for f in ROOT_FIXTURES)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: judge only what will run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    needy = [item.nodeid for item in items if _needs_root(item)]
    if needy:
        raise pytest.UsageError(
            f"{len(needy)} selected tests need root (a real etcd, network namespaces), e.g. "
            f"{needy[0]}; this run is uid {os.geteuid()}. Run them as root "
            "(`sudo make test`) or deselect them (`make unit`)."
        )


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (a real etcd, network namespaces): run as root", pytrace=False)


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A started etcd on 127.0.0.1 (root namespace, free ports, temp data dir)."""
    _require_root()
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    """Factory: tcp_proxy(host, port) -> a TcpProxy on 127.0.0.1 to host:port."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for p in proxies:
            p.close()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """An underlay namespace with br0; add hosts with lab.add_host(i). Removed after."""
    _require_root()
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()
