"""tweed's control plane: config, leases in etcd, subnet.env, and the daemon that runs it."""

__version__ = "0.1.0"
