"""`make demo` works for every backend: the README's first command stays true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("backend", ["host-gw", "vxlan", "udp"])
def test_demo_runs_and_pings(backend):
    res = subprocess.run([sys.executable, "-m", "tests.demo", backend], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("FLANNEL_SUBNET=") == 2
    assert "3 received, 0% packet loss" in res.stdout
    assert "tearing the lab down" in res.stdout
