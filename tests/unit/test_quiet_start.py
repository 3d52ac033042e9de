"""A start with thousands of peers logs tens of lines, not one per kernel entry: the whole
daemon (tests/support/daemon_rig.py) over a registry holding 5,000 peer leases."""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path

import pytest

from agent.lease_codec import LeaseAttrs, encode_lease
from tests.support.daemon_rig import DaemonRig

PEERS = 5000
CONFIG = b'{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw"}}'


async def test_a_5000_peer_start_logs_tens_of_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    rig = DaemonRig(tmp_path)
    for i in range(PEERS):
        subnet = ipaddress.IPv4Network(((10 << 24) | ((i + 16) << 8), 24))
        gateway = ipaddress.IPv4Address(f"192.168.100.{2 + i % 250}")
        await rig.reg.put(f"{subnet.network_address}-24",
                          encode_lease(LeaseAttrs(gateway, None, "host-gw", None)), ttl=600)
    with caplog.at_level(logging.INFO):
        await rig.serve_ready(CONFIG)
        await rig.until(lambda: len(rig.fake.table) >= PEERS, "every peer's route",
                        limit=60.0)
        await rig.stop()
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) < 50, "\n".join(r.getMessage() for r in info)
    # The routes were logged as counts, however the start was split into syncs.
    counts = [re.fullmatch(r"kernel: set (\d+) routes?; removed 0", r.getMessage())
              for r in info]
    assert sum(int(m.group(1)) for m in counts if m) == PEERS, [r.getMessage() for r in info]
