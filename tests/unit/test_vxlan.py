"""Unit tests for backends.vxlan: options, VtepMAC, desired state, VxlanNetwork on FakeNetlink."""

from __future__ import annotations

import ipaddress
import json
import random
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.config import NetworkConfig, parse_config
from agent.lease import Lease, PeerEvent, PeerEventKind, PeerLease
from agent.lease_codec import LeaseAttrs, decode_lease, encode_lease
from backends.base import BackendContext, BackendError
from backends.external_iface import ExternalInterface
from backends.kernel.fake import FakeNetlink
from backends.kernel.types import Fdb, Neigh, Route, VxlanDevice, VxlanSpec
from backends.vxlan import (
    MacStore,
    VxlanBackend,
    VxlanNetwork,
    VxlanOptions,
    desired_state,
    parse_options,
    peer_mac,
    random_mac,
)


@pytest.fixture(autouse=True)
def _no_removal_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removals at once, as these tests expect; the grace has tests of its own
    (tests/unit/test_heal.py)."""
    monkeypatch.setattr("backends.routed.REMOVAL_GRACE", 0.0)

IP = ipaddress.IPv4Address
SEGMENT = ipaddress.IPv4Network("192.168.100.0/24")
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"), SEGMENT)
OWN = ipaddress.IPv4Network("10.5.1.0/24")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def config(**backend: Any) -> NetworkConfig:
    return parse_config(json.dumps(
        {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", **backend}}
    ))


CONFIG = config()


def mac(n: int) -> str:
    return f"0a:00:00:00:00:{n:02x}"


def attrs(n: int | str, vtep: Any, btype: str = "vxlan") -> LeaseAttrs:
    pub = IP(f"192.168.100.{n}") if isinstance(n, int) else IP(n)
    data = None if vtep is None else {"VNI": 1, "VtepMAC": vtep}
    return LeaseAttrs(pub, None, btype, data)


def peer(subnet: str, n: int | str, vtep: Any, btype: str = "vxlan",
         kind: str = "added") -> PeerEvent:
    return PeerEvent(PeerEventKind(kind), PeerLease(net(subnet), attrs(n, vtep, btype)))


def gone(subnet: str, n: int, vtep: str) -> PeerEvent:
    return peer(subnet, n, vtep, kind="removed")


def entries(subnet: str, n: int | str, vtep: str, dev: int) -> tuple[Neigh, Fdb, Route]:
    """The neighbour, FDB entry and route a vxlan peer should get."""
    s = net(subnet)
    pub = IP(f"192.168.100.{n}") if isinstance(n, int) else IP(n)
    return (Neigh(s.network_address, vtep, dev), Fdb(vtep, pub, dev),
            Route(s, s.network_address, dev, onlink=True))


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def own_lease(network: VxlanNetwork, subnet: ipaddress.IPv4Network = OWN) -> Lease:
    name = f"{subnet.network_address}-{subnet.prefixlen}"
    return Lease(subnet, name, network.lease_attrs, 5, None)


async def make_network(
    fake: FakeNetlink, tmp_path: Path, cfg: NetworkConfig = CONFIG,
    ext: ExternalInterface = EXT, seed: int = 1,
) -> VxlanNetwork:
    backend = VxlanBackend(BackendContext(fake, ext, 10.0, tmp_path, "subnet.env"),
                           rng=random.Random(seed))
    return await backend.register_network(cfg)


@pytest.fixture
def fake() -> FakeNetlink:
    return FakeNetlink()


@pytest.fixture
async def vx(fake: FakeNetlink, tmp_path: Path) -> VxlanNetwork:
    network = await make_network(fake, tmp_path)
    await network.setup(own_lease(network))
    return network


def kernel(fake: FakeNetlink) -> tuple[set[Neigh], set[Fdb], set[Route]]:
    return set(fake.neigh), set(fake.fdb), set(fake.table.values())


def expect(*peers: tuple[Neigh, Fdb, Route]) -> tuple[set[Neigh], set[Fdb], set[Route]]:
    return {p[0] for p in peers}, {p[1] for p in peers}, {p[2] for p in peers}


# -- parse_options ---------------------------------------------------------------------


def test_options_defaults() -> None:
    opts = parse_options(CONFIG.backend)
    assert opts == VxlanOptions(vni=1, port=0, gbp=False, learning=False,
                                direct_routing=False, mtu=0)


def test_options_from_config_keys_lower_cased_by_parser() -> None:
    cfg = parse_config(
        '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":42,"Port":4789,'
        '"DirectRouting":true,"MTU":1400}}'
    )
    assert parse_options(cfg.backend) == VxlanOptions(
        vni=42, port=4789, gbp=False, learning=False, direct_routing=True, mtu=1400
    )
    assert parse_options(config(gBp=True, LEARNING=True).backend).gbp is True
    assert parse_options(config(gBp=True, LEARNING=True).backend).learning is True


def test_options_limits_and_null() -> None:
    assert parse_options({"vni": (1 << 24) - 1}).vni == (1 << 24) - 1
    assert parse_options({"port": 65535}).port == 65535
    assert parse_options({"vni": None, "gbp": None}) == VxlanOptions()


@pytest.mark.parametrize(
    ("name", "value"),
    [("VNI", -1), ("VNI", 1 << 24), ("VNI", "1"), ("VNI", True), ("VNI", 1.0),
     ("Port", 70000), ("Port", -1), ("GBP", "yes"), ("Learning", 1),
     ("DirectRouting", "true"), ("MTU", -5)],
)
def test_options_bad_values_name_the_option(name: str, value: Any) -> None:
    with pytest.raises(BackendError, match=rf"^Backend\.{name}:"):
        parse_options({name.lower(): value})


async def test_register_network_rejects_bad_option(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"Backend\.VNI"):
        await make_network(FakeNetlink(), tmp_path, config(VNI=-1))
    assert files(tmp_path) == []  # no state file for a config that cannot run


# -- MACs ------------------------------------------------------------------------------


def test_random_mac_unicast_locally_administered() -> None:
    rng = random.Random(7)
    macs = [random_mac(rng) for _ in range(1000)]
    for m in macs:
        assert MAC_RE.fullmatch(m), m
        first = int(m[:2], 16)
        assert first & 1 == 0, m  # unicast
        assert first & 2 == 2, m  # locally administered
    assert len(set(macs)) > 990
    assert random_mac(random.Random(7)) == macs[0]


@pytest.mark.parametrize(
    ("data", "want"),
    [
        ({"VNI": 1, "VtepMAC": "0a:1b:2c:3d:4e:5f"}, "0a:1b:2c:3d:4e:5f"),
        ({"VNI": 1, "VtepMAC": "0A:1B:2C:3D:4E:5F"}, "0a:1b:2c:3d:4e:5f"),
        ({"vtepmac": "0a:1b:2c:3d:4e:5f"}, "0a:1b:2c:3d:4e:5f"),
        ({"VTEPMAC": "0A:1b:2c:3d:4e:5f"}, "0a:1b:2c:3d:4e:5f"),
        ({"VNI": 1}, None),
        ({"VtepMAC": None}, None),
        ({"VtepMAC": ""}, None),
        ({"VtepMAC": "0a:1b:2c:3d:4e"}, None),
        ({"VtepMAC": "0a:1b:2c:3d:4e:5f:60"}, None),
        ({"VtepMAC": "0a-1b-2c-3d-4e-5f"}, None),
        ({"VtepMAC": "zz:1b:2c:3d:4e:5f"}, None),
        ({"VtepMAC": 12345}, None),
        (None, None),
        ("0a:1b:2c:3d:4e:5f", None),
        (["0a:1b:2c:3d:4e:5f"], None),
    ],
)
def test_peer_mac(data: Any, want: str | None) -> None:
    assert peer_mac(LeaseAttrs(IP("192.168.100.2"), None, "vxlan", data)) == want


def test_peer_mac_rejects_trailing_newline() -> None:
    data = {"VNI": 1, "VtepMAC": "0a:1b:2c:3d:4e:5f\n"}
    assert peer_mac(LeaseAttrs(IP("192.168.100.2"), None, "vxlan", data)) is None


def test_mac_store_round_trip_mode_0600(tmp_path: Path) -> None:
    store = MacStore(tmp_path / "state" / "vtep.json")
    assert store.load() is None  # missing
    store.save("0a:1b:2c:3d:4e:5f")
    assert store.load() == "0a:1b:2c:3d:4e:5f"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert json.loads(store.path.read_text()) == {"VtepMAC": "0a:1b:2c:3d:4e:5f"}
    store.save("0a:1b:2c:3d:4e:60")
    assert MacStore(store.path).load() == "0a:1b:2c:3d:4e:60"


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[]", '["0a:1b:2c:3d:4e:5f"]', "{}", '{"VtepMAC": 5}',
     '{"VtepMAC": "nope"}', '{"VtepMAC": "0a:1b:2c:3d:4e"}', '"0a:1b:2c:3d:4e:5f"'],
)
def test_mac_store_load_invalid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "vtep.json"
    path.write_text(text)
    assert MacStore(path).load() is None


def test_mac_store_load_rejects_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "vtep.json"
    path.write_text(json.dumps({"VtepMAC": "0a:1b:2c:3d:4e:5f\n"}))
    assert MacStore(path).load() is None


# -- desired_state ---------------------------------------------------------------------


def test_desired_state_vxlan_peer() -> None:
    peers = {net("10.5.2.0/24"): attrs(2, mac(2)), net("10.5.3.0/24"): attrs(3, mac(3))}
    routes, neigh, fdb = desired_state(peers, 10, EXT, direct_routing=False)
    assert neigh == {IP("10.5.2.0"): Neigh(IP("10.5.2.0"), mac(2), 10),
                     IP("10.5.3.0"): Neigh(IP("10.5.3.0"), mac(3), 10)}
    assert fdb == {mac(2): Fdb(mac(2), IP("192.168.100.2"), 10),
                   mac(3): Fdb(mac(3), IP("192.168.100.3"), 10)}
    assert routes == {net("10.5.2.0/24"): Route(net("10.5.2.0/24"), IP("10.5.2.0"), 10, True),
                      net("10.5.3.0/24"): Route(net("10.5.3.0/24"), IP("10.5.3.0"), 10, True)}


def test_desired_state_direct_routing_on_segment() -> None:
    peers = {net("10.5.2.0/24"): attrs(2, mac(2))}
    routes, neigh, fdb = desired_state(peers, 10, EXT, direct_routing=True)
    assert routes == {net("10.5.2.0/24"): Route(net("10.5.2.0/24"), IP("192.168.100.2"), 2)}
    assert neigh == {}
    assert fdb == {}


def test_desired_state_direct_routing_off_segment_uses_vxlan() -> None:
    peers = {net("10.5.2.0/24"): attrs("172.16.0.2", mac(2))}
    routes, neigh, fdb = desired_state(peers, 10, EXT, direct_routing=True)
    assert routes == {net("10.5.2.0/24"): Route(net("10.5.2.0/24"), IP("10.5.2.0"), 10, True)}
    assert neigh == {IP("10.5.2.0"): Neigh(IP("10.5.2.0"), mac(2), 10)}
    assert fdb == {mac(2): Fdb(mac(2), IP("172.16.0.2"), 10)}


def test_desired_state_no_direct_routing_without_flag_or_segment() -> None:
    peers = {net("10.5.2.0/24"): attrs(2, mac(2))}
    for ext, flag in ((EXT, False), (ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"),
                                                       IP("192.168.100.1")), True)):
        routes, neigh, fdb = desired_state(peers, 10, ext, direct_routing=flag)
        assert routes[net("10.5.2.0/24")].oif == 10
        assert set(neigh) == {IP("10.5.2.0")}
        assert set(fdb) == {mac(2)}


def test_desired_state_skips_peer_without_valid_mac() -> None:
    peers = {net("10.5.2.0/24"): attrs(2, None), net("10.5.3.0/24"): attrs(3, "bad"),
             net("10.5.4.0/24"): attrs(4, mac(4))}
    for flag in (False, True):
        routes, _, fdb = desired_state(peers, 10, EXT, direct_routing=flag)
        assert set(routes) == {net("10.5.4.0/24")}
        assert set(fdb) == (set() if flag else {mac(4)})


# -- VxlanBackend / VxlanNetwork: registration and setup -----------------------------------


async def test_lease_attrs_encode_as_flanneld(fake: FakeNetlink, tmp_path: Path) -> None:
    network = await make_network(fake, tmp_path)
    assert MAC_RE.fullmatch(network.mac)
    assert encode_lease(network.lease_attrs) == (
        '{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{network.mac}"}}}}'
    ).encode()
    decoded = decode_lease(encode_lease(network.lease_attrs))
    assert peer_mac(decoded) == network.mac


async def test_lease_attrs_carry_vni_and_public_ip(tmp_path: Path) -> None:
    ext = ExternalInterface("eth0", 2, 1500, IP("10.0.0.5"), IP("203.0.113.9"))
    network = await make_network(FakeNetlink(), tmp_path, config(VNI=42), ext)
    assert network.lease_attrs.public_ip == IP("203.0.113.9")
    assert network.lease_attrs.backend_data == {"VNI": 42, "VtepMAC": network.mac}
    assert network.dev_name == "flannel.42"


@pytest.mark.parametrize(
    ("ext_mtu", "opt", "want"), [(1500, None, 1450), (9000, None, 8950), (1500, 1400, 1350),
                                 (1500, 118, 68)],
)
async def test_mtu(tmp_path: Path, ext_mtu: int, opt: int | None, want: int) -> None:
    ext = ExternalInterface("eth0", 2, ext_mtu, IP("192.168.100.1"), IP("192.168.100.1"))
    cfg = config() if opt is None else config(MTU=opt)
    network = await make_network(FakeNetlink(), tmp_path, cfg, ext)
    assert network.mtu == want


@pytest.mark.parametrize(("ext_mtu", "opt"), [(1500, 117), (1500, 50), (117, None)])
async def test_mtu_too_small_is_an_error(tmp_path: Path, ext_mtu: int, opt: int | None) -> None:
    ext = ExternalInterface("eth0", 2, ext_mtu, IP("192.168.100.1"), IP("192.168.100.1"))
    cfg = config() if opt is None else config(MTU=opt)
    with pytest.raises(BackendError, match=r"Backend\.MTU.*68"):
        await make_network(FakeNetlink(), tmp_path, cfg, ext)


async def test_setup_ensures_device(fake: FakeNetlink, tmp_path: Path) -> None:
    ext = ExternalInterface("eth0", 2, 1500, IP("10.0.0.5"), IP("203.0.113.9"))
    network = await make_network(fake, tmp_path, ext=ext)
    assert network.ready() is False
    await network.setup(own_lease(network))
    assert [c[0] for c in fake.calls] == ["ensure_vxlan"]
    dev = fake.calls[0][1]
    assert isinstance(dev, VxlanDevice)
    assert dev.spec == VxlanSpec("flannel.1", 1, IP("10.0.0.5"), 2, 0, False, False)
    assert dev.mac == network.mac
    assert dev.mtu == 1450
    assert dev.addresses == (ipaddress.IPv4Interface("10.5.1.0/32"),)
    assert network.dev_index == dev.index != 0
    assert network.ready() is True


async def test_setup_spec_follows_options(fake: FakeNetlink, tmp_path: Path) -> None:
    network = await make_network(fake, tmp_path, config(VNI=7, Port=4789, GBP=True,
                                                        Learning=True))
    await network.setup(own_lease(network))
    assert fake.vxlan["flannel.7"].spec == VxlanSpec(
        "flannel.7", 7, IP("192.168.100.1"), 2, 4789, True, True
    )


async def test_setup_failure_is_backend_error(tmp_path: Path) -> None:
    class Broken(FakeNetlink):
        async def ensure_vxlan(self, *args: Any) -> VxlanDevice:
            raise OSError("EEXIST")

    network = await make_network(Broken(), tmp_path)
    with pytest.raises(BackendError, match=r"flannel\.1"):
        await network.setup(own_lease(network))
    assert network.ready() is False


async def test_vtep_mac_kept_across_restarts(tmp_path: Path) -> None:
    first = await make_network(FakeNetlink(), tmp_path, seed=1)
    state = tmp_path / "subnet.env.flannel.1.json"
    assert files(tmp_path) == [state.name]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text()) == {"VtepMAC": first.mac}
    second = await make_network(FakeNetlink(), tmp_path, seed=2)
    assert second.mac == first.mac
    other = await make_network(FakeNetlink(), tmp_path / "elsewhere", seed=2)
    assert other.mac != first.mac  # a fresh state dir draws a new MAC


async def test_vtep_mac_adopted_from_existing_device(fake: FakeNetlink, tmp_path: Path) -> None:
    spec = VxlanSpec("flannel.1", 1, IP("192.168.100.1"), 2, 0)
    fake.vxlan["flannel.1"] = VxlanDevice(spec, 7, "0e:11:22:33:44:55", 1450, True, ())
    network = await make_network(fake, tmp_path)
    assert network.mac == "0e:11:22:33:44:55"
    assert MacStore(tmp_path / "subnet.env.flannel.1.json").load() == "0e:11:22:33:44:55"


async def test_vtep_mac_not_adopted_from_device_of_other_vni(
    fake: FakeNetlink, tmp_path: Path
) -> None:
    spec = VxlanSpec("flannel.1", -1, IP("0.0.0.0"), 0, 0)  # not a vxlan device
    fake.vxlan["flannel.1"] = VxlanDevice(spec, 7, "0e:11:22:33:44:55", 1500, True, ())
    network = await make_network(fake, tmp_path)
    assert network.mac != "0e:11:22:33:44:55"
    assert MAC_RE.fullmatch(network.mac)


async def test_state_file_wins_over_device_mac(fake: FakeNetlink, tmp_path: Path) -> None:
    MacStore(tmp_path / "subnet.env.flannel.1.json").save("0e:00:00:00:00:01")
    spec = VxlanSpec("flannel.1", 1, IP("192.168.100.1"), 2, 0)
    fake.vxlan["flannel.1"] = VxlanDevice(spec, 7, "0e:11:22:33:44:55", 1450, True, ())
    network = await make_network(fake, tmp_path)
    assert network.mac == "0e:00:00:00:00:01"
    await network.setup(own_lease(network))
    assert fake.vxlan["flannel.1"].mac == "0e:00:00:00:00:01"


# -- VxlanNetwork: peers -------------------------------------------------------------------


async def test_peers_programmed(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    dev = vx.dev_index
    await vx.apply([peer("10.5.2.0/24", 2, mac(2)), peer("10.5.3.0/24", 3, mac(3))])
    assert kernel(fake) == expect(entries("10.5.2.0/24", 2, mac(2), dev),
                                  entries("10.5.3.0/24", 3, mac(3), dev))
    assert vx.ready() is True
    assert vx.kernel.errors == 0
    assert await vx.sync() is False  # converged


async def test_new_peer_fdb_and_neigh_before_route(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    fake.calls.clear()
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    n, f, r = entries("10.5.2.0/24", 2, mac(2), vx.dev_index)
    assert fake.calls == [("replace", f), ("replace", n), ("replace", r)]


async def test_peer_mac_upper_case_converges(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2).upper())])
    assert kernel(fake) == expect(entries("10.5.2.0/24", 2, mac(2), vx.dev_index))
    assert await vx.sync() is False


async def test_peer_mac_change(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    old = entries("10.5.2.0/24", 2, mac(2), vx.dev_index)
    await vx.apply([peer("10.5.2.0/24", 2, mac(9))])
    assert kernel(fake) == expect(entries("10.5.2.0/24", 2, mac(9), vx.dev_index))
    assert ("delete", old[1]) in fake.calls


async def test_peer_public_ip_change(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    await vx.apply([peer("10.5.2.0/24", 22, mac(2))])
    assert fake.fdb == {Fdb(mac(2), IP("192.168.100.22"), vx.dev_index)}
    assert kernel(fake) == expect(entries("10.5.2.0/24", 22, mac(2), vx.dev_index))


async def test_peer_removal_deletes_all_three(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2)), peer("10.5.3.0/24", 3, mac(3))])
    fake.calls.clear()
    await vx.apply([gone("10.5.2.0/24", 2, mac(2))])
    n, f, r = entries("10.5.2.0/24", 2, mac(2), vx.dev_index)
    assert kernel(fake) == expect(entries("10.5.3.0/24", 3, mac(3), vx.dev_index))
    assert fake.calls == [("delete", r), ("delete", n), ("delete", f)]  # route goes first


async def test_other_backend_types_ignored(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2), "host-gw"),
                    peer("10.5.3.0/24", 3, mac(3), "udp"),
                    peer("10.5.4.0/24", 4, mac(4), "")])
    assert kernel(fake) == (set(), set(), set())
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    assert fake.table
    await vx.apply([peer("10.5.2.0/24", 2, mac(2), "host-gw")])  # switched backend
    assert kernel(fake) == (set(), set(), set())


async def test_peer_without_valid_mac_skipped_and_cleared(
    vx: VxlanNetwork, fake: FakeNetlink
) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, None), peer("10.5.3.0/24", 3, "bad")])
    assert kernel(fake) == (set(), set(), set())
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    await vx.apply([peer("10.5.2.0/24", 2, "0a:00")])
    assert kernel(fake) == (set(), set(), set())


async def test_own_subnet_never_programmed(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer(str(OWN), 9, mac(9))])
    assert kernel(fake) == (set(), set(), set())


async def test_entries_removed_behind_our_back_come_back(
    vx: VxlanNetwork, fake: FakeNetlink
) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2)), peer("10.5.3.0/24", 3, mac(3))])
    want = kernel(fake)
    n, f, r = entries("10.5.2.0/24", 2, mac(2), vx.dev_index)
    fake.neigh.discard(n)
    fake.fdb.discard(f)
    del fake.table[r.dst]
    assert await vx.sync() is True
    assert kernel(fake) == want
    # Changed by hand: put back too.
    fake.neigh = {x for x in fake.neigh if x != n} | {Neigh(n.ip, mac(77), n.index)}
    fake.fdb = {x for x in fake.fdb if x != f} | {Fdb(f.mac, IP("192.168.100.77"), f.index)}
    assert await vx.sync() is True
    assert kernel(fake) == want
    assert await vx.sync() is False


async def test_stray_neigh_and_fdb_on_device_removed(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    want = kernel(fake)
    fake.neigh.add(Neigh(IP("10.5.9.0"), mac(9), vx.dev_index))
    fake.fdb.add(Fdb(mac(9), IP("192.168.100.9"), vx.dev_index))
    other_dev = (Neigh(IP("10.5.9.0"), mac(9), 2), Fdb(mac(9), IP("192.168.100.9"), 3))
    fake.neigh.add(other_dev[0])
    fake.fdb.add(other_dev[1])
    await vx.sync()
    assert kernel(fake) == (want[0] | {other_dev[0]}, want[1] | {other_dev[1]}, want[2])


async def test_foreign_routes_never_deleted(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    dev = vx.dev_index
    foreign = [
        Route(net("10.6.1.0/24"), IP("192.168.100.52"), 2),  # outside Network
        Route(net("10.5.8.0/24"), IP("192.168.100.53"), 3),  # another interface
        Route(net("10.5.9.0/24"), None, 2),  # no gateway
        Route(net("10.5.10.0/24"), None, dev),  # no gateway, on flannel.1
        Route(net("0.0.0.0/0"), IP("192.168.100.254"), 2),  # default route
        Route(net("10.5.0.0/16"), IP("192.168.100.254"), 2),  # not peer-sized
        Route(OWN, IP("192.168.100.54"), 2),  # our own subnet
        Route(net("10.7.0.0/24"), IP("10.7.0.0"), dev, True),  # outside Network, flannel.1
    ]
    for r in foreign:
        fake.table[r.dst] = r
    stale = Route(net("10.5.11.0/24"), IP("10.5.11.0"), dev, True)  # looks like ours
    fake.table[stale.dst] = stale
    fake.calls.clear()
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    await vx.sync()
    for r in foreign:
        assert fake.table.get(r.dst) == r, r
    assert stale.dst not in fake.table
    assert [c for c in fake.calls if c[0] == "delete"] == [("delete", stale)]


async def test_kernel_errors_counted_not_ready_then_recover(
    vx: VxlanNetwork, fake: FakeNetlink
) -> None:
    fake.fail = lambda op, item: "EPERM" if isinstance(item, Fdb) else None
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    assert vx.ready() is False
    assert vx.kernel.errors == 1
    assert fake.fdb == set()
    await vx.sync()
    assert vx.kernel.errors == 2
    fake.fail = lambda op, item: None
    assert await vx.sync() is True
    assert vx.ready() is True
    assert vx.kernel.errors == 2
    assert kernel(fake) == expect(entries("10.5.2.0/24", 2, mac(2), vx.dev_index))


async def test_delete_error_counted(vx: VxlanNetwork, fake: FakeNetlink) -> None:
    await vx.apply([peer("10.5.2.0/24", 2, mac(2))])
    fake.fail = lambda op, item: "EBUSY" if op == "delete" and isinstance(item, Neigh) else None
    await vx.apply([gone("10.5.2.0/24", 2, mac(2))])
    assert vx.ready() is False
    assert vx.kernel.errors == 1
    assert fake.table == {} and fake.fdb == set()
    fake.fail = lambda op, item: None
    await vx.sync()
    assert vx.ready() is True
    assert fake.neigh == set()


# -- VxlanNetwork: DirectRouting -----------------------------------------------------------


async def test_direct_routing_network(fake: FakeNetlink, tmp_path: Path) -> None:
    network = await make_network(fake, tmp_path, config(DirectRouting=True))
    await network.setup(own_lease(network))
    dev = network.dev_index
    await network.apply([peer("10.5.2.0/24", 2, mac(2)),
                         peer("10.5.3.0/24", "172.16.0.3", mac(3))])
    direct = Route(net("10.5.2.0/24"), IP("192.168.100.2"), 2)
    assert kernel(fake) == (
        {Neigh(IP("10.5.3.0"), mac(3), dev)},
        {Fdb(mac(3), IP("172.16.0.3"), dev)},
        {direct, Route(net("10.5.3.0/24"), IP("10.5.3.0"), dev, True)},
    )
    assert await network.sync() is False
    # The peer moves off our segment: the direct route gives way to the vxlan entries.
    await network.apply([peer("10.5.2.0/24", "172.16.0.2", mac(2))])
    assert fake.table[net("10.5.2.0/24")] == Route(net("10.5.2.0/24"), IP("10.5.2.0"), dev, True)
    assert Neigh(IP("10.5.2.0"), mac(2), dev) in fake.neigh
    # Back on our segment: direct route again, its neighbour and FDB entry gone.
    await network.apply([peer("10.5.2.0/24", 2, mac(2))])
    assert fake.table[net("10.5.2.0/24")] == direct
    assert Neigh(IP("10.5.2.0"), mac(2), dev) not in fake.neigh
    assert Fdb(mac(2), IP("172.16.0.2"), dev) not in fake.fdb
    # It leaves: the route on eth0 goes too.
    await network.apply([gone("10.5.2.0/24", 2, mac(2))])
    assert net("10.5.2.0/24") not in fake.table
