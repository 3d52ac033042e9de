"""vxlan end to end: real tweed processes, a real etcd, the kernel's VXLAN, ping and iperf3,
and a host set up by hand exactly as flanneld would set it up."""

from __future__ import annotations

import json
import re
import struct
import subprocess

import pytest

from backends.routed import REMOVAL_GRACE
from tests.lab.agents import Agent, bring_up, ping, put_config, routes, subnet_key, wait_for

pytestmark = pytest.mark.lab

FLANNEL_LEASE = re.compile(
    r'^\{"PublicIP":"[0-9.]+","PublicIPv6":null,"BackendType":"vxlan",'
    r'"BackendData":\{"VNI":1,"VtepMAC":"([0-9a-f]{2}(?::[0-9a-f]{2}){5})"\}\}$'
)


def vtep_mac(etcd, subnet: str) -> str:
    m = FLANNEL_LEASE.match(etcd.get(subnet_key(subnet)) or "")
    assert m, etcd.get(subnet_key(subnet))
    return m.group(1)


def neigh(host, dev: str = "flannel.1") -> str:
    return host.exec(["ip", "neigh", "show", "dev", dev]).stdout


def fdb(host, dev: str = "flannel.1") -> str:
    return host.exec(["bridge", "fdb", "show", "dev", dev]).stdout


def link_json(host, dev: str) -> dict:
    return json.loads(host.exec(["ip", "-d", "-s", "-j", "link", "show", dev]).stdout)[0]


def vxlan_frames(pcap: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(udp dst port, VNI, inner src IP, inner dst IP) of each UDP/VXLAN frame in a pcap."""
    out = []
    off = 24  # global header
    while off + 16 <= len(pcap):
        incl = struct.unpack_from("<I", pcap, off + 8)[0]
        frame = pcap[off + 16: off + 16 + incl]
        off += 16 + incl
        if len(frame) < 14 + 20 + 8 + 8 + 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        if frame[14 + 9] != 17:
            continue
        udp = 14 + ihl
        dport = struct.unpack_from("!H", frame, udp + 2)[0]
        vx = udp + 8
        flags, vni_field = frame[vx], struct.unpack_from("!I", frame, vx + 4)[0]
        if flags != 0x08:
            continue
        inner = vx + 8 + 14  # inner Ethernet header
        out.append((dport, vni_field >> 8, frame[inner + 12: inner + 16],
                    frame[inner + 16: inner + 20]))
    return out


def test_vxlan_carries_traffic_on_udp_8472_with_vni_1(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    assert a1.env()["FLANNEL_MTU"] == "1450"

    # Kernel state exactly as docs/interop.md#vxlan describes.
    dev = link_json(h1, "flannel.1")
    info = dev["linkinfo"]["info_data"]
    assert dev["mtu"] == 1450
    assert (info["id"], info["local"], info["port"], info["learning"]) == (
        1, "192.168.100.1", 8472, False)
    mac2 = vtep_mac(etcd, a2.subnet)
    gw2 = a2.subnet.split("/")[0]
    wait_for(lambda: f"via {gw2} dev flannel.1 onlink" in routes(h1, a2.subnet), what="route")
    assert f"{gw2} lladdr {mac2} PERMANENT" in neigh(h1)
    assert f"{mac2} dst 192.168.100.2 self permanent" in fdb(h1)
    addr = h1.exec(["ip", "-4", "-o", "addr", "show", "dev", "flannel.1"]).stdout
    assert f"{a1.subnet.split('/')[0]}/32" in addr

    # Capture on host 2's underlay interface while pinging across.
    pcap = tmp_path / "vxlan.pcap"
    said = tmp_path / "tcpdump.txt"
    with open(said, "wb") as err:
        cap = h2.popen(["tcpdump", "-i", "eth0", "-U", "-w", str(pcap), "-c", "4", "udp"],
                       stdout=subprocess.DEVNULL, stderr=err)
    # tcpdump says "listening on eth0" once its capture is open.
    wait_for(lambda: "listening on" in said.read_text(errors="replace"), timeout=10,
             what="tcpdump capturing", detail=lambda: said.read_text(errors="replace"))
    before = link_json(h1, "flannel.1")["stats64"]["tx"]["packets"]
    assert ping(c1, c2.ip) and ping(c2, c1.ip)
    cap.wait(timeout=20)
    frames = vxlan_frames(pcap.read_bytes())
    assert frames, "no VXLAN frames captured"
    ips = {bytes(map(int, ip.split("."))) for ip in (c1.ip, c2.ip)}
    for dport, vni, src, dst in frames:
        assert dport == 8472 and vni == 1
        assert {src, dst} == ips
    assert link_json(h1, "flannel.1")["stats64"]["tx"]["packets"] >= before + 3

    # A short TCP run over the overlay.
    # The iperf3 server runs in container 2; the lab stops it by PID if it is still up.
    iperf = subprocess.Popen(["ip", "netns", "exec", c2.ns, "iperf3", "-s", "-1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(iperf)
    wait_for(lambda: ":5201 " in c2.exec(["ss", "-Hltn"]).stdout, timeout=10,
             what="iperf3 server listening")
    res = c1.exec(["iperf3", "-c", c2.ip, "-t", "2", "-J"], timeout=60)
    result = json.loads(res.stdout)
    assert result["end"]["sum_received"]["bytes"] > 1_000_000
    iperf.wait(timeout=10)


def test_mixes_with_a_host_set_up_as_flanneld_does(lab, tmp_path):
    """Host 3 is built by hand from docs/interop.md#vxlan (its vxlan device, its lease, its per-peer
    entries), standing in for a stock flanneld host: traffic flows both ways."""
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)

    h3 = lab.add_host(3)
    mac3 = "0e:11:22:33:44:55"
    for cmd in (
        ["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local",
         "192.168.100.3", "dev", "eth0", "dstport", "8472", "nolearning"],
        ["ip", "link", "set", "flannel.1", "address", mac3, "mtu", "1450"],
        ["ip", "addr", "add", "10.5.200.0/32", "dev", "flannel.1"],
        ["ip", "link", "set", "flannel.1", "up"],
    ):
        h3.exec(cmd)
    h3.add_docker0("10.5.200.1/24", 1450)
    c3 = h3.add_container("a", 1450)
    lease3 = ('{"PublicIP":"192.168.100.3","PublicIPv6":null,"BackendType":"vxlan",'
              f'"BackendData":{{"VNI":1,"VtepMAC":"{mac3}"}}}}')
    etcd.put_with_lease(subnet_key("10.5.200.0/24"), lease3, 86400)

    # What flanneld on host 3 does for tweed's lease, by hand.
    raw = etcd.get(subnet_key(a1.subnet))
    assert FLANNEL_LEASE.match(raw), raw  # byte-identical in shape to flanneld's
    doc = json.loads(raw)
    assert list(doc) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData"]
    mac1, gw1 = doc["BackendData"]["VtepMAC"], a1.subnet.split("/")[0]
    h3.exec(["ip", "neigh", "replace", gw1, "lladdr", mac1, "nud", "permanent",
             "dev", "flannel.1"])
    h3.exec(["bridge", "fdb", "replace", mac1, "dst", "192.168.100.1", "self", "permanent",
             "dev", "flannel.1"])
    h3.exec(["ip", "route", "replace", a1.subnet, "via", gw1, "dev", "flannel.1", "onlink"])

    wait_for(lambda: "via 10.5.200.0 dev flannel.1 onlink" in routes(h1, "10.5.200.0/24"),
             what="tweed's route to the flanneld host")
    assert f"10.5.200.0 lladdr {mac3} PERMANENT" in neigh(h1)
    assert ping(c1, c3.ip), "tweed -> flanneld-style host"
    assert ping(c3, c1.ip), "flanneld-style host -> tweed"


def test_vtep_mac_is_stable_and_entries_follow_the_leases(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    mac1 = vtep_mac(etcd, a1.subnet)
    index1 = link_json(h1, "flannel.1")["ifindex"]

    # Restart: same VtepMAC in the lease and on the (reused) device.
    assert a1.stop() == 0
    a1.start()
    wait_for(lambda: a1.log().count("vxlan device flannel.1") == 2, what="restarted")
    assert vtep_mac(etcd, a1.subnet) == mac1
    dev = link_json(h1, "flannel.1")
    assert dev["address"] == mac1 and dev["ifindex"] == index1
    assert ping(c1, c2.ip)

    # A peer (a stand-in lease) changes its MAC: neigh and FDB follow within 1 s.
    peer = "10.5.210.0/24"
    old, new = "0e:00:00:00:00:01", "0e:00:00:00:00:02"

    def lease(mac: str) -> str:
        return ('{"PublicIP":"192.168.100.9","PublicIPv6":null,"BackendType":"vxlan",'
                f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')

    etcd.put(subnet_key(peer), lease(old))
    wait_for(lambda: f"10.5.210.0 lladdr {old}" in neigh(h1), what="neigh for stand-in")
    etcd.put(subnet_key(peer), lease(new))
    wait_for(lambda: f"10.5.210.0 lladdr {new}" in neigh(h1)
             and f"{new} dst 192.168.100.9" in fdb(h1) and old not in fdb(h1),
             timeout=1, what="neigh/fdb follow the new MAC")

    # The lease goes: route, neighbour and FDB entry all go within 1 s of the grace in
    # which a lease that comes back keeps them (REMOVAL_GRACE).
    etcd.delete(subnet_key(peer))
    wait_for(lambda: routes(h1, peer) == "" and "10.5.210.0 " not in neigh(h1)
             and new not in fdb(h1), timeout=REMOVAL_GRACE + 1, what="entries removed")

    # Entries deleted by hand come back within the resync period (2 s here).
    mac2, gw2 = vtep_mac(etcd, a2.subnet), a2.subnet.split("/")[0]
    h1.exec(["ip", "route", "del", a2.subnet])
    h1.exec(["ip", "neigh", "del", gw2, "dev", "flannel.1"])
    h1.exec(["bridge", "fdb", "del", mac2, "dst", "192.168.100.2", "dev", "flannel.1"])
    wait_for(lambda: "onlink" in routes(h1, a2.subnet) and mac2 in neigh(h1)
             and mac2 in fdb(h1), timeout=2 + 3, what="resync restores the entries")
    assert ping(c1, c2.ip)


def test_incompatible_device_is_recreated(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    host = lab.add_host(1)
    host.exec(["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "7", "local",
               "192.168.100.1", "dev", "eth0", "dstport", "4789"])
    agent = Agent(host, etcd.client_url, tmp_path).start()
    agent.wait_env()
    wait_for(lambda: "vxlan device flannel.1" in agent.log(), what="device set up")
    info = link_json(host, "flannel.1")["linkinfo"]["info_data"]
    assert (info["id"], info["port"]) == (1, 8472)


def test_peers_of_another_backend_type_are_ignored(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    h1, _a1, _c1 = bring_up(lab, etcd, tmp_path, 1)
    etcd.put(subnet_key("10.5.220.0/24"),
             '{"PublicIP":"192.168.100.9","PublicIPv6":null,"BackendType":"host-gw"}')
    etcd.put(subnet_key("10.5.221.0/24"),
             '{"PublicIP":"192.168.100.8","PublicIPv6":null,"BackendType":"vxlan",'
             '"BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:08"}}')
    wait_for(lambda: "onlink" in routes(h1, "10.5.221.0/24"), what="vxlan peer programmed")
    assert routes(h1, "10.5.220.0/24") == ""


def test_direct_routing_routes_same_segment_peers_without_encapsulation(lab, tmp_path):
    etcd = lab.start_etcd()
    etcd.put("/coreos.com/network/config", json.dumps(
        {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": True}}))
    h1, _a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    # Host 2 shares host 1's segment: a plain route via its PublicIP, no vxlan entries.
    wait_for(lambda: "via 192.168.100.2 dev eth0" in routes(h1, a2.subnet),
             what="direct route to a same-segment peer")
    assert vtep_mac(etcd, a2.subnet) not in neigh(h1) + fdb(h1)
    before = link_json(h1, "flannel.1")["stats64"]["tx"]["packets"]
    assert ping(c1, c2.ip) and ping(c2, c1.ip)
    assert link_json(h1, "flannel.1")["stats64"]["tx"]["packets"] == before
    # A peer on another segment still goes through the vxlan device.
    etcd.put(subnet_key("10.5.230.0/24"),
             '{"PublicIP":"172.31.0.9","PublicIPv6":null,"BackendType":"vxlan",'
             '"BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:09"}}')
    wait_for(lambda: "via 10.5.230.0 dev flannel.1 onlink" in routes(h1, "10.5.230.0/24"),
             what="vxlan route to an off-segment peer")
    assert "0e:00:00:00:00:09 dst 172.31.0.9" in fdb(h1)
