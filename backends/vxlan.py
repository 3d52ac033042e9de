"""vxlan backend: the kernel's VXLAN device carries container packets between hosts.

On the wire: each packet is wrapped in Ethernet + VXLAN (VNI, default 1) + UDP (port 8472,
the kernel's default) + IP to the peer's PublicIP: 50 bytes of overhead. Wire- and
kernel-compatible with flanneld, so tweed and flanneld hosts mix.

In the kernel: one device `flannel.<VNI>` (`local <iface IP> dev <iface> dstport <Port>
nolearning`) holding our subnet's first address as a /32, MTU iface-50. Per peer lease of
BackendType vxlan (others are ignored):
- `neigh replace <peer subnet IP> lladdr <VtepMAC> nud permanent dev flannel.<VNI>`
- `fdb replace <VtepMAC> dst <PublicIP> self permanent dev flannel.<VNI>`
- `route replace <peer subnet> via <peer subnet IP> dev flannel.<VNI> onlink`
With DirectRouting, a peer on our L2 segment gets `route <subnet> via <PublicIP>` on the
external interface instead. Our lease carries `{"VNI":<n>,"VtepMAC":"<mac>"}`.

Unlike flanneld, the device's MAC (the VtepMAC) is kept in a state file next to the subnet
file, so it survives restarts and peers never hold stale neighbour/FDB entries for us.

A deleted flannel.<VNI> is made again (KernelSync calls `_remake`: the same VNI, VtepMAC,
address and MTU, up) and every route, neighbour and FDB entry on it is programmed again.
The external interface going down and up leaves the entries on flannel.<VNI> in place (the
kernel flushes only routes through the interface itself: DirectRouting's, put back like
host-gw's once it is up).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.atomic_file import atomic_write
from agent.config import NetworkConfig
from agent.lease import Lease
from agent.lease_codec import LeaseAttrs
from backends.base import BackendContext, BackendError
from backends.external_iface import ExternalInterface
from backends.kernel.desired import DesiredTables, PeerEntries
from backends.kernel.diff import sorted_keys
from backends.kernel.types import Fdb, Neigh, Netlink, Route, VxlanSpec
from backends.options import opt_bool, opt_int
from backends.routed import RoutedNetwork

log = logging.getLogger(__name__)

TYPE = "vxlan"
#: Outer Ethernet 14 + IP 20 + UDP 8 + VXLAN 8.
OVERHEAD = 50
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class VxlanOptions:
    """The vxlan Backend options of the network config."""

    vni: int = 1
    port: int = 0  # 0: the kernel's default, 8472
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False
    mtu: int = 0  # 0: the external interface's MTU


def parse_options(backend: dict[str, Any]) -> VxlanOptions:
    """Read the vxlan options (keys already lower-cased by the config parser)."""
    return VxlanOptions(
        vni=opt_int(backend, "VNI", 1, 0, (1 << 24) - 1),
        port=opt_int(backend, "Port", 0, 0, 65535),
        gbp=opt_bool(backend, "GBP"),
        learning=opt_bool(backend, "Learning"),
        direct_routing=opt_bool(backend, "DirectRouting"),
        mtu=opt_int(backend, "MTU", 0, 0, 65535),
    )


def random_mac(rng: random.Random) -> str:
    """A random unicast, locally administered MAC (as flanneld makes for its VTEP)."""
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def peer_mac(attrs: LeaseAttrs) -> str | None:
    """The peer's VtepMAC from its BackendData, normalised; None if absent or malformed."""
    data = attrs.backend_data
    if not isinstance(data, dict):
        return None
    mac = data.get("VtepMAC")
    if mac is None:
        mac = next((v for k, v in data.items() if k.lower() == "vtepmac"), None)
    if not isinstance(mac, str):
        return None
    low = mac.lower()
    if not _MAC_RE.fullmatch(low):
        return None
    # The lease's own string when it is lower case already: kept per peer, a copy is not.
    return mac if low == mac else low


class MacStore:
    """The VtepMAC kept between runs, in a small JSON file (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> str | None:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        mac = doc.get("VtepMAC") if isinstance(doc, dict) else None
        if isinstance(mac, str) and _MAC_RE.fullmatch(mac):
            return mac
        log.warning("ignoring %s: no valid VtepMAC in it", self.path)
        return None

    def save(self, mac: str) -> None:
        atomic_write(self.path, json.dumps({"VtepMAC": mac}) + "\n", 0o600)


def peer_entries(
    subnet: ipaddress.IPv4Network,
    attrs: LeaseAttrs,
    dev: int,
    ext: ExternalInterface,
    direct_routing: bool,
) -> PeerEntries | None:
    """The route, neighbour and FDB entry of one vxlan peer (pure); None without a valid
    VtepMAC. With DirectRouting a peer on our segment gets only a route via its PublicIP."""
    mac = peer_mac(attrs)
    if mac is None:
        return None
    if direct_routing and ext.on_segment(attrs.public_ip):
        return PeerEntries(Route(subnet, attrs.public_ip, ext.index))
    gw = subnet.network_address
    return PeerEntries(Route(subnet, gw, dev, onlink=True), Neigh(gw, mac, dev),
                       Fdb(mac, attrs.public_ip, dev))


def desired_state(
    peers: dict[ipaddress.IPv4Network, LeaseAttrs],
    dev: int,
    ext: ExternalInterface,
    direct_routing: bool,
) -> tuple[dict[Any, Route], dict[Any, Neigh], dict[Any, Fdb]]:
    """Routes, neighbours and FDB entries for the vxlan peers (pure): the tables a rebuild
    holds."""
    tables = DesiredTables()
    tables.load(e for s in sorted_keys(peers)
                if (e := peer_entries(s, peers[s], dev, ext, direct_routing)) is not None)
    return tables.routes, tables.neigh, tables.fdb


class VxlanNetwork(RoutedNetwork):
    """The flannel.<VNI> device and the per-peer kernel entries behind it."""

    backend_type = TYPE

    def __init__(
        self,
        netlink: Netlink,
        ext: ExternalInterface,
        config: NetworkConfig,
        opts: VxlanOptions,
        mac: str,
        resync: float,
    ) -> None:
        super().__init__(netlink, ext, config, resync)
        self.opts = opts
        self.mac = mac
        self.dev_name = f"flannel.{opts.vni}"
        self.lease_attrs = LeaseAttrs(
            ext.public_ip, None, TYPE, {"VNI": opts.vni, "VtepMAC": mac}
        )
        self.mtu = (opts.mtu or ext.mtu) - OVERHEAD
        self.dev_index = 0
        self.kernel.keep_device(self.dev_name, self._remake)

    def spec(self) -> VxlanSpec:
        return VxlanSpec(self.dev_name, self.opts.vni, self.ext.iface_addr, self.ext.index,
                         self.opts.port, self.opts.learning, self.opts.gbp)

    async def _prepare(self, lease: Lease) -> None:
        address = ipaddress.IPv4Interface(f"{lease.subnet.network_address}/32")
        try:
            dev = await self.netlink.ensure_vxlan(self.spec(), self.mac, self.mtu, address)
        except Exception as exc:  # noqa: BLE001 - netlink errors come in many types
            raise BackendError(f"cannot set up vxlan device {self.dev_name}: {exc}") from exc
        self.dev_index = dev.index
        log.info("vxlan device %s (index %d, VNI %d, VtepMAC %s, MTU %d, address %s)",
                 self.dev_name, dev.index, self.opts.vni, self.mac, self.mtu, address)

    async def _remake(self) -> None:
        """The device was deleted: make it again as for our lease (KernelSync calls this
        under its lock); every entry is on the new device, so the tables are rebuilt."""
        if self.lease is None:
            return  # not set up yet: setup() makes it
        await self._prepare(self.lease)
        self.tables.stale = True

    def _usable(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> bool:
        if peer_mac(attrs) is None:
            log.warning("ignoring the vxlan lease of %s (%s): BackendData has no valid"
                        " VtepMAC", subnet, attrs.public_ip)
            return False
        return True

    def _entries(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> PeerEntries | None:
        return peer_entries(subnet, attrs, self.dev_index, self.ext, self.opts.direct_routing)

    def _route_oifs(self) -> tuple[int, ...]:
        return (self.dev_index, self.ext.index)

    def _neigh_index(self) -> int:
        return self.dev_index

    def _links(self) -> dict[int, str]:
        return {self.dev_index: self.dev_name, self.ext.index: self.ext.name}

    def _ready_to_plan(self) -> bool:
        return bool(self.dev_index)

    def _owned_route(self, r: Route) -> bool:
        if r.oif == self.dev_index and r.dst == self.own and r.gateway is not None:
            return True  # a peer's old route to what is now our own subnet
        return self._owns(r, self.dev_index if r.oif == self.dev_index else self.ext.index)

    def ready(self) -> bool:
        return bool(self.dev_index) and self.kernel.ready()


class VxlanBackend:
    """Builds VxlanNetworks; owns the choice of a stable VtepMAC."""

    name = TYPE

    def __init__(self, ctx: BackendContext, *, rng: random.Random | None = None) -> None:
        self.ctx = ctx
        self.rng = rng or random.SystemRandom()

    @staticmethod
    def check_options(backend: dict[str, Any]) -> None:
        parse_options(backend)

    async def register_network(self, config: NetworkConfig) -> VxlanNetwork:
        ctx = self.ctx
        opts = parse_options(config.backend)
        if (opts.mtu or ctx.ext.mtu) - OVERHEAD < 68:
            raise BackendError(
                f"Backend.MTU: {opts.mtu or ctx.ext.mtu} leaves less than 68 bytes after"
                f" the {OVERHEAD}-byte vxlan header"
            )
        store = MacStore(ctx.state_dir / f"{ctx.state_prefix}.flannel.{opts.vni}.json")
        mac = store.load()
        source = "state file"
        if mac is None:
            dev = await ctx.netlink.find_vxlan(f"flannel.{opts.vni}")
            if dev is not None and dev.spec.vni == opts.vni and _MAC_RE.fullmatch(dev.mac or ""):
                mac, source = dev.mac, "existing device"
            else:
                mac, source = random_mac(self.rng), "new"
            try:
                store.save(mac)
            except OSError as exc:
                raise BackendError(
                    f"cannot write the vxlan state file {store.path}:"
                    f" {exc.strerror or exc}; it is kept next to --subnet-file, so make"
                    f" {store.path.parent} writable or choose another --subnet-file"
                ) from None
        log.info("VtepMAC %s (%s; kept in %s)", mac, source, store.path)
        return VxlanNetwork(ctx.netlink, ctx.ext, config, opts, mac, ctx.resync)
