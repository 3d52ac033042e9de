"""Unit tests for the backend registry (backends/__init__.py): which types exist, the
errors for the others, options checked without building, and every backend built the same
way from a BackendContext."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import NetworkConfig, parse_config
from backends import AVAILABLE, REGISTRY, backend_class, backend_problem, build_backend
from backends.base import BackendContext, BackendError
from backends.external_iface import ExternalInterface
from backends.hostgw import HostGwBackend, HostGwNetwork
from backends.kernel.fake import FakeNetlink
from backends.udp.network import UdpBackend, UdpNetwork
from backends.vxlan import VxlanBackend, VxlanNetwork

IP = ipaddress.IPv4Address
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"))
UNKNOWN = "Backend.Type {!r} is not available in tweed (available: host-gw, udp, vxlan)"


def config(btype: str, **options: Any) -> NetworkConfig:
    return parse_config(json.dumps(
        {"Network": "10.5.0.0/16", "Backend": {"Type": btype, **options}}))


def test_the_types_in_this_build() -> None:
    assert AVAILABLE == ("host-gw", "udp", "vxlan")
    assert {t: backend_class(t) for t in REGISTRY} == {
        "host-gw": HostGwBackend, "udp": UdpBackend, "vxlan": VxlanBackend}
    assert all(backend_class(t).name == t for t in REGISTRY)


@pytest.mark.parametrize("btype", ["wireguard", "ipip", "alloc", "HOST-GW-X"])
def test_unknown_type_is_named_with_the_available_ones(btype: str) -> None:
    cfg = config(btype)
    text = UNKNOWN.format(cfg.backend_type)
    assert backend_problem(cfg) == text
    with pytest.raises(BackendError) as info:
        build_backend(cfg, BackendContext(FakeNetlink(), EXT, 10.0, Path("/nonexistent"), "x"))
    assert str(info.value) == text


def test_absent_backend_is_udp_and_fine() -> None:
    cfg = parse_config('{"Network":"10.5.0.0/16"}')
    assert cfg.backend_type == "udp"
    assert backend_problem(cfg) is None


@pytest.mark.parametrize(("cfg", "problem"), [
    (config("host-gw"), None),
    (config("host-gw", VNI="anything"), None),  # host-gw has no options to check
    (config("vxlan"), None),
    (config("vxlan", VNI=4096, Port=4789, GBP=True, DirectRouting=True), None),
    (config("vxlan", VNI="x"), "Backend.VNI: must be an integer in 0..16777215, got 'x'"),
    (config("vxlan", Port=70000), "Backend.Port: must be an integer in 0..65535, got 70000"),
    (config("vxlan", directrouting=1), "Backend.DirectRouting: must be true or false, got 1"),
    (config("udp"), None),
    (config("udp", Port=0), "Backend.Port: must be an integer in 1..65535, got 0"),
    (config("udp", Datapath=7), "Backend.Datapath: must be a string, got 7"),
    (config("udp", TSO="yes"), "Backend.TSO: must be true or false, got 'yes'"),
    # Found only when the network is built (it needs the interface), not here.
    (config("vxlan", MTU=100), None),
    (config("udp", Datapath="fast"), None),
])
def test_backend_problem_checks_options_without_building(
    cfg: NetworkConfig, problem: str | None
) -> None:
    assert backend_problem(cfg) == problem


@pytest.mark.parametrize(("btype", "backend_cls", "network_cls"), [
    ("host-gw", HostGwBackend, HostGwNetwork),
    ("vxlan", VxlanBackend, VxlanNetwork),
    ("udp", UdpBackend, UdpNetwork),
])
async def test_every_backend_is_built_from_the_context(
    tmp_path: Path, btype: str, backend_cls: type, network_cls: type
) -> None:
    fake = FakeNetlink()
    ctx = BackendContext(fake, EXT, 7.5, tmp_path, "subnet.env")
    backend = build_backend(config(btype), ctx)
    assert type(backend) is backend_cls
    network = await backend.register_network(config(btype))
    assert type(network) is network_cls
    assert network.kernel.resync == 7.5
    assert network.kernel.netlink is fake
    assert network.lease_attrs.public_ip == EXT.public_ip
    await network.close()


async def test_vxlan_keeps_its_mac_in_the_state_folder_named_after_the_prefix(
    tmp_path: Path,
) -> None:
    ctx = BackendContext(FakeNetlink(), EXT, 10.0, tmp_path, "tweed.env")
    network = await build_backend(config("vxlan", VNI=7), ctx).register_network(
        config("vxlan", VNI=7))
    state = tmp_path / "tweed.env.flannel.7.json"
    assert json.loads(state.read_text()) == {"VtepMAC": network.lease_attrs.backend_data["VtepMAC"]}  # noqa: ASYNC240


@pytest.mark.parametrize("check", [
    "backend_problem(parse_config('{\"Network\":\"10.5.0.0/16\",\"Backend\":{\"Type\":\"host-gw\"}}'))",
    "backend_class('host-gw')",
])
def test_a_host_gw_agent_never_loads_the_udp_backend(check: str) -> None:
    code = (
        "import sys\n"
        "from agent.config import parse_config\n"
        "from backends import backend_class, backend_problem\n"
        f"{check}\n"
        "print(sorted(m for m in sys.modules if m.startswith('backends.udp') or m == 'pytun'"
        " or m.endswith('_fastpath')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"


def test_importing_the_registry_loads_no_backend() -> None:
    code = ("import sys, backends\n"
            "print(sorted(m for m in sys.modules if m.startswith(('backends.', 'agent.'))))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"
