"""Property-based tests (hypothesis) of every parser that reads outside input: the network
config, subnet keys, lease values, subnet.env, the flags and FLANNELD_* values, and the
backends' options. Whatever the input, each gives a value or its own clean error, never
another exception; and what tweed writes, it reads back unchanged."""

from __future__ import annotations

import ipaddress
import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, parse_config
from agent.lease_codec import (
    LeaseAttrs,
    LeaseDecodeError,
    SubnetKey,
    decode_lease,
    encode_lease,
    format_subnet_key,
    parse_subnet_key,
)
from agent.options import UsageError, parse_args
from agent.subnet_file import (
    SubnetEnv,
    parse_subnet_env,
    previous_subnet,
    read_previous_subnet,
    render_subnet_env,
)
from backends.base import BackendError
from backends.udp.network import parse_options as udp_options
from backends.vxlan import parse_options as vxlan_options

DEEP = "[" * 100_000  # deeper than json's recursion limit

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20,
)
CONFIG_FIELDS = ["Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "Type",
                 "EnableIPv4", "EnableIPv6", "IPv6Network", "IPv6SubnetLen", "VNI", "Port"]


def any_case(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


cidrs = st.builds(lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}",
                  st.integers(0, 2**32 - 1), st.integers(0, 33))
field_values = json_values | cidrs | st.sampled_from(["udp", "vxlan", "host-gw"])
configs = st.dictionaries(st.sampled_from(CONFIG_FIELDS).flatmap(any_case), field_values,
                          max_size=6).map(
    lambda d: {**d, "Backend": d.get("Backend")} if "Backend" in d else d)


@given(st.text() | st.binary())
@example(DEEP)
@example(b"\xff\xfe")
def test_config_from_any_text(text):
    try:
        parse_config(text)
    except ConfigError:
        pass


@given(configs)
def test_config_from_any_structure(doc):
    try:
        cfg = parse_config(json.dumps(doc))
    except ConfigError as exc:
        assert str(exc)  # a message an operator can read
        return
    # A config that parses is internally consistent.
    assert cfg.network is not None or cfg.ipv6_network is not None
    if cfg.network is not None:
        assert cfg.subnet_len >= cfg.network.prefixlen


@given(st.text())
@example("10.5.0.0-16&fc00::-64")
@example("10.5.0.1-24")
def test_subnet_key_from_any_text(name):
    try:
        key = parse_subnet_key(name)
    except LeaseDecodeError:
        return
    assert format_subnet_key(key) == name  # only canonical names parse


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_subnet_key_round_trip(addr, length):
    net = ipaddress.IPv4Network((addr, length), strict=False)
    key = SubnetKey(net)
    assert parse_subnet_key(format_subnet_key(key)) == key


lease_docs = st.dictionaries(
    st.sampled_from(["PublicIP", "PublicIPv6", "BackendType", "BackendData"]).flatmap(any_case),
    json_values | st.ip_addresses().map(str), max_size=4)


@given(st.binary() | st.text() | lease_docs.map(json.dumps))
@example(DEEP)
@example(b'{"PublicIP": 17}')
def test_lease_value_from_any_input(value):
    try:
        attrs = decode_lease(value)
    except LeaseDecodeError as exc:
        assert str(exc)
        return
    assert isinstance(attrs.public_ip, ipaddress.IPv4Address)


@given(st.ip_addresses(v=4), st.none() | st.ip_addresses(v=6),
       st.sampled_from(["", "udp", "vxlan", "host-gw"]),
       st.none() | st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8),
                                   max_size=3))
def test_lease_round_trip(ip, ip6, btype, data):
    attrs = LeaseAttrs(ip, ip6, btype, data if btype else None)
    assert decode_lease(encode_lease(attrs)) == attrs


@given(st.text())
def test_subnet_env_from_any_text(text):
    values = parse_subnet_env(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
    got = previous_subnet(text)
    assert got is None or isinstance(got, ipaddress.IPv4Network)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(st.binary())
@example(b"FLANNEL_SUBNET=10.5.3.1/24\n\xff")
def test_previous_subnet_from_any_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "subnet.env"
        path.write_bytes(data)
        got = read_previous_subnet(path)
    assert got is None or isinstance(got, ipaddress.IPv4Network)


@given(st.integers(0, 2**24 - 1), st.integers(8, 30), st.integers(68, 9000), st.booleans())
def test_subnet_env_round_trip(base, length, mtu, masq):
    net = ipaddress.IPv4Network((base << 8, 8), strict=False)
    subnet = ipaddress.IPv4Network((int(net.network_address), length), strict=False)
    env = SubnetEnv(network=net, subnet=subnet, mtu=mtu, ipmasq=masq)
    assert previous_subnet(render_subnet_env(env)) == subnet


FLAGS = ["etcd-endpoints", "etcd-prefix", "iface", "iface-regex", "public-ip", "subnet-file",
         "subnet-lease-renew-margin", "ip-masq", "healthz-ip", "healthz-port",
         "iptables-resync", "subnet-lease-ttl", "resync-period", "iface-can-reach"]
flag_text = st.text(alphabet=string.printable, max_size=20)


@given(st.dictionaries(st.sampled_from(FLAGS), flag_text, max_size=4),
       st.lists(st.tuples(st.sampled_from(FLAGS), flag_text), max_size=3))
def test_flags_and_env_from_any_values(env, args):
    environ = {f"FLANNELD_{k.upper().replace('-', '_')}": v for k, v in env.items()}
    argv = [f"--{k}={v}" for k, v in args]
    try:
        parse_args(argv, environ)
    except UsageError as exc:
        assert "\n" not in str(exc).strip()  # one line
        assert any(name in str(exc) for name in FLAGS) or str(exc)


backend_docs = st.dictionaries(
    st.sampled_from(["port", "datapath", "checksource", "mtu", "coalesce", "tso", "udpgso",
                     "udpgro", "vni", "gbp", "learning", "directrouting"]),
    json_values, max_size=5)


@given(backend_docs)
def test_backend_options_from_any_values(doc):
    for parse in (udp_options, vxlan_options):
        try:
            parse(doc)
        except BackendError as exc:
            assert str(exc).startswith("Backend.")


def test_a_stray_byte_does_not_hide_the_previous_subnet(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_bytes(b"FLANNEL_SUBNET=10.5.3.1/24\n\xff\n")
    assert read_previous_subnet(path) == ipaddress.IPv4Network("10.5.3.0/24")


def test_json_nested_too_deeply_is_a_clean_error():
    for parse, error in ((parse_config, ConfigError), (decode_lease, LeaseDecodeError)):
        try:
            parse(DEEP)
        except error as exc:
            assert "nested too deeply" in str(exc)
        else:
            raise AssertionError(f"{parse.__name__} accepted {DEEP[:10]}...")
