"""Choosing the udp backend's datapath by name: `auto`, `python` or `c`.

The environment variable TWEED_DATAPATH overrides the backend option; `auto` takes the C
datapath when the extension is built.
"""

from __future__ import annotations

from backends.udp.python_datapath import PythonDatapath


def _c_datapath() -> type | None:
    """The C datapath class if the extension is built, else None."""
    try:
        from backends.udp.c_datapath import CDatapath
    except ImportError:
        return None
    return CDatapath


def choose_datapath(option: str, environ: dict[str, str]) -> type:
    """The datapath class for a backend option (`auto`, `python`, `c`); TWEED_DATAPATH
    in the environment wins. ValueError names the setting when the choice cannot work."""
    env = environ.get("TWEED_DATAPATH", "")
    name, where = (env, "TWEED_DATAPATH") if env else (option or "auto", "Backend.Datapath")
    name = name.lower()
    if name not in DATAPATHS:
        raise ValueError(f"{where}: unknown datapath {name!r} (choose from {', '.join(DATAPATHS)})")
    c = _c_datapath()
    if name == "c":
        if c is None:
            raise ValueError(f"{where}: the C datapath is not built in this installation")
        return c
    # `auto` takes the C datapath when it is built: with batches and UDP GSO/GRO it
    # outruns the python one (docs/benchmarks.md) even before TUN coalescing.
    if name == "auto" and c is not None:
        return c
    return PythonDatapath


#: The names a datapath can be chosen by.
DATAPATHS = ("auto", "python", "c")
