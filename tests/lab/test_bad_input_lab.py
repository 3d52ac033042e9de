"""Bad leases in etcd against a real agent: a key that does not parse, a value that is not
JSON, a value without a PublicIP, a lease for a subnet outside the network. Each is
skipped with one log line naming the key and the problem (however often it is seen) and
counted in /metrics, and the agent goes on programming the good leases."""

from __future__ import annotations

import pytest

from tests.lab.agents import PREFIX, bring_up, ping, put_config, routes, wait_for
from tests.lab.fault_tools import metrics

pytestmark = pytest.mark.lab

PORT = 8475  # the default health/metrics port, inside each host namespace

BAD = {
    "not-a-subnet": ('{"PublicIP":"192.168.100.7"}', "is not <a.b.c.d>-<len>"),
    "10.5.77.0-24": ("{not json", "is not JSON"),
    "10.5.78.0-24": ('{"BackendType":"host-gw"}', "PublicIP None is not IPv4"),
    "10.9.0.0-24": ('{"PublicIP":"192.168.100.8","BackendType":"host-gw"}',
                    "outside the network 10.5.0.0/16"),
}


def test_bad_leases_are_skipped_logged_once_counted_and_the_good_ones_work(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd, backend="host-gw")
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    for name, (value, _) in BAD.items():
        etcd.put(f"{PREFIX}/subnets/{name}", value)
    for name, (value, _) in BAD.items():  # seen again: still one line each
        etcd.put(f"{PREFIX}/subnets/{name}", value)
    # A good peer arriving after them is programmed as usual.
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: routes(h1, a2.subnet) != "", timeout=15, what="good peer routed")
    assert ping(c1, c2.ip)

    log = a1.log()
    for name, (_, problem) in BAD.items():
        lines = [line for line in log.splitlines() if f"skipping subnets/{name}:" in line]
        assert len(lines) == 1, (name, lines)
        assert problem in lines[0], lines[0]
    assert "Traceback" not in log
    assert routes(h1, "10.9.0.0/24") == "" and routes(h1, "10.5.77.0/24") == ""
    m = metrics(h1, PORT)
    assert m["tweed_bad_subnet_keys_total"] >= 2  # seen twice
    assert m["tweed_bad_lease_values_total"] >= 4  # two values, each seen twice
    assert m["tweed_leases_outside_network_total"] >= 2
    assert a1.proc.poll() is None
