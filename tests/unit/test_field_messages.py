"""The texts of bad-field errors, the network config's and the backends' options', word for
word: operators see them in the log and in /readyz (agent.json_fields is their one source)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.config import ConfigError, parse_config
from agent.json_fields import get_bool, get_int, get_str
from backends.base import BackendError
from backends.options import opt_bool, opt_int, opt_str


def config(**fields: Any) -> None:
    parse_config(json.dumps({"Network": "10.5.0.0/16", **fields}))


@pytest.mark.parametrize(("fields", "message"), [
    ({"EnableIPv6": 1}, "EnableIPv6: must be true or false, got 1"),
    ({"enableipv4": "yes"}, "EnableIPv4: must be true or false, got 'yes'"),
    ({"SubnetLen": "24"}, "SubnetLen: must be an integer, got '24'"),
    ({"SubnetLen": True}, "SubnetLen: must be an integer, got True"),
    ({"SubnetLen": 24.0}, "SubnetLen: must be an integer, got 24.0"),
])
def test_config_field_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(**fields)
    assert str(info.value) == message


def test_config_null_fields_take_defaults() -> None:
    c = parse_config('{"Network":"10.5.0.0/16","EnableIPv4":null,"SubnetLen":null}')
    assert (c.enable_ipv4, c.subnet_len) == (True, 24)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: opt_int({"vni": "x"}, "VNI", 1, 0, (1 << 24) - 1),
     "Backend.VNI: must be an integer in 0..16777215, got 'x'"),
    (lambda: opt_int({"port": 65536}, "Port", 0, 0, 65535),
     "Backend.Port: must be an integer in 0..65535, got 65536"),
    (lambda: opt_int({"port": False}, "Port", 0, 0, 65535),
     "Backend.Port: must be an integer in 0..65535, got False"),
    (lambda: opt_bool({"gbp": 1}, "GBP"), "Backend.GBP: must be true or false, got 1"),
    (lambda: opt_str({"datapath": 3}, "Datapath", "auto"),
     "Backend.Datapath: must be a string, got 3"),
])
def test_backend_option_errors(call: Any, message: str) -> None:
    with pytest.raises(BackendError) as info:
        call()
    assert str(info.value) == message


def test_backend_options_defaults_and_values() -> None:
    assert opt_int({}, "VNI", 1, 0, 9) == 1
    assert opt_int({"vni": None}, "VNI", 1, 0, 9) == 1
    assert opt_int({"vni": 9}, "VNI", 1, 0, 9) == 9
    assert opt_bool({}, "GBP") is False
    assert opt_bool({"checksource": None}, "CheckSource", True) is True
    assert opt_bool({"gbp": True}, "GBP") is True
    assert opt_str({"datapath": "c"}, "Datapath", "auto") == "c"


def test_shared_validators_default_to_value_error_and_no_prefix() -> None:
    assert get_int({"n": 0}, "N", 5, (0, 0)) == 0
    assert get_int({"n": -7}, "N", 5) == -7
    with pytest.raises(ValueError, match=r"^N: must be an integer in 1\.\.2, got 3$"):
        get_int({"n": 3}, "N", 1, (1, 2))
    with pytest.raises(ValueError, match=r"^B: must be true or false, got 'true'$"):
        get_bool({"b": "true"}, "B", False)
    with pytest.raises(ValueError, match=r"^S: must be a string, got \['x'\]$"):
        get_str({"s": ["x"]}, "S", "d")
    assert get_str({"s": None}, "S", "d") == "d"
