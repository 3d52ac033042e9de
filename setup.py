"""Build of the C datapath extension; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "backends.udp._fastpath",
            ["backends/udp/_fastpath.c"],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
        )
    ]
)
