"""Lease codec: subnet keys under `<prefix>/subnets/` and the lease JSON stored in them.

Pure logic, no I/O. The byte format is flanneld's: keys `10.5.30.0-24` (dual stack
`10.5.30.0-24&fd00:12:13::-56`), values with the fields in the order flanneld's Go
struct marshals them, `PublicIPv6` always present, `BackendType`/`BackendData`/
`BackendV6Data` omitted when empty. IPv6-only leases (beyond flanneld, whose keys need
an IPv4 part) are keyed `fd00:12:13::-56`: no dot, so flanneld's key regexp never
matches them (docs/interop.md#ipv6-only-leases).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from agent.json_fields import load_object

_KEY_RE = re.compile(
    r"^(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})-(\d{1,2})(?:&([0-9a-fA-F:]+)-(\d{1,3}))?$"
)
#: An IPv6-only key (tweed's own form): the IPv6 subnet alone, hex digits and colons only.
_KEY6_RE = re.compile(r"^([0-9a-fA-F:]+)-(\d{1,3})$")

#: What an IPv6-only lease says for PublicIP: flanneld's Go struct marshals an unset
#: ip.IP4 as "0.0.0.0", and LeaseAttrs.public_ip stays an IPv4Address for the backends.
NO_PUBLIC_IP = ipaddress.IPv4Address(0)


class LeaseDecodeError(ValueError):
    """A subnet key or lease value that does not parse; the message says why."""


@dataclass(frozen=True, order=True, slots=True)
class SubnetKey:
    """The subnet(s) a lease key names."""

    ipv4: ipaddress.IPv4Network | None
    ipv6: ipaddress.IPv6Network | None = None

    def __str__(self) -> str:
        return format_subnet_key(self)


def parse_subnet_key(name: str) -> SubnetKey:
    """Parse the last path element of a subnet key; raise LeaseDecodeError if malformed."""
    m = _KEY_RE.fullmatch(name)
    if not m:
        m6 = _KEY6_RE.fullmatch(name)
        if m6 is None:
            raise LeaseDecodeError(
                f"subnet key {name!r} is not <a.b.c.d>-<len>[&<v6>-<len>] nor <v6>-<len>")
        try:
            return SubnetKey(None, ipaddress.IPv6Network(f"{m6.group(1)}/{m6.group(2)}",
                                                         strict=True))
        except ValueError as exc:
            raise LeaseDecodeError(f"subnet key {name!r}: IPv6 part: {exc}") from None
    try:
        v4 = ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}", strict=True)
        v6 = None
        if m.group(3) is not None:
            v6 = ipaddress.IPv6Network(f"{m.group(3)}/{m.group(4)}", strict=True)
    except ValueError as exc:
        raise LeaseDecodeError(f"subnet key {name!r}: {exc}") from None
    return SubnetKey(v4, v6)


def _v6(net: ipaddress.IPv6Network) -> str:
    # Python writes an IPv4-mapped address with a dot since 3.13; flanneld's regexp would
    # then read a v6-only key as an IPv4 one. Such a network is refused by the config.
    text = f"{net.network_address}-{net.prefixlen}"
    assert "." not in text, f"IPv6 subnet {net} would be written with a dot"
    return text


def format_subnet_key(key: SubnetKey) -> str:
    """The key name flanneld uses for these subnets (no prefix); an IPv6-only key is the
    IPv6 subnet alone (tweed's form)."""
    if key.ipv4 is None:
        assert key.ipv6 is not None, "a subnet key names at least one subnet"
        return _v6(key.ipv6)
    name = f"{key.ipv4.network_address}-{key.ipv4.prefixlen}"
    if key.ipv6 is not None:
        name += f"&{_v6(key.ipv6)}"
    return name


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a lease says about its host: where to send traffic and how.

    One is kept per peer (by the lease manager and the backend, the same object), so it
    has slots: 20,000 peers would carry 20,000 instance dicts otherwise.
    """

    public_ip: ipaddress.IPv4Address  # NO_PUBLIC_IP (0.0.0.0) in an IPv6-only lease
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON; None when the lease has none
    #: flanneld's BackendV6Data (vxlan: the flannel-v6.<VNI> device's VNI and VtepMAC).
    backend_v6_data: Any = None


def encode_lease(attrs: LeaseAttrs) -> bytes:
    """Encode exactly as flanneld does: field order, null PublicIPv6, no spaces; the
    `omitempty` fields (BackendType, BackendData, BackendV6Data) left out when empty."""
    doc: dict[str, Any] = {
        "PublicIP": str(attrs.public_ip),
        "PublicIPv6": str(attrs.public_ipv6) if attrs.public_ipv6 is not None else None,
    }
    if attrs.backend_type:
        doc["BackendType"] = attrs.backend_type
    if attrs.backend_data is not None:
        doc["BackendData"] = attrs.backend_data
    if attrs.backend_v6_data is not None:
        doc["BackendV6Data"] = attrs.backend_v6_data
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_lease(value: bytes | str) -> LeaseAttrs:
    """Decode a lease value; field names match case-insensitively, like Go's json."""
    raw = load_object(value, LeaseDecodeError, "lease value is not JSON",
                      "lease value is not a JSON object")
    doc = {k.lower(): v for k, v in raw.items()}
    try:
        text = doc.get("publicip")
        if not isinstance(text, str):
            raise TypeError  # ipaddress would take an integer; flanneld wants a string
        public_ip = ipaddress.IPv4Address(text)
    except (ValueError, TypeError):
        raise LeaseDecodeError(f"lease PublicIP {doc.get('publicip')!r} is not IPv4") from None
    v6 = doc.get("publicipv6")
    public_ipv6 = None
    if v6 not in (None, ""):
        try:
            if not isinstance(v6, str):
                raise TypeError
            public_ipv6 = ipaddress.IPv6Address(v6)
        except (ValueError, TypeError):
            raise LeaseDecodeError(f"lease PublicIPv6 {v6!r} is not IPv6") from None
    btype = doc.get("backendtype") or ""
    if not isinstance(btype, str):
        raise LeaseDecodeError(f"lease BackendType {btype!r} is not a string")
    return LeaseAttrs(public_ip, public_ipv6, btype, _shared_keys(doc.get("backenddata")),
                      _shared_keys(doc.get("backendv6data")))


#: BackendData field names seen, each kept once; bounded, as leases are written by others.
_FIELD_NAMES: dict[str, str] = {}
_MAX_FIELD_NAMES = 64


def _shared_keys(data: Any) -> Any:
    """BackendData with its field names shared: json gives every decoded object its own
    copies of "VNI" and "VtepMAC" (about 100 bytes per peer, kept for as long as the peer)."""
    if not isinstance(data, dict):
        return data
    names = _FIELD_NAMES
    if len(names) < _MAX_FIELD_NAMES:
        return {names.setdefault(k, k): v for k, v in data.items()}
    return {names.get(k, k): v for k, v in data.items()}
