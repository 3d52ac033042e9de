"""The `tweed` command: parse the settings, set up logging, run the daemon; exit codes.

The flags themselves (names, FLANNELD_* variables, defaults, parsers, help) live in
agent.options. Here: `--help` and `--version`, a bad value as one line on stderr (exit 2),
and the `docker-opts` subcommand.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent.options import UsageError, parse_args, usage


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 0 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # grpc and etcd3aio are chatty at debug and say nothing our own log lines do not.
    for noisy in ("etcd3aio", "grpc", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """The `tweed` console command; `tweed docker-opts ...` is the mk-docker-opts subcommand."""
    args = sys.argv[1:] if argv is None else argv
    # The daemon takes only flags, so a first word can only be a subcommand.
    if args and args[0] == "docker-opts":
        from agent.docker_opts import main as docker_opts

        return docker_opts(args[1:])
    try:
        opts = parse_args(args, os.environ)
    except UsageError as exc:
        if str(exc) == "help":
            print(usage())
            return 0
        print(f"tweed: {exc}", file=sys.stderr)
        return 2
    if opts.version:
        print(__version__)
        return 0
    setup_logging(opts.v)
    # Imported here: --help, --version and docker-opts need none of the daemon's libraries.
    from agent.daemon import run

    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
