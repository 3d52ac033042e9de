"""Draw `make bench` results (bench-results.json) as a small SVG bar chart.

Two panels side by side: throughput in Gbit/s and ping RTT in ms, one bar per row of the
benchmark, in the order measured. Plain SVG written by hand: a plotting library would be
a large dependency for two bar charts.

    python -m tests.bench_plot bench-results.json docs/benchmarks.svg
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

ROW_H = 26
LABEL_W = 330
PANEL_W = 260
GAP = 40
TOP = 56


def _panel(rows: list[tuple[str, dict]], key: str, x0: int, title: str, unit: str,
           colour: str) -> list[str]:
    peak = max(r[key] for _, r in rows) or 1.0
    out = [f'<text x="{x0}" y="{TOP - 18}" class="title">{escape(title)}</text>']
    for i, (_, r) in enumerate(rows):
        y = TOP + i * ROW_H
        w = max(1.0, PANEL_W * r[key] / peak)
        out.append(f'<rect x="{x0}" y="{y}" width="{w:.1f}" height="{ROW_H - 8}"'
                   f' fill="{colour}"/>')
        out.append(f'<text x="{x0 + w + 4:.1f}" y="{y + ROW_H - 13}">'
                   f'{r[key]:.2f} {unit}</text>')
    return out


def render(results: dict[str, dict], title: str = "") -> str:
    """The SVG document for the results (label -> figures, as bench.py writes them)."""
    rows = list(results.items())
    width = LABEL_W + 2 * (PANEL_W + 70) + GAP
    height = TOP + len(rows) * ROW_H + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' font-family="sans-serif" font-size="12">',
        "<style>.title{font-weight:bold}</style>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="20" class="title">{escape(title)}</text>',
    ]
    for i, (name, _) in enumerate(rows):
        y = TOP + i * ROW_H + ROW_H - 13
        parts.append(f'<text x="{LABEL_W - 8}" y="{y}" text-anchor="end">{escape(name)}</text>')
    parts += _panel(rows, "gbps", LABEL_W, "TCP throughput (iperf3, median)", "Gbit/s",
                    "#3b6ea8")
    parts += _panel(rows, "rtt_ms", LABEL_W + PANEL_W + 70 + GAP, "ping RTT (median)", "ms",
                    "#c8773a")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    src = Path(argv[0] if argv else "bench-results.json")
    dst = Path(argv[1] if len(argv) > 1 else "docs/benchmarks.svg")
    title = argv[2] if len(argv) > 2 else "tweed make bench: two hosts in network namespaces"
    dst.write_text(render(json.loads(src.read_text()), title))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
