"""Data plane backends, looked up by the network config's Backend.Type.

Only `agent.daemon` builds them; this table says which types exist in this build.
"""

from __future__ import annotations

#: Backend.Type -> module holding a Backend class. Types flanneld has that tweed does not
#: build yet (udp, vxlan, ipip, wireguard, ...) are a clear startup error.
AVAILABLE = ("host-gw", "udp", "vxlan")
