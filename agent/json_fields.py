"""Decoded JSON objects and their typed fields: `load_object` for a whole document (the
network config, a lease value), and one validator per field type, shared by the network
config (`agent.config`) and the backends' options (`backends.options`).

Pure, no I/O, no imports from tweed. The keys have been lower-cased by the caller (flanneld
matches field names case-insensitively), so a field is looked up by `name.lower()` and named
in errors as written. A missing field or JSON null gives the default. Each caller passes its
own error class and prefix, so the config says `EnableIPv6: must be true or false, got 1`
and a backend `Backend.VNI: must be an integer in 0..16777215, got 'x'`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

#: Builds the exception raised for a bad field from its message.
ErrorType = Callable[[str], Exception]


def load_object(text: str | bytes, error: ErrorType, not_json: str, not_object: str) -> dict:
    """`text` decoded as a JSON object. Anything else raises `error`: `not_json` followed by
    the reason in parentheses (nesting deep enough to exhaust the recursion limit included),
    or `not_object` for JSON that is not an object."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{not_json} ({exc})") from None
    except RecursionError:
        raise error(f"{not_json} (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise error(not_object)
    return raw


def _field(
    obj: Mapping[str, Any], name: str, default: Any, valid: Callable[[Any], bool], rule: str,
    error: ErrorType, prefix: str,
) -> Any:
    value = obj.get(name.lower(), default)
    if value is None:
        return default
    if not valid(value):
        raise error(f"{prefix}{name}: must be {rule}, got {value!r}")
    return value


def get_bool(
    obj: Mapping[str, Any], name: str, default: bool, *, error: ErrorType = ValueError,
    prefix: str = "",
) -> bool:
    """A JSON boolean (not 0 or 1, not a string)."""
    value: bool = _field(obj, name, default, lambda v: isinstance(v, bool), "true or false",
                         error, prefix)
    return value


def get_int(
    obj: Mapping[str, Any], name: str, default: int, bounds: tuple[int, int] | None = None,
    *, error: ErrorType = ValueError, prefix: str = "",
) -> int:
    """A JSON integer (not a boolean), within `bounds` (inclusive) when given."""
    def valid(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return bounds is None or bounds[0] <= v <= bounds[1]

    rule = "an integer" if bounds is None else f"an integer in {bounds[0]}..{bounds[1]}"
    value: int = _field(obj, name, default, valid, rule, error, prefix)
    return value


def get_str(
    obj: Mapping[str, Any], name: str, default: str, *, error: ErrorType = ValueError,
    prefix: str = "",
) -> str:
    """A JSON string."""
    value: str = _field(obj, name, default, lambda v: isinstance(v, str), "a string",
                        error, prefix)
    return value
