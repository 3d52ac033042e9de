"""Build of the C datapath extension; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "backends._fastpath",
            ["backends/_fastpath.c"],
            extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"],
        )
    ]
)
