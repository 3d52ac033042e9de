"""systemd/tweed.service and systemd/docker.service.d/tweed.conf: `systemd-analyze verify`
finds nothing to report, and the settings the integration relies on are there.

verify checks that every Exec*= binary exists, so the units are verified as installed
copies in a temp folder: `tweed` pointing at this virtualenv's command, Docker's own
docker.service (Debian's docker.io) next to our drop-in. verify's exit status stays 0 for
most problems (an unknown key, a value it cannot parse), so any output at all fails the
test; the negative controls show that it does report such problems in these very files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "tweed.service"
DROPIN = REPO / "systemd" / "docker.service.d" / "tweed.conf"
INSTALLED_TWEED = "/usr/local/bin/tweed"
DOCKER_UNIT = Path("/lib/systemd/system/docker.service")


def settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys kept, as systemd reads them."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in settings(path) if s == section and k == key]


def install_copies(dest: Path, tweed_unit: str | None = None,
                   dropin: str | None = None) -> tuple[Path, Path]:
    """tweed.service and docker.service (+ docker.service.d/tweed.conf) under `dest`."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: install the Debian package systemd "
                    "(make packages)", pytrace=False)
    if not DOCKER_UNIT.exists():
        pytest.fail(f"{DOCKER_UNIT} is missing: install the Debian package docker.io "
                    "(make packages)", pytrace=False)
    tweed = Path(sys.executable).with_name("tweed")
    assert tweed.exists(), f"{tweed} missing: the virtualenv lacks tweed (pip install -e .)"
    unit_text = UNIT.read_text() if tweed_unit is None else tweed_unit
    dropin_text = DROPIN.read_text() if dropin is None else dropin
    (dest / "docker.service.d").mkdir(parents=True)
    (dest / "tweed.service").write_text(unit_text.replace(INSTALLED_TWEED, str(tweed)))
    (dest / "docker.service.d" / "tweed.conf").write_text(
        dropin_text.replace(INSTALLED_TWEED, str(tweed)))
    shutil.copy(DOCKER_UNIT, dest / "docker.service")
    return dest / "tweed.service", dest / "docker.service"


def verify(*units: Path) -> str:
    """Everything `systemd-analyze verify` says about the units (empty when all is well)."""
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                         capture_output=True, text=True, timeout=120)
    out = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        out = f"exit status {res.returncode}\n{out}"
    return out


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify(*install_copies(tmp_path)) == ""


def test_verify_reports_problems_in_the_drop_in_and_the_unit(tmp_path: Path) -> None:
    # The controls: a broken copy of each file is reported, so the drop-in really is read
    # from docker.service.d/ and an empty report above means something.
    bad_dropin = DROPIN.read_text().replace("[Service]", "[Service]\nBogusKey=1", 1)
    bad_unit = UNIT.read_text().replace("WatchdogSec=30s", "WatchdogSec=soon")
    assert "soon" in verify(*install_copies(tmp_path / "a", tweed_unit=bad_unit))
    assert "BogusKey" in verify(*install_copies(tmp_path / "b", dropin=bad_dropin))
    missing = DROPIN.read_text().replace(INSTALLED_TWEED, "/nonexistent/tweed")
    assert "/nonexistent/tweed" in verify(*install_copies(tmp_path / "c", dropin=missing))


def test_tweed_unit_is_notify_with_watchdog_and_only_network_capabilities() -> None:
    get = lambda key: values(UNIT, "Service", key)  # noqa: E731
    assert get("Type") == ["notify"]
    assert get("NotifyAccess") == ["main"]
    assert get("WatchdogSec") == ["30s"]
    assert get("Restart") == ["always"]
    assert get("CapabilityBoundingSet") == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert get("AmbientCapabilities") == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert get("EnvironmentFile") == ["-/etc/default/tweed"]
    assert get("ExecStart") == [INSTALLED_TWEED]
    # What it needs stays reachable under the hardening.
    assert get("ProtectSystem") == ["strict"]
    assert "/run/flannel" in get("ReadWritePaths")
    assert get("RuntimeDirectory") == ["flannel"]
    assert get("RuntimeDirectoryPreserve") == ["yes"]
    assert get("DeviceAllow") == ["/dev/net/tun rw"]
    assert "AF_NETLINK" in get("RestrictAddressFamilies")[0].split()
    assert get("PrivateNetwork") == [] and get("PrivateDevices") == []


def test_docker_drop_in_waits_for_tweed_and_uses_subnet_env() -> None:
    assert values(DROPIN, "Unit", "After") == ["tweed.service"]
    assert values(DROPIN, "Unit", "Wants") == ["tweed.service"]
    # Not bound: restarting tweed must not restart Docker and its containers.
    assert values(DROPIN, "Unit", "Requires") == values(DROPIN, "Unit", "BindsTo") == []
    assert values(DROPIN, "Service", "EnvironmentFile") == [
        "/run/flannel/subnet.env", "-/run/docker_opts.env"]
    (pre,) = values(DROPIN, "Service", "ExecStartPre")
    assert pre.split()[:2] == [INSTALLED_TWEED, "docker-opts"]
    assert "-d /run/docker_opts.env" in pre
    reset, start = values(DROPIN, "Service", "ExecStart")
    assert reset == ""  # clears docker.service's own ExecStart
    words = start.split()
    assert "--bip=${FLANNEL_SUBNET}" in words
    assert "--mtu=${FLANNEL_MTU}" in words
    assert "$DOCKER_OPT_IPMASQ" in words  # unbraced: no argument at all when unset


def test_the_drop_in_runs_what_docker_opts_writes(tmp_path: Path) -> None:
    # The ExecStartPre line, run for real on a subnet.env, writes DOCKER_OPT_IPMASQ, the
    # variable ExecStart uses.
    (pre,) = values(DROPIN, "Service", "ExecStartPre")
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\n"
                   "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    out = tmp_path / "docker_opts.env"
    argv = [str(Path(sys.executable).with_name("tweed")), *pre.split()[1:]]
    argv = [str(env) if a == "/run/flannel/subnet.env" else str(out)
            if a == "/run/docker_opts.env" else a for a in argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == ('DOCKER_OPT_BIP="--bip=10.5.7.1/24"\n'
                               'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
                               'DOCKER_OPT_MTU="--mtu=1450"\n')
