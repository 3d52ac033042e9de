"""Draw the benchmarks with matplotlib (the optional `bench` extra: pip install '.[bench]').

- `make bench` results (bench-results.json, label -> figures): two bar panels side by
  side, TCP throughput in Gbit/s and ping RTT in ms, one labelled bar per row in the order
  measured (`render`, `main`).
- `make bench-scale` results (bench-scale.json): time from start to programmed and RSS
  against the number of peers, one line per backend, with the `ip -batch` reference on
  the time axes (`plot_scale`).

Text stays text in the SVG (svg.fonttype "none"), so the labels can be searched and tested.

    python -m tests.bench_plot bench-results.json docs/benchmarks.svg
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

matplotlib.rcParams["svg.fonttype"] = "none"
matplotlib.rcParams["svg.hashsalt"] = "tweed"  # stable ids: a re-run diffs only on data

COLOURS = {"vxlan": "#3b6ea8", "host-gw": "#c8773a", "udp": "#4d9a55"}


def _save(fig: Figure, fmt: str = "svg") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", metadata={"Date": None}
                if fmt == "svg" else None)
    return buf.getvalue()


def render(results: dict[str, dict[str, Any]], title: str = "") -> str:
    """The SVG document for `make bench` results (label -> figures, as bench.py writes)."""
    names = list(results)
    fig = Figure(figsize=(11, 0.45 * len(names) + 1.4))
    panels = fig.subplots(1, 2, sharey=True)
    for ax, key, head, unit, digits, colour in (
        (panels[0], "gbps", "TCP throughput (iperf3, median)", "Gbit/s", 2, "#3b6ea8"),
        (panels[1], "rtt_ms", "ping RTT (median)", "ms", 3, "#c8773a"),
    ):
        values = [float(results[n][key]) for n in names]
        bars = ax.barh(range(len(names)), values, color=colour)
        ax.bar_label(bars, labels=[f"{v:.{digits}f} {unit}" for v in values], padding=3)
        ax.set_title(head, fontsize=10, loc="left")
        ax.set_xlim(0, max([v for v in values if not math.isnan(v)] or [1]) * 1.35)
        ax.set_xticks([])
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
    panels[0].set_yticks(range(len(names)), names)
    panels[0].invert_yaxis()
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontweight="bold")
    return _save(fig).decode()


def plot_scale(doc: dict[str, Any], dst: Path) -> None:
    """`make bench-scale` results as a plot: start time and RSS against peers."""
    rows = doc["results"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig = Figure(figsize=(11, 4.2))
    t_ax, m_ax = fig.subplots(1, 2)
    for b in backends:
        mine = sorted((r for r in rows if r["backend"] == b), key=lambda r: r["peers"])
        peers = [r["peers"] for r in mine]
        colour = COLOURS.get(b)
        t_ax.plot(peers, [r["start_s"] for r in mine], "o-", color=colour,
                  label=f"tweed {b}")
        ref = "routes" if b != "vxlan" else "route + neigh + fdb"
        t_ax.plot(peers, [r["ref_s"] for r in mine], "x--", color=colour, alpha=0.7,
                  label=f"ip -batch, {b} entries ({ref})")
        one = doc.get("one_peer", {}).get(b)
        m_ax.plot(peers, [r["rss_kib"] / 1024 for r in mine], "o-", color=colour,
                  label=f"tweed {b}")
        if one:
            m_ax.axhline(one["rss_kib"] / 1024, color=colour, ls=":", alpha=0.6,
                         label=f"{b}, one peer")
    sizes = sorted({r["peers"] for r in rows})
    for ax in (t_ax, m_ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_locator(NullLocator())
    t_ax.set_yscale("log")
    t_ax.set_title("start until every peer is in the kernel", fontsize=10, loc="left")
    t_ax.set_xlabel("peers")
    t_ax.set_ylabel("seconds")
    m_ax.set_title("agent RSS once programmed", fontsize=10, loc="left")
    m_ax.set_xlabel("peers")
    m_ax.set_ylabel("MB")
    for ax in (t_ax, m_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("tweed make bench-scale: one agent, N peer leases in etcd", x=0.01,
                 ha="left", fontweight="bold")
    dst.write_bytes(_save(fig, dst.suffix.lstrip(".") or "svg"))


def main(argv: list[str]) -> int:
    src = Path(argv[0] if argv else "bench-results.json")
    dst = Path(argv[1] if len(argv) > 1 else "docs/benchmarks.svg")
    title = argv[2] if len(argv) > 2 else "tweed make bench: two hosts in network namespaces"
    doc = json.loads(src.read_text())
    if "results" in doc and "sizes" in doc:
        plot_scale(doc, dst)
    else:
        dst.write_text(render(doc, title))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
