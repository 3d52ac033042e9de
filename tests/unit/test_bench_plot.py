"""The benchmark plot: one labelled bar per row in each panel, scaled to the largest."""

from __future__ import annotations

import re

from tests.bench_plot import PANEL_W, render


def test_bars_are_labelled_and_scaled_to_the_largest():
    svg = render({"vxlan": {"gbps": 8.0, "rtt_ms": 0.1},
                  "udp & c": {"gbps": 4.0, "rtt_ms": 0.4}}, "t")
    assert "udp &amp; c" in svg and ">vxlan<" in svg
    widths = [float(w) for w in re.findall(r'<rect x="\d+" y="\d+" width="([\d.]+)"', svg)]
    assert widths == [PANEL_W, PANEL_W / 2, PANEL_W / 4, PANEL_W]
    assert "4.00 Gbit/s" in svg and "0.40 ms" in svg
