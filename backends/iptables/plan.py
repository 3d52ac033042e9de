"""iptables planning for --ip-masq and the forward rules: pure functions, no I/O.

Owns the desired chains (flanneld's FLANNEL-POSTRTG in nat and FLANNEL-FWD in filter, with
the rules, comments and order of docs/interop.md#iptables), for either family: the same
rules for an IPv6 Network and subnet, in ip6tables' tables, where only the multicast range
differs (flanneld's MasqIP6Rules), parsing one table of `iptables-save`/`ip6tables-save`
output, and the minimal list of repairs that turns what the kernel has into what we want:
a missing chain, a missing or doubled jump from POSTROUTING/FORWARD, and in our own chains
missing rules, duplicates, rules out of order and rules that do not belong there (those of
an old network or subnet, or added by hand). The repairs are written as one
`iptables-restore --noflush` payload per table, so each table changes in one transaction.

A rule is a tuple of the tokens that follow `-A <chain>` in `iptables-save` output, written
exactly as iptables-save prints them back (e.g. `10.5.0.0/16`, `"flanneld masq"` quoted),
so the desired rules compare equal to the listed ones token by token.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

NAT = "nat"
FILTER = "filter"
MASQ_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
#: kube-proxy marks packets it will masquerade itself; NATing them twice breaks some kernels.
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"

Rule = tuple[str, ...]
#: A Network or subnet of either family; one chain plan holds one family only.
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ChainPlan:
    """One chain we own: its table, the built-in chain that jumps to it, and its rules."""

    table: str
    chain: str
    hook: str
    jump: Rule
    rules: tuple[Rule, ...]


def _tagged(comment: str, *spec: str) -> Rule:
    """`spec` ("matches... -j TARGET [target options]") with flanneld's comment match put
    before "-j", where flanneld (and so iptables-save) has it; the comment is quoted as
    iptables-save prints it."""
    j = spec.index("-j")
    return (*spec[:j], "-m", "comment", "--comment", f'"{comment}"', *spec[j:])


def multicast(network: Net) -> str:
    """The multicast range of the network's family, which rule 3 leaves alone."""
    return MULTICAST if network.version == 4 else MULTICAST6


def masq_chain(network: Net, subnet: Net, random_fully: bool) -> ChainPlan:
    """flanneld's nat rules for Network N and our subnet S, in flanneld's order, for
    iptables (IPv4) or ip6tables (IPv6): flanneld's MasqRules and MasqIP6Rules are the same
    list but for the multicast range.

    RETURN on kube-proxy's mark; N to N is overlay traffic and keeps its source; N to
    anything but multicast is masqueraded; from outside N to S (traffic arriving for our
    containers from a host that owns the address) keeps its source; from outside N to N
    (this host talking to the overlay) is masqueraded.
    """
    if network.version != subnet.version:
        raise ValueError(f"network {network} and subnet {subnet} are of different families")
    n, s = str(network), str(subnet)
    masq = ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")
    c = MASQ_COMMENT
    return ChainPlan(
        NAT, MASQ_CHAIN, "POSTROUTING",
        jump=_tagged(c, "-j", MASQ_CHAIN),
        rules=(
            _tagged(c, "-m", "mark", "--mark", KUBE_PROXY_MARK, "-j", "RETURN"),
            _tagged(c, "-s", n, "-d", n, "-j", "RETURN"),
            _tagged(c, "-s", n, "!", "-d", multicast(network), *masq),
            _tagged(c, "!", "-s", n, "-d", s, "-j", "RETURN"),
            _tagged(c, "!", "-s", n, "-d", n, *masq),
        ),
    )


def forward_chain(network: Net) -> ChainPlan:
    """flanneld's filter rules: forward anything from or to the Network (Docker >= 1.13
    sets the FORWARD policy to DROP); the same for the IPv6 Network in ip6tables."""
    n, c = str(network), FWD_COMMENT
    return ChainPlan(
        FILTER, FWD_CHAIN, "FORWARD",
        jump=_tagged(c, "-j", FWD_CHAIN),
        rules=(_tagged(c, "-s", n, "-j", "ACCEPT"), _tagged(c, "-d", n, "-j", "ACCEPT")),
    )


def desired_chains(
    network: Net,
    subnet: Net,
    *,
    ip_masq: bool,
    forward_rules: bool,
    random_fully: bool,
) -> list[ChainPlan]:
    """The chains tweed keeps for these settings (nat first, then filter), in the tables of
    the network's family."""
    chains = []
    if ip_masq:
        chains.append(masq_chain(network, subnet, random_fully))
    if forward_rules:
        chains.append(forward_chain(network))
    return chains


_VERSION = re.compile(r"v(\d+)\.(\d+)\.(\d+)")


def supports_random_fully(version_output: str) -> bool:
    """True if `iptables --version` names 1.6.2 or later, the first with --random-fully
    (the test go-iptables' HasRandomFully makes for flanneld)."""
    m = _VERSION.search(version_output)
    return m is not None and tuple(int(x) for x in m.groups()) >= (1, 6, 2)


# -- what the kernel has -------------------------------------------------------------------


@dataclass
class TableState:
    """One table as `iptables-save -t <table>` lists it: chain names and rules in order."""

    table: str
    chains: list[str] = field(default_factory=list)
    rules: dict[str, list[Rule]] = field(default_factory=dict)

    def chain_rules(self, chain: str) -> list[Rule]:
        return self.rules.get(chain, [])


class ParseError(ValueError):
    """iptables-save output that is not what it should be."""


def parse_save(text: str, table: str) -> TableState:
    """The given table out of `iptables-save` output (other tables are skipped)."""
    state = TableState(table)
    current: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:]
            continue
        if current != table:
            continue
        if line == "COMMIT":
            current = None
        elif line.startswith(":"):
            name = line[1:].split()[0]
            state.chains.append(name)
            state.rules.setdefault(name, [])
        elif line.startswith("-A "):
            try:
                tokens = shlex.split(line)
            except ValueError:
                # Someone else's rule with quoting shlex does not follow: it is not ours,
                # and a rough split still names its chain.
                tokens = line.split()
            if len(tokens) < 2:
                raise ParseError(f"line {n}: no chain: {line!r}")
            state.rules.setdefault(tokens[1], []).append(_requote(tokens[2:]))
        else:
            raise ParseError(f"line {n}: unexpected {line!r}")
    return state


def _requote(tokens: Sequence[str]) -> Rule:
    """Tokens back into iptables-save's spelling: a comment with spaces is quoted."""
    out = list(tokens)
    for i in range(1, len(out)):
        if out[i - 1] == "--comment" and not out[i].startswith('"'):
            out[i] = f'"{out[i]}"'
    return tuple(out)


def render(rule: Rule) -> str:
    return " ".join(rule)


def _plain(rule: Rule) -> str:
    """The rule for a log line: without flanneld's comment, which every rule carries."""
    tokens = list(rule)
    if "--comment" in tokens:
        i = tokens.index("--comment")
        if i >= 2 and tokens[i - 2 : i] == ["-m", "comment"]:
            del tokens[i - 2 : i + 2]
    return " ".join(tokens)


# -- repairs -------------------------------------------------------------------------------

Kind = Literal[
    "chain_missing", "jump_missing", "jump_duplicate",
    "rule_missing", "rule_duplicate", "rule_misordered", "rule_stale",
]
#: Every kind of repair, for counters that start at zero.
KINDS: tuple[Kind, ...] = (
    "chain_missing", "jump_missing", "jump_duplicate",
    "rule_missing", "rule_duplicate", "rule_misordered", "rule_stale",
)


@dataclass(frozen=True)
class Op:
    """One line of an iptables-restore payload.

    `insert` at `position` (1-based; None appends), `delete` at `position` or, when
    position is None, the first rule equal to `rule` (used in the built-in chains, where
    others insert rules too and a number read earlier may point elsewhere by now).
    """

    action: Literal["new_chain", "insert", "delete"]
    chain: str
    rule: Rule | None = None
    position: int | None = None

    def line(self) -> str:
        if self.action == "new_chain":
            return f":{self.chain} - [0:0]"
        if self.action == "insert":
            assert self.rule is not None
            if self.position is None:
                return f"-A {self.chain} {render(self.rule)}"
            return f"-I {self.chain} {self.position} {render(self.rule)}"
        if self.position is not None:
            return f"-D {self.chain} {self.position}"
        assert self.rule is not None
        return f"-D {self.chain} {render(self.rule)}"


@dataclass(frozen=True)
class Repair:
    """One thing found wrong, for the log and the counters (its Ops are in the plan)."""

    table: str
    chain: str
    kind: Kind
    rule: Rule | None = None
    position: int | None = None

    def describe(self) -> str:
        where = f"{self.table} {self.chain}"
        rule = f": {_plain(self.rule)}" if self.rule is not None else ""
        text = {
            "chain_missing": "created the missing chain",
            "jump_missing": "added the missing jump",
            "jump_duplicate": "removed a duplicate jump",
            "rule_missing": f"added a missing rule at position {self.position}",
            "rule_duplicate": "removed a duplicate rule",
            "rule_misordered": f"moved a rule back to position {self.position}",
            "rule_stale": "removed a rule that does not belong there "
                          "(an old network or subnet, or added by hand)",
        }[self.kind]
        return f"{where}: {text}{rule}"


@dataclass(frozen=True)
class TablePlan:
    """The repairs for one table and the ordered restore lines that make them."""

    table: str
    ops: tuple[Op, ...] = ()
    repairs: tuple[Repair, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ops)

    def payload(self) -> str:
        """Input for `iptables-restore --noflush`: one transaction for the table."""
        return "".join([f"*{self.table}\n", *(f"{op.line()}\n" for op in self.ops), "COMMIT\n"])


def _keep(current: Sequence[Rule], desired: Sequence[Rule]) -> list[int]:
    """Indexes into `current` of the longest run of desired rules already in desired order
    (strictly increasing positions in `desired`, so each desired rule is kept once).
    Everything else is removed and the missing rules inserted around the kept ones: the
    fewest changes, so a chain that is nearly right is touched only where it is wrong."""
    pos = {r: i for i, r in enumerate(desired)}
    idx = [pos.get(r, -1) for r in current]
    best = [0] * len(current)
    prev = [-1] * len(current)
    for i, d in enumerate(idx):
        if d < 0:
            continue
        best[i] = 1
        for j in range(i):
            # Strictly better only: ties keep the earliest copy, so of two identical
            # rules the first stays and the later one is the duplicate.
            if 0 <= idx[j] < d and best[j] + 1 > best[i]:
                best[i], prev[i] = best[j] + 1, j
    if not any(best):
        return []
    end = max(range(len(current)), key=lambda i: (best[i], -i))
    keep = []
    while end >= 0:
        keep.append(end)
        end = prev[end]
    return keep[::-1]


def _plan_chain(plan: ChainPlan, state: TableState) -> tuple[list[Op], list[Op], list[Repair]]:
    """Deletes (highest position first) and inserts (in desired order) for our chain."""
    if plan.chain not in state.chains:
        ops = [Op("insert", plan.chain, r) for r in plan.rules]
        reps = [Repair(plan.table, plan.chain, "rule_missing", r, i)
                for i, r in enumerate(plan.rules, 1)]
        return [], ops, reps
    current = state.chain_rules(plan.chain)
    kept = set(_keep(current, plan.rules))
    kept_rules = {current[i] for i in kept}
    deletes: list[Op] = []
    repairs: list[Repair] = []
    moved: set[Rule] = set()
    for i in range(len(current) - 1, -1, -1):
        if i in kept:
            continue
        rule = current[i]
        deletes.append(Op("delete", plan.chain, position=i + 1))
        if rule not in plan.rules:
            kind: Kind = "rule_stale"
        elif rule in kept_rules or rule in moved:
            kind = "rule_duplicate"
        else:
            kind = "rule_misordered"
            moved.add(rule)
        if kind != "rule_misordered":  # a move is reported once, where it lands
            repairs.append(Repair(plan.table, plan.chain, kind, rule))
    # Going down the list removes later copies first; the earliest misplaced copy is the
    # one reported as moved, the others as duplicates.
    inserts: list[Op] = []
    length = len(kept)
    for i, rule in enumerate(plan.rules):
        if rule in kept_rules:
            continue
        # After the deletes the chain holds the kept rules in order, so inserting the
        # missing ones in desired order at their final positions lands every rule right.
        inserts.append(Op("insert", plan.chain, rule, None if i == length else i + 1))
        length += 1
        kind = "rule_misordered" if rule in current else "rule_missing"
        repairs.append(Repair(plan.table, plan.chain, kind, rule, i + 1))
    return deletes, inserts, repairs


def _plan_jump(plan: ChainPlan, state: TableState) -> tuple[list[Op], list[Repair]]:
    """Exactly one jump from the hook, put first when it is added (as flanneld does).
    Its position is not enforced later: Docker and kube-proxy also insert at the top of
    these chains, and moving ours back up each time would fight them forever."""
    count = state.chain_rules(plan.hook).count(plan.jump)
    if count == 0:
        return ([Op("insert", plan.hook, plan.jump, 1)],
                [Repair(plan.table, plan.hook, "jump_missing", plan.jump)])
    # Deleting by rule text removes the first copy; all copies are the same rule.
    extra = count - 1
    return ([Op("delete", plan.hook, plan.jump)] * extra,
            [Repair(plan.table, plan.hook, "jump_duplicate", plan.jump)] * extra)


def plan_table(chains: Iterable[ChainPlan], state: TableState) -> TablePlan:
    """The minimal repairs of one table; an empty (false) plan when all is as desired."""
    ops: list[Op] = []
    repairs: list[Repair] = []
    for plan in chains:
        if plan.table != state.table:
            continue
        if plan.chain not in state.chains:
            ops.append(Op("new_chain", plan.chain))
            repairs.append(Repair(plan.table, plan.chain, "chain_missing"))
        deletes, inserts, chain_repairs = _plan_chain(plan, state)
        jump_ops, jump_repairs = _plan_jump(plan, state)
        # The chain is complete before anything jumps to it.
        ops += deletes + inserts + jump_ops
        repairs += chain_repairs + jump_repairs
    return TablePlan(state.table, tuple(ops), tuple(repairs))


def apply_plan(state: TableState, plan: TablePlan) -> TableState:
    """What the table looks like after the plan's restore: iptables-restore's semantics
    for these ops, for tests and fakes. ValueError where iptables-restore would fail."""
    chains = list(state.chains)
    rules = {k: list(v) for k, v in state.rules.items()}
    for op in plan.ops:
        if op.action == "new_chain":
            # Declaring an existing chain under --noflush empties it (nft and legacy);
            # the planner only declares missing chains.
            if op.chain not in chains:
                chains.append(op.chain)
            rules[op.chain] = []
            continue
        if op.chain not in chains:
            raise ValueError(f"no chain {op.chain}")
        lst = rules.setdefault(op.chain, [])
        if op.action == "insert":
            assert op.rule is not None
            if op.position is None:
                lst.append(op.rule)
            elif 1 <= op.position <= len(lst) + 1:
                lst.insert(op.position - 1, op.rule)
            else:
                raise ValueError(f"index of insertion too big: {op.line()}")
        elif op.position is not None:
            if not 1 <= op.position <= len(lst):
                raise ValueError(f"index of deletion too big: {op.line()}")
            del lst[op.position - 1]
        else:
            assert op.rule is not None
            if op.rule not in lst:
                raise ValueError(f"bad rule (does a matching rule exist?): {op.line()}")
            lst.remove(op.rule)
    return TableState(state.table, chains, rules)
