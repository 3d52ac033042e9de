"""The kernel side of the data plane: value types and the `Netlink` protocol (`types`), the
pyroute2 adapter (`netlink`), an in-memory fake (`fake`), the pure desired-vs-kernel diff
(`diff`) and `KernelSync`, which applies that diff on every batch and every resync (`sync`).
"""
