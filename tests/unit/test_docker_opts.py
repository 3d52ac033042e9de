"""`tweed docker-opts`: flags, rendering (flannel's mk-docker-opts.sh output), errors, I/O."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cli, docker_opts
from agent.docker_opts import (
    DockerOptsArgs,
    DockerOptsError,
    DockerOptsUsage,
    docker_options,
    gateway_routes_to,
    parse_args,
    render,
)

# flannel's dist/sample_subnet.env
SAMPLE = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\n" \
    "FLANNEL_IPMASQ=false\n"
INDIVIDUAL = (
    'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
    'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
    'DOCKER_OPT_MTU="--mtu=1472"\n'
)
COMBINED = 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'


@pytest.fixture(autouse=True)
def no_routes(monkeypatch):
    """The routing table check reads netlink; unit tests give it a table without conflicts."""
    monkeypatch.setattr(docker_opts, "main_table_routes", lambda: [("0.0.0.0/0", "192.0.2.1")])


def run_main(tmp_path: Path, *flags: str, env_text: str | None = SAMPLE,
             environ: dict[str, str] | None = None) -> tuple[int, str]:
    src = tmp_path / "subnet.env"
    if env_text is not None:
        src.write_text(env_text)
    out = tmp_path / "out" / "docker_opts.env"
    code = docker_opts.main(["-f", str(src), "-d", str(out), *flags], environ or {})
    return code, out.read_text() if out.exists() else ""


# -- output, as flannel's own tests of mk-docker-opts.sh pin it ----------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), INDIVIDUAL + COMBINED),
        (("-i",), INDIVIDUAL),
        (("-c",), COMBINED),
        (("-i", "-c"), INDIVIDUAL + COMBINED),
        (("-k", "CUSTOM_KEY"), INDIVIDUAL + COMBINED.replace("DOCKER_OPTS=", "CUSTOM_KEY=")),
        (("-m",), 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\n'
                  'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'),
        (("-mc",), 'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'),
    ],
)
def test_output_matches_mk_docker_opts(tmp_path, flags, expected) -> None:
    assert run_main(tmp_path, *flags) == (0, expected)


def test_ip_masq_is_the_opposite_of_flannel_ipmasq() -> None:
    env = {"FLANNEL_SUBNET": "10.5.3.1/24", "FLANNEL_MTU": "1450"}
    assert docker_options({**env, "FLANNEL_IPMASQ": "true"}, "f")["DOCKER_OPT_IPMASQ"] == \
        "--ip-masq=false"
    assert docker_options({**env, "FLANNEL_IPMASQ": "false"}, "f")["DOCKER_OPT_IPMASQ"] == \
        "--ip-masq=true"
    assert "DOCKER_OPT_IPMASQ" not in docker_options(env, "f")  # absent: no option
    assert "DOCKER_OPT_IPMASQ" not in docker_options({**env, "FLANNEL_IPMASQ": "true"}, "f",
                                                     ip_masq=False)


def test_combined_value_from_the_environment_goes_in_front(tmp_path) -> None:
    code, text = run_main(tmp_path, "-c", environ={"DOCKER_OPTS": "--debug"})
    assert code == 0
    assert text == 'DOCKER_OPTS="--debug  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    code, text = run_main(tmp_path, "-c", "-k", "EXTRA", environ={"DOCKER_OPTS": "--debug"})
    assert text == 'EXTRA=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'


def test_values_are_quoted_for_shell_and_systemd() -> None:
    text = render({"DOCKER_OPT_BIP": "--bip=1.2.3.1/24"}, False, True,
                  prefix='--label a="b" $HOME `x` \\')
    assert text == 'DOCKER_OPTS="--label a=\\"b\\" \\$HOME \\`x\\` \\\\  --bip=1.2.3.1/24"\n'
    # sh reads it back as the same words
    res = subprocess.run(["sh", "-c", f'{text.strip()}; printf %s "$DOCKER_OPTS"'],
                         capture_output=True, text=True, check=True)
    assert res.stdout == '--label a="b" $HOME `x` \\  --bip=1.2.3.1/24'


def test_output_sources_in_sh(tmp_path) -> None:
    code, _ = run_main(tmp_path)
    assert code == 0
    out = tmp_path / "out" / "docker_opts.env"
    res = subprocess.run(["sh", "-c", f'. {out}; printf "%s|%s" "$DOCKER_OPT_MTU" "$DOCKER_OPTS"'],
                         capture_output=True, text=True, check=True)
    assert res.stdout == "--mtu=1472| --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"


# -- errors: one line, exit 1 (no usable input) or 2 (usage) -------------------------------


@pytest.mark.parametrize(
    ("env_text", "message"),
    [
        (None, "does not exist; is tweed running?"),
        ("FLANNEL_MTU=1450\n", "has no FLANNEL_SUBNET"),
        ("FLANNEL_SUBNET=10.1.74.1/24\n", "has no FLANNEL_MTU"),
        ("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=\n", "has no FLANNEL_MTU"),
        ("FLANNEL_SUBNET=banana\nFLANNEL_MTU=1450\n", "FLANNEL_SUBNET=banana in "),
        ("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=15x\n", "FLANNEL_MTU=15x in "),
        ("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=10\n", "is not an MTU"),
        ("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n",
         "FLANNEL_IPMASQ=yes in "),
    ],
)
def test_bad_input_is_one_line_exit_1_and_writes_nothing(tmp_path, capsys, env_text,
                                                         message) -> None:
    assert run_main(tmp_path, env_text=env_text) == (1, "")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tweed docker-opts: ")
    assert message in err
    assert str(tmp_path / "subnet.env") in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-x"], "unknown flag -x"),
        (["-f"], "flag -f needs a value"),
        (["-i", "extra"], "unexpected argument 'extra'"),
        (["--", "extra"], "unexpected argument 'extra'"),
        (["-k", "NOT A NAME"], "not a variable name"),
        (["-k", ""], "not a variable name"),
        (["--bip"], "unknown flag --"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message) -> None:
    assert docker_opts.main(argv, {}) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: tweed docker-opts" in err


def test_help_exits_0(capsys) -> None:
    assert docker_opts.main(["-h"], {}) == 0
    assert "-m       leave out --ip-masq" in capsys.readouterr().out


def test_getopts_forms() -> None:
    assert parse_args([]) == DockerOptsArgs()
    assert parse_args(["-fA", "-d", "B", "-icm", "-kK"]) == DockerOptsArgs(
        env_file="A", out_file="B", individual=True, combined=True, key="K", ip_masq=False)
    assert parse_args(["-if", "A"]) == DockerOptsArgs(env_file="A", individual=True)
    with pytest.raises(DockerOptsUsage):
        parse_args(["-q"])


def test_unwritable_output_is_exit_1(tmp_path, capsys) -> None:
    (tmp_path / "subnet.env").write_text(SAMPLE)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = docker_opts.main(["-f", str(tmp_path / "subnet.env"), "-d",
                             str(blocker / "x.env")], {})
    assert code == 1
    assert "cannot write" in capsys.readouterr().err


# -- I/O: atomic, mode 0644, stdout --------------------------------------------------------


def test_output_replaces_atomically_with_mode_0644(tmp_path) -> None:
    out = tmp_path / "out" / "docker_opts.env"
    out.parent.mkdir()
    out.write_text("old\n")
    old_inode = out.stat().st_ino
    umask = os.umask(0o077)
    try:
        assert run_main(tmp_path)[0] == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert out.stat().st_ino != old_inode  # a new file renamed over, not rewritten in place
    assert sorted(p.name for p in out.parent.iterdir()) == ["docker_opts.env"]


def test_dash_writes_to_stdout(tmp_path, capsys) -> None:
    (tmp_path / "subnet.env").write_text(SAMPLE)
    assert docker_opts.main(["-f", str(tmp_path / "subnet.env"), "-d", "-", "-c"], {}) == 0
    assert capsys.readouterr().out == COMBINED


# -- the routing table check of mk-docker-opts.sh ------------------------------------------


def test_gateway_route_to_our_subnet_is_a_conflict() -> None:
    routes = [("0.0.0.0/0", "192.0.2.1"), ("10.1.74.0/24", "192.0.2.9"),
              ("10.1.75.0/24", "192.0.2.8"), ("110.1.74.0/24", "192.0.2.7")]
    assert gateway_routes_to("10.1.74.1/24", routes) == ["10.1.74.0/24 via 192.0.2.9"]
    # docker0's own prefix route has no gateway: no conflict
    assert gateway_routes_to("10.1.74.1/24", [("10.1.74.0/24", None)]) == []
    assert gateway_routes_to("10.1.74.1/24", [("10.1.74.0/25", "192.0.2.9")]) == []


def test_conflicting_route_is_exit_1(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(docker_opts, "main_table_routes",
                        lambda: [("10.1.74.0/24", "192.168.100.2")])
    assert run_main(tmp_path) == (1, "")
    assert "10.1.74.0/24 via 192.168.100.2" in capsys.readouterr().err


def test_main_table_routes_reads_this_namespace(monkeypatch) -> None:
    # Real netlink, read only, in the namespace the tests run in; `ip` is the reference.
    monkeypatch.undo()
    import json

    res = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "main"],
                         capture_output=True, text=True, check=True)
    expected = set()
    for r in json.loads(res.stdout or "[]"):
        dst = "0.0.0.0/0" if r["dst"] == "default" else r["dst"]
        gw = r.get("gateway") or next((h.get("gateway") for h in r.get("nexthops", [])), None)
        expected.add((dst if "/" in dst else f"{dst}/32", gw))
    assert set(docker_opts.main_table_routes()) == expected


# -- the tweed command ---------------------------------------------------------------------


def test_tweed_cli_dispatches_the_subcommand(tmp_path, capsys) -> None:
    (tmp_path / "subnet.env").write_text(SAMPLE)
    assert cli.main(["docker-opts", "-f", str(tmp_path / "subnet.env"), "-d", "-", "-i"]) == 0
    assert capsys.readouterr().out == INDIVIDUAL
    assert cli.main(["docker-opts", "-z"]) == 2
    # the daemon's own flag parsing is unchanged: a stray word is still a usage error
    assert cli.main(["docker"]) == 2


def test_console_script_runs_it(tmp_path) -> None:
    (tmp_path / "subnet.env").write_text(SAMPLE)
    tweed = Path(sys.executable).with_name("tweed")
    assert tweed.exists(), f"{tweed}: the venv's tweed command is missing (pip install -e .)"
    res = subprocess.run([str(tweed), "docker-opts", "-f", str(tmp_path / "subnet.env"),
                          "-d", "-"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == INDIVIDUAL + COMBINED
    missing = subprocess.run([str(tweed), "docker-opts", "-f", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr == f"tweed docker-opts: {tmp_path / 'nope'} does not exist; " \
        "is tweed running?\n"


def test_docker_opts_error_is_runtime_error() -> None:
    assert issubclass(DockerOptsError, RuntimeError)
