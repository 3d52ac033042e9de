"""Unit tests for backends.udp.parse_options, read from a parsed network config."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.config import parse_config
from backends.base import BackendError
from backends.udp.network import UdpOptions, parse_options


def backend(**options: Any) -> dict[str, Any]:
    """The Backend object as the config parser hands it over (keys lower-cased)."""
    text = json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "udp", **options}})
    return parse_config(text).backend


def test_defaults():
    opts = parse_options(backend())
    assert opts.port == 8285
    assert opts.datapath == "auto"
    assert opts.check_source is True
    assert opts.mtu == 0


def test_absent_backend_defaults_to_udp_options():
    cfg = parse_config('{"Network": "10.5.0.0/16"}')
    assert cfg.backend_type == "udp"
    assert parse_options(cfg.backend) == UdpOptions()


def test_values_read_case_insensitively():
    opts = parse_options(backend(port=9000, DATAPATH="python", checksource=False, Mtu=1400))
    assert opts.port == 9000
    assert opts.datapath == "python"
    assert opts.check_source is False
    assert opts.mtu == 1400


def test_null_means_default():
    opts = parse_options(backend(Port=None, CheckSource=None, Datapath=None))
    assert (opts.port, opts.check_source, opts.datapath) == (8285, True, "auto")


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_accepted(port):
    assert parse_options(backend(Port=port)).port == port


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"Port": 0}, "Backend.Port"),
        ({"Port": 70000}, "Backend.Port"),
        ({"Port": -1}, "Backend.Port"),
        ({"Port": "x"}, "Backend.Port"),
        ({"Port": "8285"}, "Backend.Port"),
        ({"Port": True}, "Backend.Port"),
        ({"Port": 8285.5}, "Backend.Port"),
        ({"CheckSource": "no"}, "Backend.CheckSource"),
        ({"CheckSource": 0}, "Backend.CheckSource"),
        ({"Datapath": 5}, "Backend.Datapath"),
        ({"MTU": -1}, "Backend.MTU"),
        ({"MTU": 70000}, "Backend.MTU"),
    ],
)
def test_errors_name_the_option(options, name):
    with pytest.raises(BackendError) as info:
        parse_options(backend(**options))
    assert name in str(info.value)
