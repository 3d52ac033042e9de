"""IPv6 in the pure control plane (issue 14): dual-stack and IPv6-only subnet keys and lease
JSON (flanneld's bytes, hypothesis round trips), the allocator over IPv6 ranges, subnet.env's
FLANNEL_IPV6_* lines read back, and `tweed docker-opts`' --ipv6 --fixed-cidr-v6."""

from __future__ import annotations

import ipaddress
import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.allocator import (
    CANDIDATES,
    Existing,
    OutOfSubnets,
    choose_subnet,
    free_ipv6_subnets,
)
from agent.config import parse_config
from agent.docker_opts import DockerOptsError, docker_options, render
from agent.lease_codec import (
    NO_PUBLIC_IP,
    LeaseAttrs,
    LeaseDecodeError,
    SubnetKey,
    decode_lease,
    encode_lease,
    format_subnet_key,
    parse_subnet_key,
)
from agent.subnet_file import (
    SubnetEnv,
    previous_ipv6_subnet,
    read_previous_ipv6_subnet,
    render_subnet_env,
)

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network
ME = ipaddress.IPv4Address("192.168.100.1")
ME6 = ipaddress.IPv6Address("fd00:100::1")
OTHER = ipaddress.IPv4Address("192.168.100.2")
OTHER6 = ipaddress.IPv6Address("fd00:100::2")
BOTH = frozenset({4, 6})
ONLY6 = frozenset({6})

#: flanneld's subnet key regexp (pkg/subnet/subnet.go, v0.20.2 to today), used the way
#: ParseSubnetKey uses it: FindStringSubmatch, anchored at the end only.
FLANNEL_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


# -- keys -------------------------------------------------------------------------------------


def test_dual_stack_key_is_flanneld_form_both_ways() -> None:
    key = SubnetKey(V4("10.5.34.0/24"), V6("fc00:0:0:5::/64"))
    assert format_subnet_key(key) == "10.5.34.0-24&fc00:0:0:5::-64"
    assert parse_subnet_key("10.5.34.0-24&fc00:0:0:5::-64") == key


def test_ipv6_only_key_is_the_ipv6_subnet_alone() -> None:
    key = SubnetKey(None, V6("fd00:12:13::/56"))
    assert format_subnet_key(key) == "fd00:12:13::-56"
    assert parse_subnet_key("fd00:12:13::-56") == key
    # flanneld's regexp does not match it: its listing and watch skip the key.
    assert FLANNEL_KEY_RE.search("fd00:12:13::-56") is None


@pytest.mark.parametrize("name", [
    "fd00:12:13::1-56",  # host bits set
    "fd00:12:13::-129",  # no such prefix length
    "fd00:::1-64",  # not an address
    "1234-24",  # neither form
    "10.5.34.0-24&fd00:12:13::1-56",  # dual key, host bits in the IPv6 part
    "10.5.34.0-24&fd00:12:13::-200",
    "10.5.34.0-24&-64",
    "10.5.34.0-24&",
])
def test_malformed_ipv6_keys_are_one_clear_error(name: str) -> None:
    with pytest.raises(LeaseDecodeError) as exc:
        parse_subnet_key(name)
    assert name in str(exc.value)
    assert "\n" not in str(exc.value)


ipv4_subnets = st.builds(
    lambda addr, plen: V4((addr, plen), strict=False),
    st.integers(0, 2**32 - 1), st.integers(1, 32))
ipv6_subnets = st.builds(
    lambda addr, plen: V6((addr, plen), strict=False),
    st.integers(0, 2**128 - 1), st.integers(1, 128),
).filter(lambda n: not n.overlaps(V6("::ffff:0:0/96")))


@settings(max_examples=300, deadline=None)
@given(v4=st.none() | ipv4_subnets, v6=st.none() | ipv6_subnets)
def test_key_round_trip_any_family(v4: V4 | None, v6: V6 | None) -> None:
    if v4 is None and v6 is None:
        return
    key = SubnetKey(v4, v6)
    name = format_subnet_key(key)
    assert parse_subnet_key(name) == key
    # flanneld reads exactly the keys that have an IPv4 part, and reads them as we do.
    m = FLANNEL_KEY_RE.search(name)
    if v4 is None:
        assert m is None
    else:
        assert m is not None and m.group(1) == str(v4.network_address)
        assert m.group(3) == (None if v6 is None else str(v6.network_address))


# -- lease JSON -------------------------------------------------------------------------------

#: A flanneld v0.20.2 vxlan host in a dual-stack cluster, as its Go struct marshals it.
FLANNELD_DUAL = (
    b'{"PublicIP":"192.168.100.2","PublicIPv6":"fd00:100::2","BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},'
    b'"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}'
)


def test_dual_stack_vxlan_lease_is_flanneld_bytes_both_ways() -> None:
    attrs = LeaseAttrs(OTHER, OTHER6, "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:01"},
                       {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:02"})
    assert encode_lease(attrs) == FLANNELD_DUAL
    assert decode_lease(FLANNELD_DUAL) == attrs


def test_backend_v6_data_is_omitted_when_empty_as_flanneld_omitempty() -> None:
    assert encode_lease(LeaseAttrs(ME, ME6, "host-gw")) == (
        b'{"PublicIP":"192.168.100.1","PublicIPv6":"fd00:100::1","BackendType":"host-gw"}')
    assert decode_lease(b'{"PublicIP":"192.168.100.1","backendv6data":{"VNI":2}}') == (
        LeaseAttrs(ME, None, "", None, {"VNI": 2}))


def test_ipv6_only_lease_says_public_ip_0000_as_flanneld_struct_would() -> None:
    attrs = LeaseAttrs(NO_PUBLIC_IP, ME6, "host-gw")
    value = encode_lease(attrs)
    assert value == (
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:100::1","BackendType":"host-gw"}')
    assert decode_lease(value) == attrs


@pytest.mark.parametrize("value", [
    b'{"PublicIP":"192.168.100.1","PublicIPv6":"192.168.100.1"}',
    b'{"PublicIP":"192.168.100.1","PublicIPv6":"fd00::zz"}',
    b'{"PublicIP":"192.168.100.1","PublicIPv6":7}',
])
def test_malformed_public_ipv6_is_one_clear_error(value: bytes) -> None:
    with pytest.raises(LeaseDecodeError, match="PublicIPv6"):
        decode_lease(value)


json_scalars = st.none() | st.booleans() | st.integers(-2**31, 2**31) | st.text(max_size=8)
backend_data = st.none() | st.dictionaries(
    st.text(min_size=1, max_size=8), json_scalars, min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(v4=st.integers(0, 2**32 - 1), v6=st.none() | st.integers(0, 2**128 - 1),
       btype=st.sampled_from(["", "vxlan", "host-gw", "udp"]),
       data=backend_data, data6=backend_data)
def test_lease_json_round_trip_in_flanneld_field_order(
    v4: int, v6: int | None, btype: str, data: object, data6: object
) -> None:
    attrs = LeaseAttrs(ipaddress.IPv4Address(v4),
                       None if v6 is None else ipaddress.IPv6Address(v6), btype, data, data6)
    value = encode_lease(attrs)
    assert decode_lease(value) == attrs
    fields = list(json.loads(value))
    expected = ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"]
    assert fields == [f for f in expected if f in fields]
    assert fields[:2] == ["PublicIP", "PublicIPv6"]  # never omitted (no omitempty)
    assert ("BackendType" in fields) == bool(btype)
    assert ("BackendData" in fields) == (data is not None)
    assert ("BackendV6Data" in fields) == (data6 is not None)


# -- allocator over IPv6 ranges ---------------------------------------------------------------


def config(**fields: object):
    fields.setdefault("Network", "10.5.0.0/16")
    fields.setdefault("EnableIPv6", True)
    fields.setdefault("IPv6Network", "fd00:5::/48")
    return parse_config(json.dumps(fields))


def v6only(**fields: object):
    return parse_config(json.dumps({"EnableIPv4": False, "EnableIPv6": True,
                                    "IPv6Network": "fd00:5::/48", **fields}))


def existing(v4: str | None, v6: str | None, ip: ipaddress.IPv4Address = OTHER,
             ip6: ipaddress.IPv6Address | None = OTHER6, ttl: bool = True) -> Existing:
    key = SubnetKey(None if v4 is None else V4(v4), None if v6 is None else V6(v6))
    return Existing(key.ipv4, LeaseAttrs(ip, ip6, "host-gw"), ttl, format_subnet_key(key), 3,
                    key.ipv6)


def test_ipv6_defaults_of_a_48_are_64s_from_the_second_to_the_last() -> None:
    c = config()
    assert c.ipv6_subnet_len == 64
    free = free_ipv6_subnets(c, [])
    assert len(free) == CANDIDATES
    assert free[0] == V6("fd00:5:0:1::/64")
    assert free[-1] == V6("fd00:5:0:64::/64")
    assert c.ipv6_subnet_max == ipaddress.IPv6Address("fd00:5:0:ffff::")


def test_dual_stack_choice_has_both_parts_in_range() -> None:
    c = config()
    r = random.Random(3)
    for _ in range(50):
        choice = choose_subnet(c, ME, [], None, r, families=BOTH, public_ipv6=ME6)
        assert choice.subnet is not None and c.subnet_fits(choice.subnet)
        assert choice.ipv6 is not None and c.ipv6_subnet_fits(choice.ipv6)


def test_ipv4_only_families_give_no_ipv6_part_even_with_ipv6_enabled() -> None:
    choice = choose_subnet(config(), ME, [], None, random.Random(1), families=frozenset({4}))
    assert choice.subnet is not None and choice.ipv6 is None


def test_own_dual_lease_is_reused_whole() -> None:
    mine = existing("10.5.42.0/24", "fd00:5:0:42::/64", ME, ME6)
    choice = choose_subnet(config(), ME, [existing("10.5.1.0/24", "fd00:5:0:1::/64"), mine],
                           None, random.Random(1), families=BOTH, public_ipv6=ME6)
    assert choice.reuse == mine
    assert (choice.subnet, choice.ipv6) == (V4("10.5.42.0/24"), V6("fd00:5:0:42::/64"))


def test_own_v4_only_lease_does_not_fit_a_dual_host_and_its_v4_subnet_is_kept() -> None:
    """flanneld's isIPv6SubnetConfigCompat: a lease without an IPv6 part does not fit a
    dual-stack host; it is deleted, and (tweed) its IPv4 subnet, from subnet.env, kept."""
    old = existing("10.5.42.0/24", None, ME, None)
    choice = choose_subnet(config(), ME, [old], V4("10.5.42.0/24"), random.Random(1),
                           families=BOTH, public_ipv6=ME6)
    assert choice.stale == (old,) and choice.reuse is None
    assert choice.subnet == V4("10.5.42.0/24")
    assert choice.ipv6 is not None


def test_own_dual_lease_does_not_fit_a_v4_only_host() -> None:
    old = existing("10.5.42.0/24", "fd00:5:0:42::/64", ME, ME6)
    choice = choose_subnet(config(), ME, [old], None, random.Random(1),
                           families=frozenset({4}))
    assert choice.stale == (old,)
    assert choice.ipv6 is None


def test_previous_ipv6_subnet_is_taken_when_free_and_fitting() -> None:
    c = config()
    prev6 = V6("fd00:5:0:77::/64")
    choice = choose_subnet(c, ME, [existing("10.5.1.0/24", "fd00:5:0:1::/64")],
                           V4("10.5.77.0/24"), random.Random(1), families=BOTH,
                           public_ipv6=ME6, previous6=prev6)
    assert (choice.subnet, choice.ipv6) == (V4("10.5.77.0/24"), prev6)
    # Taken by another host: a random free one instead (the IPv4 previous still holds).
    for seed in range(20):
        choice = choose_subnet(c, ME, [existing("10.5.1.0/24", "fd00:5:0:77::/64")],
                               V4("10.5.77.0/24"), random.Random(seed), families=BOTH,
                               public_ipv6=ME6, previous6=prev6)
        assert choice.subnet == V4("10.5.77.0/24")
        assert choice.ipv6 != prev6 and choice.ipv6 is not None
    # Not fitting (another length, outside the network): not taken.
    for bad in (V6("fd00:5:0:77::/80"), V6("fd00:6:0:77::/64"), V6("fd00:5::/64")):
        choice = choose_subnet(c, ME, [], None, random.Random(1), families=BOTH,
                               public_ipv6=ME6, previous6=bad)
        assert choice.ipv6 != bad


def test_ipv6_random_pick_is_among_first_100_free_and_uniform() -> None:
    c = config()
    taken = [existing(f"10.5.{i}.0/24", f"fd00:5:0:{i:x}::/64") for i in range(1, 200, 2)]
    free_all = [s for s in (V6((int(V6("fd00:5::/48").network_address) + (i << 64), 64))
                            for i in range(1, 400)) if s not in {t.ipv6 for t in taken}]
    first_100 = set(free_all[:100])
    picks = set()
    r = random.Random(5)
    for _ in range(1500):
        choice = choose_subnet(c, ME, taken, None, r, families=BOTH, public_ipv6=ME6)
        assert choice.ipv6 in first_100
        picks.add(choice.ipv6)
    assert picks == first_100


def test_ipv6_lease_of_another_length_blocks_what_it_overlaps() -> None:
    c = config(IPv6SubnetMin="fd00:5:0:1::", IPv6SubnetMax="fd00:5:0:2::")
    block = existing("10.5.1.0/24", "fd00:5::/62")  # covers :1:: to :3::
    with pytest.raises(OutOfSubnets, match="out of IPv6 subnets"):
        choose_subnet(c, ME, [block], None, random.Random(1), families=BOTH, public_ipv6=ME6)


def test_120_subnets_edge_cases() -> None:
    """A /118 with /120 subnets: 4 subnets, the first left out, 3 leasable."""
    c = config(IPv6Network="fd00:5::/118", IPv6SubnetLen=120)
    assert c.ipv6_subnet_min == ipaddress.IPv6Address("fd00:5::100")
    assert c.ipv6_subnet_max == ipaddress.IPv6Address("fd00:5::300")
    assert free_ipv6_subnets(c, []) == [V6("fd00:5::100/120"), V6("fd00:5::200/120"),
                                        V6("fd00:5::300/120")]
    taken = [existing(f"10.5.{i}.0/24", f"fd00:5::{i}00/120") for i in (1, 3)]
    for seed in range(10):
        choice = choose_subnet(c, ME, taken, None, random.Random(seed), families=BOTH,
                               public_ipv6=ME6)
        assert choice.ipv6 == V6("fd00:5::200/120")
    taken.append(existing("10.5.2.0/24", "fd00:5::200/120"))
    with pytest.raises(OutOfSubnets) as exc:
        choose_subnet(c, ME, taken, None, random.Random(1), families=BOTH, public_ipv6=ME6)
    assert str(exc.value) == ("out of IPv6 subnets: every /120 between fd00:5::100 and"
                              " fd00:5::300 in fd00:5::/118 is leased")


def test_a_full_48_is_walked_as_integers() -> None:
    """65,535 leasable /64s, all but the last taken: found without a list of them all."""
    c = config()
    taken = [V6((int(V6("fd00:5::/48").network_address) + (i << 64), 64))
             for i in range(1, 65535)]
    assert free_ipv6_subnets(c, taken) == [V6("fd00:5:0:ffff::/64")]


def test_ipv6_only_own_lease_is_found_by_public_ipv6() -> None:
    c = v6only()
    mine = existing(None, "fd00:5:0:9::/64", NO_PUBLIC_IP, ME6)
    other = existing(None, "fd00:5:0:8::/64", NO_PUBLIC_IP, OTHER6)
    choice = choose_subnet(c, NO_PUBLIC_IP, [other, mine], None, random.Random(1),
                           families=ONLY6, public_ipv6=ME6)
    assert choice.reuse == mine
    assert (choice.subnet, choice.ipv6) == (None, V6("fd00:5:0:9::/64"))


def test_ipv6_only_new_lease_avoids_the_ipv6_parts_of_every_key() -> None:
    c = v6only(IPv6SubnetMin="fd00:5:0:1::", IPv6SubnetMax="fd00:5:0:3::")
    taken = [existing(None, "fd00:5:0:1::/64"), existing("10.5.1.0/24", "fd00:5:0:3::/64")]
    for seed in range(10):
        choice = choose_subnet(c, NO_PUBLIC_IP, taken, None, random.Random(seed),
                               families=ONLY6, public_ipv6=ME6)
        assert (choice.subnet, choice.ipv6) == (None, V6("fd00:5:0:2::/64"))


# -- subnet.env and docker-opts ---------------------------------------------------------------

DUAL_ENV = SubnetEnv(V4("10.5.0.0/16"), V4("10.5.72.0/24"), 1450, False,
                     V6("fd00:5::/48"), V6("fd00:5:0:72::/64"))


def test_subnet_env_ipv6_lines_in_flanneld_order_and_read_back() -> None:
    text = render_subnet_env(DUAL_ENV)
    assert text == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
                    "FLANNEL_IPV6_NETWORK=fd00:5::/48\nFLANNEL_IPV6_SUBNET=fd00:5:0:72::1/64\n"
                    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    assert previous_ipv6_subnet(text) == V6("fd00:5:0:72::/64")
    assert previous_ipv6_subnet("FLANNEL_IPV6_SUBNET=not-an-address\n") is None
    assert previous_ipv6_subnet("FLANNEL_SUBNET=10.5.72.1/24\n") is None


def test_subnet_env_ipv6_only_has_no_ipv4_lines(tmp_path) -> None:
    env = SubnetEnv(None, None, 1500, False, V6("fd00:5::/48"), V6("fd00:5:0:3::/64"))
    text = render_subnet_env(env)
    assert text == ("FLANNEL_IPV6_NETWORK=fd00:5::/48\nFLANNEL_IPV6_SUBNET=fd00:5:0:3::1/64\n"
                    "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")
    path = tmp_path / "subnet.env"
    path.write_text(text)
    assert read_previous_ipv6_subnet(path) == V6("fd00:5:0:3::/64")
    assert read_previous_ipv6_subnet(tmp_path / "missing.env") is None


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_docker_opts_dual_stack_adds_ipv6_and_fixed_cidr_v6() -> None:
    opts = docker_options(_env(render_subnet_env(DUAL_ENV)), "subnet.env")
    assert render(opts, False, False) == (
        'DOCKER_OPT_BIP="--bip=10.5.72.1/24"\n'
        'DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=fd00:5:0:72::/64"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_IPV6="--ipv6"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.5.72.1/24 --fixed-cidr-v6=fd00:5:0:72::/64 --ip-masq=true'
        ' --ipv6 --mtu=1450"\n')


def test_docker_opts_ipv4_only_output_is_unchanged() -> None:
    env = _env("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false")
    assert set(docker_options(env, "f")) == {"DOCKER_OPT_BIP", "DOCKER_OPT_MTU",
                                              "DOCKER_OPT_IPMASQ"}


def test_docker_opts_ipv6_only_has_no_bip() -> None:
    env = _env("FLANNEL_IPV6_SUBNET=fd00:5:0:3::1/64\nFLANNEL_MTU=1500")
    assert docker_options(env, "f") == {"DOCKER_OPT_MTU": "--mtu=1500",
                                        "DOCKER_OPT_IPV6": "--ipv6",
                                        "DOCKER_OPT_FIXED_CIDR_V6":
                                            "--fixed-cidr-v6=fd00:5:0:3::/64"}


def test_docker_opts_bad_ipv6_subnet_names_the_key() -> None:
    env = _env("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPV6_SUBNET=10.1.1.1/24\nFLANNEL_MTU=1472")
    with pytest.raises(DockerOptsError) as exc:
        docker_options(env, "/run/flannel/subnet.env")
    assert str(exc.value) == ("FLANNEL_IPV6_SUBNET=10.1.1.1/24 in /run/flannel/subnet.env"
                              " is not an IPv6 address/prefix")


# -- the lease manager over a MemoryRegistry --------------------------------------------------


async def test_ipv6_only_manager_reads_flanneld_0000_keys_as_ipv6_peers() -> None:
    """flanneld's etcd mode keys an IPv6-only lease `0.0.0.0-0&<v6>-<len>`: tweed, leasing
    IPv6 only, takes its IPv6 subnet as taken and as a peer, and ignores the IPv4 part."""
    from agent.lease import NO_IPV4, PeerEvent
    from agent.lease_manager import LeaseManager
    from agent.registry import MemoryRegistry
    from tests.support.aio import background, until

    c = v6only(IPv6SubnetMin="fd00:5:0:1::", IPv6SubnetMax="fd00:5:0:2::")
    reg = MemoryRegistry()
    await reg.put("0.0.0.0-0&fd00:5:0:1::-64", encode_lease(
        LeaseAttrs(NO_PUBLIC_IP, OTHER6, "host-gw")), ttl=600)
    m = LeaseManager(reg, c, LeaseAttrs(NO_PUBLIC_IP, ME6, "host-gw"), families=ONLY6,
                     rng=random.Random(1))
    lease = await m.acquire()
    assert (lease.name, lease.ipv6_subnet, lease.has_ipv4) == (
        "fd00:5:0:2::-64", V6("fd00:5:0:2::/64"), False)
    batches: list[list[PeerEvent]] = []

    async def on_batch(b: list[PeerEvent]) -> None:
        batches.append(b)

    async with background(m.watch(on_batch)):
        await until(lambda: batches)
        [ev] = batches[0]
        assert (ev.lease.subnet, ev.lease.ipv6_subnet) == (NO_IPV4, V6("fd00:5:0:1::/64"))
        # Our own key rewritten by us (a renewal) is not a peer, found by PublicIPv6.
        assert await m._renew(lease) is not None
        await reg.put("fd00:5:0:3::-64", encode_lease(
            LeaseAttrs(NO_PUBLIC_IP, IP6_3, "host-gw")))
        await until(lambda: len(batches) >= 2)
        assert [e.lease.ipv6_subnet for e in batches[1]] == [V6("fd00:5:0:3::/64")]
    assert m.counters.reacquisitions == 0 and not m.lease_lost


IP6_3 = ipaddress.IPv6Address("fd00:100::3")
