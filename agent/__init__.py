"""tweed's control plane: config, leases in etcd, subnet.env, and the daemon that runs it."""

import os

__version__ = "0.1.0"

# grpc's C core writes its own lines to stderr, past Python's logging, on every failed TLS
# handshake ("Corruption detected", "Handshake failed ...") and so once per retry; tweed
# reports each etcd failure itself, once, naming the flag that fixes it. The variable is
# read when grpc is first imported, which is after this; a value set by the user wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
