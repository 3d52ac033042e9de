"""The import graph of agent/ and backends/: no cycles, and the pure modules stay pure.

Pure modules hold tweed's values and decisions: the network config rules, the lease JSON,
the subnet choice, the diffs, the iptables plan, packet bytes, the flag table. They are the
leaves the I/O modules (etcd, netlink, TUN, sockets, processes, the daemon) are built on, so
they may import only other pure project modules and standard-library modules that do no
I/O. This test reads the imports from the source with `ast` (module level and inside
functions alike, also under `if TYPE_CHECKING:`: an arrow is an arrow), resolves relative
ones, and fails on:
  - an import cycle among the project's modules, naming the cycle and each import in it;
  - a pure module importing a project module that is not pure, a standard-library module on
    DENY, or any third-party module (every one tweed depends on does I/O);
  - a module named pure that does not exist (a rename must update PURE, not skip the check).
Each message names the file, the line, the importing module and the import as written.

Not counted: the package `__init__` that Python runs before a submodule (`agent/__init__`
sets an environment variable for grpc; that runs once per process, whoever imports first).
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("agent", "backends")

#: Modules with no I/O. A small pure leaf one of these needs goes here too.
PURE = frozenset({
    "agent.config",        # network config JSON -> NetworkConfig, flanneld's rules
    "agent.allocator",     # subnet choice
    "agent.lease_codec",   # lease JSON and subnet keys
    "agent.lease",         # Lease, PeerLease, PeerEvent and the pure diff of a listing
    "agent.options",       # the flag table: names, FLANNELD_* variables, defaults, parsers
    "agent.json_fields",   # the typed JSON field validators config and backends share
    "backends.kernel.types",  # routes, neighbours, FDB entries, change sets; Netlink protocol
    "backends.kernel.wire",   # the rtnetlink requests and answers of routes, neigh, FDB
    "backends.kernel.diff",   # desired vs. actual kernel state
    "backends.kernel.desired",  # the desired tables, kept per peer change
    "backends.iptables.plan",  # the rules for --ip-masq and forwarding, iptables-save parsing
    "backends.udp.packet",     # IPv4 header bytes, TTL, ICMP
    "backends.udp.lpm",        # longest-prefix match table
})

#: Standard-library modules (and their submodules) a pure module must not import: they
#: touch files, sockets, processes, threads, signals, the clock or the log.
DENY = frozenset({
    # the event loop, sockets and the network
    "asyncio", "socket", "socketserver", "ssl", "select", "selectors", "http", "urllib.request",
    "ftplib", "smtplib", "xmlrpc", "webbrowser",
    # processes, threads, signals
    "subprocess", "multiprocessing", "concurrent", "threading", "_thread", "queue", "signal",
    "sched", "atexit",
    # the operating system, files and devices
    "os", "sys", "io", "pathlib", "shutil", "tempfile", "glob", "fileinput", "fcntl", "termios",
    "tty", "pty", "mmap", "resource", "pwd", "grp", "platform", "ctypes", "sqlite3", "dbm",
    "shelve",
    # the clock (a pure function takes `now` as an argument) and logging (the caller logs)
    "time", "logging",
    # tweed's third-party dependencies: etcd, netlink, TUN, the event loop, metrics
    "etcd3aio", "grpc", "pyroute2", "pytun", "uvloop", "prometheus_client",
})

#: Third-party modules a pure module may import: none today.
PURE_THIRD_PARTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    """One imported name: `module` (in `path`, at `line`) imports `target` via `text`."""

    module: str
    path: Path
    line: int
    text: str
    target: str
    project: bool  # target is under agent/ or backends/ (else stdlib or third-party)


@dataclass(frozen=True)
class Graph:
    """The modules under root/agent and root/backends and what each imports."""

    root: Path
    modules: Mapping[str, Path]
    imports: tuple[Import, ...]

    def where(self, imp: Import) -> str:
        return f"{imp.path.relative_to(self.root)}:{imp.line}"


def scan(root: Path) -> Graph:
    """Every module under root/agent and root/backends and every import in it."""
    modules: dict[str, Path] = {}
    for top in TOPS:
        for path in sorted((root / top).rglob("*.py")):
            modules[_module_name(root, path)] = path
        for stub in sorted((root / top).rglob("*.pyi")):
            # An extension module (its stub says it exists); its imports are not Python's.
            modules.setdefault(_module_name(root, stub), stub)
    imports: list[Import] = []
    for name, path in modules.items():
        if path.suffix == ".py":
            imports.extend(_imports_of(name, path, modules))
    return Graph(root, modules, tuple(imports))


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> Iterable[Import]:
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[tuple[str, bool]] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_project(alias.name):
                    targets.append((_project_module(alias.name, modules) or alias.name, True))
                else:
                    targets.append((alias.name, False))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", module, node.level, is_package)
            for alias in node.names:
                name = base if alias.name == "*" else f"{base}.{alias.name}"
                if not _is_project(base):
                    targets.append((name, False))
                elif name in modules:  # `from pkg import sub`: the submodule
                    targets.append((name, True))
                else:  # a name defined in the module `base` (or in a module above it)
                    targets.append((_project_module(base, modules) or base, True))
        text = ast.unparse(node) if targets else ""
        for target, project in targets:
            if target != module:
                yield Import(module, path, node.lineno, text, target, project)


def _absolute(name: str, module: str, level: int, is_package: bool) -> str:
    if not level:
        return name
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, name] if name else parts)


def _is_project(name: str) -> bool:
    return name.split(".")[0] in TOPS


def _project_module(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest dotted prefix of name that is a module (`a.b.Cls` -> `a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


# --- the checks ---------------------------------------------------------------------------


def cycles(graph: Graph) -> list[str]:
    """One message per strongly connected group of project modules, with one cycle in it."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in graph.modules}
    for imp in graph.imports:
        if imp.project and imp.target in edges:
            edges[imp.module].setdefault(imp.target, imp)
    problems = []
    for group in _strongly_connected(edges):
        if len(group) < 2:
            continue
        path = _cycle_through(min(group), group, edges)
        steps = "; ".join(
            f"{graph.where(edges[a][b])} `{edges[a][b].text}`" for a, b in itertools.pairwise(path)
        )
        others = sorted(set(group) - set(path))
        also = f" (in one knot with {', '.join(others)})" if others else ""
        problems.append(f"import cycle {' -> '.join(path)}{also}: {steps}")
    return problems


def impurities(graph: Graph, pure: Iterable[str] = PURE) -> list[str]:
    """One message per import of a pure module that is not pure itself."""
    pure = frozenset(pure)
    problems: dict[tuple[str, str], str] = {}  # one per statement and reason
    for imp in graph.imports:
        if imp.module not in pure:
            continue
        why = _why_not_pure(imp, pure)
        if why:
            problems.setdefault((graph.where(imp), why),
                                f"{graph.where(imp)}: pure module {imp.module} imports "
                                f"{imp.target} (`{imp.text}`): {why}")
    return list(problems.values())


def missing(graph: Graph, pure: Iterable[str] = PURE) -> list[str]:
    return [f"{m} is named pure but there is no such module under {graph.root}"
            for m in sorted(pure) if m not in graph.modules]


def _why_not_pure(imp: Import, pure: frozenset[str]) -> str | None:
    if imp.project:
        return None if imp.target in pure else "a project module not on the pure list"
    parts = imp.target.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    if prefixes & DENY:
        return f"an I/O module (deny list: {min(prefixes & DENY, key=len)})"
    if parts[0] in sys.stdlib_module_names:
        return None
    if parts[0] in PURE_THIRD_PARTY:
        return None
    return "a third-party module (not on PURE_THIRD_PARTY)"


def _strongly_connected(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                groups.append(sorted(group))
    return groups


def _cycle_through(start: str, group: Iterable[str], edges: Mapping[str, Iterable[str]]
                   ) -> list[str]:
    """A shortest path start -> ... -> start inside the group (breadth first)."""
    inside = set(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in inside:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(inside)}")


# --- the project --------------------------------------------------------------------------

GRAPH = scan(ROOT)


def test_the_scan_sees_the_project() -> None:
    # Guards the checks below against passing on an empty or misread graph.
    assert {"agent.daemon", "agent.config", "backends.kernel.diff"} <= set(GRAPH.modules)
    edges = {(i.module, i.target) for i in GRAPH.imports}
    assert ("agent.allocator", "agent.config") in edges
    assert ("backends.kernel.diff", "backends.kernel.types") in edges
    assert ("agent.daemon", "asyncio") in edges  # and the standard library's


def test_no_import_cycles() -> None:
    problems = cycles(GRAPH)
    assert not problems, "\n".join(problems)


def test_every_pure_module_exists() -> None:
    problems = missing(GRAPH)
    assert not problems, "\n".join(problems)


def test_pure_modules_import_only_pure_modules() -> None:
    problems = impurities(GRAPH)
    assert not problems, "\n".join(problems)


# --- the checker itself, on a tree made for it ----------------------------------------------


def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_reports_a_cycle_and_a_pure_module_importing_socket(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "agent/__init__.py": "import os\n",
        # a -> b at module level, b -> a inside a function and relatively: a cycle.
        "agent/a.py": "from agent.b import thing\n",
        "agent/b.py": "thing = 1\n\n\ndef late():\n    from . import a\n    return a\n",
        # A pure module: socket inside a function, a non-pure project module, and clean
        # imports (stdlib values, a pure sibling by relative import, a package's own name).
        "agent/pure.py": ("from __future__ import annotations\n"
                          "import ipaddress\n"
                          "from typing import Any\n"
                          "from .leaf import VALUE\n"
                          "from agent.b import thing\n"
                          "\n\ndef send(x: Any) -> None:\n"
                          "    import socket\n"
                          "    socket.socket()\n"),
        "agent/leaf.py": "import json\nVALUE = json.dumps(1)\n",
        "backends/__init__.py": "",
        "backends/kernel/__init__.py": "",
        "backends/kernel/types.py": "from ..kernel import diff\n",
        "backends/kernel/diff.py": "import pyroute2\nfrom os import path\nimport urllib.parse\n",
        "backends/udp/__init__.py": "",
        "backends/udp/_fast.pyi": "def f() -> None: ...\n",
        "backends/udp/packet.py": "from backends.udp import _fast\nimport yaml\n",
    })
    graph = scan(root)
    pure = {"agent.pure", "agent.leaf", "backends.kernel.types", "backends.kernel.diff",
            "backends.udp.packet", "agent.gone"}

    assert cycles(graph) == [
        "import cycle agent.a -> agent.b -> agent.a: agent/a.py:1 `from agent.b import thing`; "
        "agent/b.py:5 `from . import a`"
    ]
    assert sorted(impurities(graph, pure)) == sorted([
        "agent/pure.py:5: pure module agent.pure imports agent.b (`from agent.b import thing`):"
        " a project module not on the pure list",
        "agent/pure.py:9: pure module agent.pure imports socket (`import socket`):"
        " an I/O module (deny list: socket)",
        "backends/kernel/diff.py:1: pure module backends.kernel.diff imports pyroute2"
        " (`import pyroute2`): an I/O module (deny list: pyroute2)",
        "backends/kernel/diff.py:2: pure module backends.kernel.diff imports os.path"
        " (`from os import path`): an I/O module (deny list: os)",
        "backends/udp/packet.py:1: pure module backends.udp.packet imports backends.udp._fast"
        " (`from backends.udp import _fast`): a project module not on the pure list",
        "backends/udp/packet.py:2: pure module backends.udp.packet imports yaml"
        " (`import yaml`): a third-party module (not on PURE_THIRD_PARTY)",
    ])
    assert missing(graph, pure) == [f"agent.gone is named pure but there is no such module "
                                    f"under {root}"]
    # The relative import two levels up resolved to the module, not the package.
    assert ("backends.kernel.types", "backends.kernel.diff") in {
        (i.module, i.target) for i in graph.imports}


def test_a_longer_cycle_is_shown_whole_and_its_knot_named(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "agent/__init__.py": "",
        "agent/a.py": "import agent.b\n",
        "agent/b.py": "import agent.c\nimport agent.d\n",
        "agent/c.py": "import agent.a\n",
        "agent/d.py": "import agent.b\n",
        "agent/e.py": "import agent.a\n",  # imports into the knot, is not in it
    })
    (problem,) = cycles(scan(root))
    assert problem.startswith("import cycle agent.a -> agent.b -> agent.c -> agent.a "
                              "(in one knot with agent.d): agent/a.py:1 `import agent.b`; ")
