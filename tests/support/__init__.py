"""Test support: real etcd servers, a cuttable TCP proxy, and the network-namespace lab."""
