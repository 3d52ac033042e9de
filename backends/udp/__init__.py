"""The udp backend: a TUN device, a UDP socket and the datapath that moves packets between
them (`network`), the datapath contract (`datapath`), its pure-Python and C implementations
(`python_datapath`, `c_datapath` over `_fastpath.c`) and the choice between them
(`selection`), and the pure packet helpers they use (`packet`, `lpm`).
"""
