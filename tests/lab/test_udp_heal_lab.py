"""udp: kernel state that heals. With a ping every 50 ms between containers on two udp
hosts, `ip link del flannel0` on one: tweed notices (the TUN fd reports an error), makes
flannel0 again with its address, MTU and the Network route, hands it to the datapath, and
traffic is back within 2 s; the counters and the log say what was repaired. For both
datapaths (the C packet loop must neither spin nor end silently on the dead fd). And eth0
down for 2 s and up again: traffic is back within 2 s of it coming up."""

from __future__ import annotations

import json
import time

import pytest

from tests.lab import fault_tools
from tests.lab.agents import bring_up, ping, put_config, wait_for

pytestmark = pytest.mark.lab

METRICS_PORT = 9101
INTERVAL = 0.05


def metric(host, name: str) -> float:
    return fault_tools.metrics(host, METRICS_PORT).get(name, 0.0)


def flannel0(host) -> dict | None:
    """flannel0 as `ip -4 -j addr` shows it, or None."""
    res = host.exec(["ip", "-4", "-j", "addr", "show", "dev", "flannel0"], check=False)
    if res.returncode != 0:
        return None
    links = json.loads(res.stdout)
    return links[0] if links else None


def two_udp_hosts(lab, tmp_path, dp: str):
    """Two udp hosts on `dp`'s datapath with a container each, the overlay up: host 1, its
    agent, its container, host 2's container."""
    etcd = lab.start_etcd()
    put_config(etcd, backend="udp")
    env = {"TWEED_DATAPATH": dp}
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1, "--healthz-port", str(METRICS_PORT), env=env)
    _h2, _a2, c2 = bring_up(lab, etcd, tmp_path, 2, "--healthz-port", str(METRICS_PORT), env=env)
    wait_for(lambda: ping(c1, c2.ip, count=1), timeout=10, what="overlay up")
    return h1, a1, c1, c2


@pytest.mark.parametrize("dp", ["python", "c"])
def test_deleted_flannel0_is_made_again_and_traffic_comes_back(lab, tmp_path, dp):
    h1, a1, c1, c2 = two_udp_hosts(lab, tmp_path, dp)
    before = flannel0(h1)
    assert before is not None
    assert metric(h1, "tweed_udp_tun_recreated_total") == 0

    stream = fault_tools.PingStream(c1, c2.ip, tmp_path, interval=INTERVAL)
    try:
        # The stream is answered before the fault (a reply in the datapath's counters).
        rx = 'tweed_udp_packets_total{direction="rx"}'
        start = metric(h1, rx)
        wait_for(lambda: metric(h1, rx) >= start + 5, timeout=10, what="pings flowing")
        deleted_at = time.time()
        h1.exec(["ip", "link", "del", "flannel0"])
        wait_for(lambda: metric(h1, "tweed_udp_tun_recreated_total") >= 1, timeout=10,
                 what="flannel0 made again", detail=lambda: a1.log()[-3000:])
        time.sleep(max(0.0, deleted_at + 4 - time.time()))  # the stream runs on past it
    finally:
        result = stream.stop()

    after = flannel0(h1)
    assert after is not None and after["ifindex"] != before["ifindex"]  # a new device
    assert after["mtu"] == before["mtu"] == 1472
    assert "UP" in after["flags"]
    assert [(a["local"], a["prefixlen"]) for a in after["addr_info"]] == [
        (a1.subnet.split("/")[0], 32)]
    assert "10.5.0.0/16 dev flannel0" in h1.exec(["ip", "route"]).stdout
    # Traffic back within 2 s: at most 2 s worth of pings unanswered, and answered again
    # after the fault.
    assert len(result.lost) * INTERVAL <= 2.0, result.summary()
    assert result.first_reply_after(deleted_at + 3) is not None, result.summary()
    # The counters and the log say what was repaired; the agent runs on.
    assert metric(h1, "tweed_udp_tun_lost_total") == 1
    assert metric(h1, "tweed_udp_tun_recreated_total") == 1
    log = a1.log()
    assert "flannel0 is gone" in log and "flannel0 made again" in log
    assert "Traceback" not in log
    assert a1.proc is not None and a1.proc.poll() is None
    assert ping(c1, c2.ip) and ping(c2, c1.ip)


@pytest.mark.parametrize("dp", ["python", "c"])
def test_eth0_down_and_up_traffic_back_within_2s(lab, tmp_path, dp):
    h1, a1, c1, c2 = two_udp_hosts(lab, tmp_path, dp)
    stream = fault_tools.PingStream(c1, c2.ip, tmp_path, interval=INTERVAL)
    try:
        rx = 'tweed_udp_packets_total{direction="rx"}'
        start = metric(h1, rx)
        wait_for(lambda: metric(h1, rx) >= start + 5, timeout=10, what="pings flowing")
        h1.exec(["ip", "link", "set", "eth0", "down"])
        time.sleep(2)
        h1.exec(["ip", "link", "set", "eth0", "up"])
        up_at = time.time()
        time.sleep(4)  # the stream runs on past the 2 s
    finally:
        result = stream.stop()
    back = result.first_reply_after(up_at)
    assert back is not None and back - up_at <= 2.0, result.summary()
    # Only the pings of the time eth0 was down (2 s, 40 pings) and of the 2 s after, at most.
    assert len(result.lost) * INTERVAL <= 2.0 + 2.0, result.summary()
    assert "Traceback" not in a1.log()
    assert a1.proc is not None and a1.proc.poll() is None
    assert flannel0(h1) is not None
    assert metric(h1, "tweed_udp_tun_lost_total") == 0  # flannel0 was never touched
