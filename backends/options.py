"""Reading a backend's options from the network config's Backend object.

The config parser has already lower-cased the keys (flanneld matches them
case-insensitively); these helpers check types and ranges and name the option in errors.
"""

from __future__ import annotations

from typing import Any

from backends.base import BackendError


def opt_int(backend: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = backend.get(name.lower(), default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BackendError(f"Backend.{name}: must be an integer in {lo}..{hi}, got {value!r}")
    return value


def opt_bool(backend: dict[str, Any], name: str, default: bool = False) -> bool:
    value = backend.get(name.lower(), default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BackendError(f"Backend.{name}: must be true or false, got {value!r}")
    return value


def opt_str(backend: dict[str, Any], name: str, default: str) -> str:
    value = backend.get(name.lower(), default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BackendError(f"Backend.{name}: must be a string, got {value!r}")
    return value
