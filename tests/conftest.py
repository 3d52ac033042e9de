"""Fixtures shared by all tests: a real etcd, a cuttable TCP proxy, the namespace lab."""

from __future__ import annotations

import os

import pytest
import uvloop

from tests.support.etcd import EtcdServer
from tests.support.netns import Lab
from tests.support.proxy import TcpProxy


def pytest_asyncio_loop_factories(config, item):
    """Async tests run on uvloop, as the daemon does."""
    return {"uvloop": uvloop.new_event_loop}


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, a real etcd): run as root",
                    pytrace=False)


@pytest.fixture
def etcd():
    _require_root()
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tcp_proxy():
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
def lab():
    _require_root()
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()
