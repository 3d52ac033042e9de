"""docs/reference.md lists every flag the CLI takes and every backend option the backends
read: a flag or option added without its documentation fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.options import FLAGS

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "reference.md").read_text()


@pytest.mark.parametrize("name", [f.name for f in FLAGS])
def test_every_flag_is_documented(name):
    flag = f"-{name}" if len(name) == 1 else f"--{name}"
    assert f"`{flag}`" in REFERENCE or f"{flag}`" in REFERENCE, flag


def backend_options() -> set[str]:
    names = set()
    for path in (ROOT / "backends").rglob("*.py"):
        names |= set(re.findall(r'opt_(?:int|bool|str)\(backend, "(\w+)"', path.read_text()))
    return names


def test_the_backends_read_options():
    assert {"VNI", "Port", "TSO", "UDPGSO", "Datapath"} <= backend_options()


@pytest.mark.parametrize("name", sorted(backend_options()))
def test_every_backend_option_is_documented(name):
    assert f"| `{name}` |" in REFERENCE, name
