"""Unit tests for agent.subnet_file: subnet.env text, atomic writes and reading it back."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest

from agent import atomic_file
from agent.subnet_file import (
    SubnetEnv,
    parse_subnet_env,
    previous_subnet,
    read_previous_subnet,
    render_subnet_env,
    write_subnet_file,
)

V4 = SubnetEnv(
    network=ipaddress.IPv4Network("10.5.0.0/16"),
    subnet=ipaddress.IPv4Network("10.5.72.0/24"),
    mtu=1450,
    ipmasq=False,
)
V4_TEXT = (
    "FLANNEL_NETWORK=10.5.0.0/16\n"
    "FLANNEL_SUBNET=10.5.72.1/24\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\n"
)


def test_render_v4_exact() -> None:
    assert render_subnet_env(V4) == V4_TEXT


def test_render_ipmasq_true_and_other_mtu() -> None:
    env = SubnetEnv(
        ipaddress.IPv4Network("10.5.0.0/16"), ipaddress.IPv4Network("10.5.3.128/25"), 1500, True
    )
    assert render_subnet_env(env) == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.3.129/25\n"
        "FLANNEL_MTU=1500\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_render_dual_stack_exact() -> None:
    env = SubnetEnv(
        network=ipaddress.IPv4Network("10.5.0.0/16"),
        subnet=ipaddress.IPv4Network("10.5.72.0/24"),
        mtu=1450,
        ipmasq=True,
        ipv6_network=ipaddress.IPv6Network("fd00:12::/48"),
        ipv6_subnet=ipaddress.IPv6Network("fd00:12:0:5::/64"),
    )
    assert render_subnet_env(env) == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:12::/48\n"
        "FLANNEL_IPV6_SUBNET=fd00:12:0:5::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_render_ipv6_only() -> None:
    env = SubnetEnv(
        None,
        None,
        1280,
        False,
        ipaddress.IPv6Network("fd00::/56"),
        ipaddress.IPv6Network("fd00:0:0:1::/64"),
    )
    assert render_subnet_env(env) == (
        "FLANNEL_IPV6_NETWORK=fd00::/56\n"
        "FLANNEL_IPV6_SUBNET=fd00:0:0:1::1/64\n"
        "FLANNEL_MTU=1280\n"
        "FLANNEL_IPMASQ=false\n"
    )


# -- write ---------------------------------------------------------------------------------


def test_write_creates_parent_dirs_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    write_subnet_file(path, V4)
    assert path.read_text() == V4_TEXT
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_mode_0644_despite_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_subnet_file(tmp_path / "subnet.env", V4)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "subnet.env").stat().st_mode) == 0o644


def test_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    write_subnet_file(path, V4)
    write_subnet_file(path, V4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subnet.env"]


def test_write_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_SUBNET=10.9.9.1/24\nold junk\n")
    write_subnet_file(path, V4)
    assert path.read_text() == V4_TEXT


def test_write_replaces_by_rename(tmp_path: Path) -> None:
    """A reader holding the old file keeps the old text: the new file is a new inode."""
    path = tmp_path / "subnet.env"
    path.write_text("old\n")
    with path.open() as reader:
        write_subnet_file(path, V4)
        assert reader.read() == "old\n"
    assert path.read_text() == V4_TEXT


def test_write_failure_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "subnet.env"
    path.write_text(V4_TEXT)

    def boom(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic_file.os, "replace", boom)
    env = SubnetEnv(V4.network, ipaddress.IPv4Network("10.5.9.0/24"), 1450, False)
    with pytest.raises(OSError, match="disk full"):
        write_subnet_file(path, env)
    assert path.read_text() == V4_TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subnet.env"]


def test_written_file_reads_back_as_previous_subnet(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    write_subnet_file(path, V4)
    assert read_previous_subnet(path) == ipaddress.IPv4Network("10.5.72.0/24")


# -- parse / previous_subnet -------------------------------------------------------------


def test_parse_subnet_env() -> None:
    text = '# comment\n\nFLANNEL_NETWORK=10.5.0.0/16\n FLANNEL_MTU = 1450 \nX="q"\nnoequals\n'
    assert parse_subnet_env(text) == {
        "FLANNEL_NETWORK": "10.5.0.0/16",
        "FLANNEL_MTU": "1450",
        "X": "q",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (V4_TEXT, "10.5.72.0/24"),
        ("FLANNEL_SUBNET=10.5.3.129/25\n", "10.5.3.128/25"),
        ('FLANNEL_SUBNET="10.5.72.1/24"\n', "10.5.72.0/24"),
        ("# x\nFLANNEL_SUBNET=10.5.72.1/24", "10.5.72.0/24"),
    ],
)
def test_previous_subnet_good(text: str, expected: str) -> None:
    assert previous_subnet(text) == ipaddress.IPv4Network(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "FLANNEL_NETWORK=10.5.0.0/16\n",
        "FLANNEL_SUBNET=\n",
        "FLANNEL_SUBNET=bogus\n",
        "FLANNEL_SUBNET=10.5.72.1/33\n",
        "FLANNEL_SUBNET=fd00::1/64\n",
        "FLANNEL_SUBNET=300.5.72.1/24\n",
    ],
)
def test_previous_subnet_bad(text: str) -> None:
    assert previous_subnet(text) is None


def test_read_previous_subnet_missing_file(tmp_path: Path) -> None:
    assert read_previous_subnet(tmp_path / "nope.env") is None


def test_read_previous_subnet_directory(tmp_path: Path) -> None:
    assert read_previous_subnet(tmp_path) is None
