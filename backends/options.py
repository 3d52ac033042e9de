"""Reading a backend's options from the network config's Backend object.

The config parser has already lower-cased the keys (flanneld matches them
case-insensitively); these check types and ranges with the validators the config itself
uses (`agent.json_fields`) and name the option in errors as `Backend.<Name>`.
"""

from __future__ import annotations

from typing import Any

from agent.json_fields import get_bool, get_int, get_str
from backends.base import BackendError


def opt_int(backend: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    return get_int(backend, name, default, (lo, hi), error=BackendError, prefix="Backend.")


def opt_bool(backend: dict[str, Any], name: str, default: bool = False) -> bool:
    return get_bool(backend, name, default, error=BackendError, prefix="Backend.")


def opt_str(backend: dict[str, Any], name: str, default: str) -> str:
    return get_str(backend, name, default, error=BackendError, prefix="Backend.")
