"""bench_scale's start phases, read from the agent's log lines (pure: no lab)."""

from __future__ import annotations

import math

from tests.bench_scale import Result, log_time, phases

LOG = """\
2026-12-01 10:56:13,019 INFO agent.health: health server on http://127.0.0.1:8475
2026-12-01 10:56:13,295 INFO tweed: using interface eth0 (index 2, MTU 1500)
2026-12-01 10:56:15,049 INFO agent.lease_manager: holding subnet 10.78.114.0/24 (lease)
2026-12-01 10:56:15,056 INFO tweed: wrote /tmp/x.subnet.env (subnet 10.78.114.0/24)
2026-12-01 10:56:15,300 INFO backends.routed: first peer listing: 20000 leases; programming
2026-12-01 10:56:16,000 INFO backends.kernel.sync: kernel: set 20000 routes; removed 0
"""


def test_each_phase_ends_at_its_line() -> None:
    started = log_time("2026-12-01 10:56:12,500 x")
    assert started is not None
    got = phases(LOG, started, started + 4.0, 20000)
    assert math.isclose(got["imports_s"], 0.519, abs_tol=1e-6)
    assert math.isclose(got["etcd_s"], 15.049 - 13.019, abs_tol=1e-6)
    assert math.isclose(got["setup_s"], 15.300 - 15.049, abs_tol=1e-6)
    # The kernel part ends when the bench saw every entry, not at the agent's own line.
    assert math.isclose(got["kernel_s"], 16.5 - 15.300, abs_tol=1e-6)
    assert math.isclose(sum(got.values()) - got["kernel_acked_s"], 4.0, abs_tol=1e-6)
    # And until the agent's own line, once the kernel acknowledged every route.
    assert math.isclose(got["kernel_acked_s"], 16.0 - 15.300, abs_tol=1e-6)


def test_a_kernel_line_for_fewer_routes_than_peers_is_not_the_end() -> None:
    started = log_time("2026-12-01 10:56:12,500 x")
    assert started is not None
    got = phases(LOG, started, started + 4.0, 20001)
    assert "kernel_acked_s" not in got and "kernel_s" in got


def test_a_missing_line_leaves_its_phase_and_those_after_out() -> None:
    started = log_time("2026-12-01 10:56:12,500 x")
    assert started is not None
    udp = "\n".join(line for line in LOG.splitlines() if "first peer listing" not in line)
    got = phases(udp, started, started + 4.0)
    assert set(got) == {"imports_s", "etcd_s"}  # and no kernel_acked_s either
    assert log_time("Traceback (most recent call last):") is None


def test_the_kernel_part_is_compared_with_ip_batch() -> None:
    r = Result("host-gw", 20000, start_s=1.7, ref_s=0.34, kernel_s=0.85)
    assert math.isclose(r.kernel_ratio, 2.5)
    assert math.isclose(r.ratio, 5.0)
